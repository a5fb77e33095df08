//! Given/when/then tests of the `Job` aggregate: every command, accepted and refused, with the
//! exact events or the exact error it must produce.
//!
//! The standard history used throughout: the job (`spec()`: 2 GPUs, `max_retries = 2`,
//! `timeout_s = 3600`, priority 50) is submitted at `t(0)`; attempt `n` is assigned at
//! `t(1000·n)`, started 10 s later and ends 100 s after assignment.

use std::collections::BTreeMap;

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::Aggregate;
use cqrs_es::test::{AggregateTestExecutor, TestFramework};
use uuid::Uuid;

use super::spec::tests::spec;
use super::{
    Job, JobCommand, JobError, JobEvent, JobServices, JobState, RetryPolicy, RetryTrigger, Run,
    RunState, RunUtilisation, SchedulingDecision,
};
use crate::FieldError;

const JOB_ID: Uuid = Uuid::from_u128(1);
const RUN_1: Uuid = Uuid::from_u128(101);
const RUN_2: Uuid = Uuid::from_u128(102);
const RUN_3: Uuid = Uuid::from_u128(103);
const RUN_4: Uuid = Uuid::from_u128(104);
const EXECUTOR: &str = "gpu-host-1";
const OTHER_EXECUTOR: &str = "gpu-host-2";
const FAILURE: &str = "exit status 1";

// ---------------------------------------------------------------------------------------------
// Time, values and the test framework
// ---------------------------------------------------------------------------------------------

/// A fixed instant plus `s` seconds.
fn t(s: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0).unwrap() + Duration::seconds(s)
}

/// When attempt `n` of the standard history is assigned, started and ended.
fn assigned_at(attempt: u32) -> DateTime<Utc> {
    t(1000 * i64::from(attempt))
}
fn started_at(attempt: u32) -> DateTime<Utc> {
    assigned_at(attempt) + Duration::seconds(10)
}
fn ended_at(attempt: u32) -> DateTime<Utc> {
    assigned_at(attempt) + Duration::seconds(100)
}

fn run_id(attempt: u32) -> Uuid {
    Uuid::from_u128(100 + u128::from(attempt))
}

fn gpus() -> Vec<String> {
    vec!["GPU-0a1b".to_string(), "GPU-2c3d".to_string()]
}

fn decision() -> SchedulingDecision {
    SchedulingDecision {
        score: 0.75,
        priority: 50,
        fair_share_factor: 0.5,
        age_factor: 0.25,
        overtook: vec![Uuid::from_u128(7)],
        placement: "gpu-host-1: 2 free GPUs with ≥ 40000 MiB".to_string(),
    }
}

fn job(given: Vec<JobEvent>) -> AggregateTestExecutor<Job> {
    TestFramework::<Job>::with(JobServices::default()).given(given)
}

fn job_with_policy(policy: RetryPolicy, given: Vec<JobEvent>) -> AggregateTestExecutor<Job> {
    TestFramework::<Job>::with(JobServices { retry: policy }).given(given)
}

fn invalid(field: &str, message: &str) -> JobError {
    JobError::Invalid(FieldError::new(field, message))
}

/// Rebuilds a job from its events, as a repository would.
fn replay(events: &[JobEvent]) -> Job {
    let mut job = Job::default();
    for event in events {
        job.apply(event.clone());
    }
    job
}

fn concat(parts: &[Vec<JobEvent>]) -> Vec<JobEvent> {
    parts.concat()
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

fn submit(spec: super::JobSpec) -> JobCommand {
    JobCommand::SubmitJob {
        job_id: JOB_ID,
        spec,
        at: t(0),
    }
}

fn cancel(by: &str, at: DateTime<Utc>) -> JobCommand {
    JobCommand::CancelJob {
        by: by.to_string(),
        reason: "wrong input bucket".to_string(),
        at,
    }
}

fn change_priority(priority: u8, at: DateTime<Utc>) -> JobCommand {
    JobCommand::ChangePriority {
        priority,
        by: "ana".to_string(),
        reason: "deadline moved".to_string(),
        at,
    }
}

fn assign_on(run: Uuid, executor: &str, gpu_uuids: Vec<String>, at: DateTime<Utc>) -> JobCommand {
    JobCommand::AssignRun {
        run_id: run,
        executor_id: executor.to_string(),
        gpu_uuids,
        decision: decision(),
        at,
    }
}

fn assign(run: Uuid, at: DateTime<Utc>) -> JobCommand {
    assign_on(run, EXECUTOR, gpus(), at)
}

fn start_by(run: Uuid, executor: &str, at: DateTime<Utc>) -> JobCommand {
    JobCommand::ReportRunStarted {
        run_id: run,
        executor_id: executor.to_string(),
        at,
    }
}

fn start(run: Uuid, at: DateTime<Utc>) -> JobCommand {
    start_by(run, EXECUTOR, at)
}

fn progress(
    run: Uuid,
    report_seq: u64,
    progress: Option<f64>,
    metrics: &[(&str, f64)],
    at: DateTime<Utc>,
) -> JobCommand {
    JobCommand::ReportRunProgress {
        run_id: run,
        executor_id: EXECUTOR.to_string(),
        report_seq,
        progress,
        metrics: metrics_map(metrics),
        at,
    }
}

fn metrics_map(metrics: &[(&str, f64)]) -> BTreeMap<String, f64> {
    metrics
        .iter()
        .map(|(name, value)| ((*name).to_string(), *value))
        .collect()
}

fn succeed_by(run: Uuid, executor: &str, at: DateTime<Utc>) -> JobCommand {
    JobCommand::ReportRunSucceeded {
        run_id: run,
        executor_id: executor.to_string(),
        utilisation: None,
        at,
    }
}

fn succeed(run: Uuid, at: DateTime<Utc>) -> JobCommand {
    succeed_by(run, EXECUTOR, at)
}

/// The process exited with status 1.
fn fail(run: Uuid, retryable: bool, at: DateTime<Utc>) -> JobCommand {
    JobCommand::ReportRunFailed {
        run_id: run,
        executor_id: EXECUTOR.to_string(),
        exit_code: Some(1),
        signal: None,
        reason: FAILURE.to_string(),
        retryable,
        utilisation: None,
        at,
    }
}

fn time_out(run: Uuid, at: DateTime<Utc>) -> JobCommand {
    JobCommand::ReportRunTimedOut {
        run_id: run,
        executor_id: EXECUTOR.to_string(),
        utilisation: None,
        at,
    }
}

fn retry(by: &str, at: DateTime<Utc>) -> JobCommand {
    JobCommand::RetryJob {
        by: by.to_string(),
        reason: "fixed the input bucket".to_string(),
        at,
    }
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

fn submitted() -> JobEvent {
    JobEvent::JobSubmitted {
        job_id: JOB_ID,
        spec: spec(),
        at: t(0),
    }
}

fn cancelled(previous_state: JobState, active_run: Option<Uuid>, at: DateTime<Utc>) -> JobEvent {
    JobEvent::JobCancelled {
        by: "ana".to_string(),
        reason: "wrong input bucket".to_string(),
        previous_state,
        active_run,
        active_executor: active_run.map(|_| EXECUTOR.to_string()),
        at,
    }
}

fn priority_changed(from: u8, to: u8, at: DateTime<Utc>) -> JobEvent {
    JobEvent::JobPriorityChanged {
        from,
        to,
        by: "ana".to_string(),
        reason: "deadline moved".to_string(),
        at,
    }
}

fn run_assigned(run: Uuid, attempt: u32, at: DateTime<Utc>) -> JobEvent {
    JobEvent::RunAssigned {
        run_id: run,
        attempt,
        executor_id: EXECUTOR.to_string(),
        gpu_uuids: gpus(),
        decision: decision(),
        at,
    }
}

fn run_started(run: Uuid, attempt: u32, at: DateTime<Utc>) -> JobEvent {
    JobEvent::RunStarted {
        run_id: run,
        attempt,
        executor_id: EXECUTOR.to_string(),
        at,
    }
}

fn run_progressed(
    run: Uuid,
    report_seq: u64,
    progress: Option<f64>,
    metrics: &[(&str, f64)],
    at: DateTime<Utc>,
) -> JobEvent {
    JobEvent::RunProgressed {
        run_id: run,
        report_seq,
        progress,
        metrics: metrics_map(metrics),
        at,
    }
}

fn run_succeeded(
    run: Uuid,
    attempt: u32,
    started: Option<DateTime<Utc>>,
    at: DateTime<Utc>,
) -> JobEvent {
    JobEvent::RunSucceeded {
        run_id: run,
        attempt,
        executor_id: EXECUTOR.to_string(),
        gpu_uuids: gpus(),
        started_at: started,
        utilisation: None,
        at,
    }
}

/// The failure `fail()` reports: exit status 1.
fn run_failed(
    run: Uuid,
    attempt: u32,
    started: Option<DateTime<Utc>>,
    retryable: bool,
    at: DateTime<Utc>,
) -> JobEvent {
    JobEvent::RunFailed {
        run_id: run,
        attempt,
        executor_id: EXECUTOR.to_string(),
        gpu_uuids: gpus(),
        started_at: started,
        exit_code: Some(1),
        signal: None,
        reason: FAILURE.to_string(),
        retryable,
        utilisation: None,
        at,
    }
}

fn run_timed_out(
    run: Uuid,
    attempt: u32,
    started: Option<DateTime<Utc>>,
    at: DateTime<Utc>,
) -> JobEvent {
    JobEvent::RunTimedOut {
        run_id: run,
        attempt,
        executor_id: EXECUTOR.to_string(),
        gpu_uuids: gpus(),
        started_at: started,
        timeout_s: 3600,
        utilisation: None,
        at,
    }
}

fn retry_scheduled(
    next_attempt: u32,
    after_run: Uuid,
    backoff_s: u64,
    at: DateTime<Utc>,
) -> JobEvent {
    JobEvent::RetryScheduled {
        next_attempt,
        after_run: Some(after_run),
        eligible_at: at + Duration::seconds(backoff_s as i64),
        backoff_s,
        trigger: RetryTrigger::Automatic,
        at,
    }
}

fn manual_retry_scheduled(next_attempt: u32, after_run: Uuid, at: DateTime<Utc>) -> JobEvent {
    JobEvent::RetryScheduled {
        next_attempt,
        after_run: Some(after_run),
        eligible_at: at,
        backoff_s: 0,
        trigger: RetryTrigger::Manual {
            by: "ana".to_string(),
            reason: "fixed the input bucket".to_string(),
        },
        at,
    }
}

fn job_succeeded(run: Uuid, attempts: u32, at: DateTime<Utc>) -> JobEvent {
    JobEvent::JobSucceeded {
        run_id: run,
        attempts,
        at,
    }
}

fn job_failed(reason: &str, attempts: u32, last_run: Uuid, at: DateTime<Utc>) -> JobEvent {
    JobEvent::JobFailed {
        reason: reason.to_string(),
        attempts,
        last_run: Some(last_run),
        at,
    }
}

// ---------------------------------------------------------------------------------------------
// Histories (the "given")
// ---------------------------------------------------------------------------------------------

fn queued() -> Vec<JobEvent> {
    vec![submitted()]
}

/// Attempt `attempt` assigned (its predecessors already failed and were retried).
fn assigned(attempt: u32) -> Vec<JobEvent> {
    let mut events = if attempt == 1 {
        queued()
    } else {
        in_backoff(attempt - 1)
    };
    events.push(run_assigned(run_id(attempt), attempt, assigned_at(attempt)));
    events
}

fn running(attempt: u32) -> Vec<JobEvent> {
    let mut events = assigned(attempt);
    events.push(run_started(run_id(attempt), attempt, started_at(attempt)));
    events
}

/// Attempt `attempt` failed retryably; the job waits for its backoff (default policy).
fn in_backoff(attempt: u32) -> Vec<JobEvent> {
    let run = run_id(attempt);
    let backoff_s = RetryPolicy::default().backoff_s(attempt);
    concat(&[
        running(attempt),
        vec![
            run_failed(
                run,
                attempt,
                Some(started_at(attempt)),
                true,
                ended_at(attempt),
            ),
            retry_scheduled(attempt + 1, run, backoff_s, ended_at(attempt)),
        ],
    ])
}

fn succeeded() -> Vec<JobEvent> {
    concat(&[
        running(1),
        vec![
            run_succeeded(RUN_1, 1, Some(started_at(1)), ended_at(1)),
            job_succeeded(RUN_1, 1, ended_at(1)),
        ],
    ])
}

/// Attempt 1 failed for good (not retryable).
fn failed() -> Vec<JobEvent> {
    concat(&[
        running(1),
        vec![
            run_failed(RUN_1, 1, Some(started_at(1)), false, ended_at(1)),
            job_failed(FAILURE, 1, RUN_1, ended_at(1)),
        ],
    ])
}

/// All three attempts (`1 + max_retries`) failed retryably.
fn retries_exhausted() -> Vec<JobEvent> {
    concat(&[
        running(3),
        vec![
            run_failed(RUN_3, 3, Some(started_at(3)), true, ended_at(3)),
            job_failed(
                "retries exhausted after 3 attempts: exit status 1",
                3,
                RUN_3,
                ended_at(3),
            ),
        ],
    ])
}

fn cancelled_while_queued() -> Vec<JobEvent> {
    concat(&[queued(), vec![cancelled(JobState::Queued, None, t(5))]])
}

fn cancelled_while_assigned() -> Vec<JobEvent> {
    concat(&[
        assigned(1),
        vec![cancelled(JobState::Assigned, Some(RUN_1), t(1005))],
    ])
}

fn cancelled_while_running() -> Vec<JobEvent> {
    concat(&[
        running(1),
        vec![cancelled(JobState::Running, Some(RUN_1), t(1050))],
    ])
}

#[test]
fn the_histories_reach_the_states_they_are_named_after() {
    let state = |events: Vec<JobEvent>| replay(&events).state;
    assert_eq!(state(queued()), Some(JobState::Queued));
    assert_eq!(state(assigned(1)), Some(JobState::Assigned));
    assert_eq!(state(running(2)), Some(JobState::Running));
    assert_eq!(state(in_backoff(1)), Some(JobState::Queued));
    assert_eq!(state(succeeded()), Some(JobState::Succeeded));
    assert_eq!(state(failed()), Some(JobState::Failed));
    assert_eq!(state(retries_exhausted()), Some(JobState::Failed));
    assert_eq!(state(cancelled_while_running()), Some(JobState::Cancelled));
    assert_eq!(replay(&in_backoff(1)).eligible_at, Some(t(1110)));
    assert_eq!(replay(&in_backoff(2)).eligible_at, Some(t(2120)));
}

// ---------------------------------------------------------------------------------------------
// SubmitJob
// ---------------------------------------------------------------------------------------------

#[test]
fn submit_job_records_the_spec() {
    job(vec![])
        .when(submit(spec()))
        .then_expect_events(vec![submitted()]);
}

#[test]
fn submit_job_with_an_invalid_spec_names_the_field() {
    let mut no_gpus = spec();
    no_gpus.gpus = 0;
    job(vec![])
        .when(submit(no_gpus))
        .then_expect_error(invalid("gpus", "must be between 1 and 8, got 0"));

    let mut overrides_devices = spec();
    overrides_devices
        .env
        .insert("CUDA_VISIBLE_DEVICES".to_string(), "0".to_string());
    job(vec![])
        .when(submit(overrides_devices))
        .then_expect_error(invalid(
            "env.CUDA_VISIBLE_DEVICES",
            "is set by the executor to the assigned GPUs and cannot be overridden",
        ));
}

#[test]
fn submit_job_twice_is_refused() {
    job(queued())
        .when(submit(spec()))
        .then_expect_error(JobError::AlreadySubmitted);
    job(succeeded())
        .when(submit(spec()))
        .then_expect_error(JobError::AlreadySubmitted);
}

#[test]
fn every_other_command_on_a_never_submitted_job_is_not_found() {
    let commands = [
        cancel("ana", t(1)),
        change_priority(80, t(1)),
        assign(RUN_1, t(1)),
        start(RUN_1, t(1)),
        progress(RUN_1, 1, Some(0.5), &[], t(1)),
        succeed(RUN_1, t(1)),
        fail(RUN_1, true, t(1)),
        time_out(RUN_1, t(1)),
        retry("ana", t(1)),
    ];
    for command in commands {
        let name = command.name();
        let result = job(vec![]).when(command).inspect_result();
        assert_eq!(result, Err(JobError::NotFound), "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// CancelJob
// ---------------------------------------------------------------------------------------------

#[test]
fn cancel_a_queued_job() {
    job(queued())
        .when(cancel("ana", t(5)))
        .then_expect_events(vec![cancelled(JobState::Queued, None, t(5))]);
}

#[test]
fn cancel_an_assigned_job_names_the_run_to_stop() {
    job(assigned(1))
        .when(cancel("ana", t(1005)))
        .then_expect_events(vec![cancelled(JobState::Assigned, Some(RUN_1), t(1005))]);
}

#[test]
fn cancel_a_running_job_names_the_run_to_stop() {
    job(running(2))
        .when(cancel("ana", t(2050)))
        .then_expect_events(vec![cancelled(JobState::Running, Some(RUN_2), t(2050))]);
}

#[test]
fn cancel_a_job_waiting_for_its_retry_has_no_run_to_stop() {
    job(in_backoff(1))
        .when(cancel("ana", t(1105)))
        .then_expect_events(vec![cancelled(JobState::Queued, None, t(1105))]);
}

#[test]
fn cancel_a_finished_job_is_refused() {
    for (given, state) in [
        (succeeded(), JobState::Succeeded),
        (failed(), JobState::Failed),
        (cancelled_while_queued(), JobState::Cancelled),
    ] {
        job(given)
            .when(cancel("ana", t(5000)))
            .then_expect_error(JobError::AlreadyFinished { state });
    }
}

#[test]
fn cancel_needs_someone_to_cancel_it() {
    job(queued())
        .when(cancel("", t(5)))
        .then_expect_error(invalid("by", "must not be empty"));
    job(queued())
        .when(cancel("  ", t(5)))
        .then_expect_error(invalid("by", "must not be empty"));
}

// ---------------------------------------------------------------------------------------------
// ChangePriority
// ---------------------------------------------------------------------------------------------

#[test]
fn change_priority_records_from_and_to() {
    job(queued())
        .when(change_priority(80, t(5)))
        .then_expect_events(vec![priority_changed(50, 80, t(5))]);
}

#[test]
fn change_priority_starts_from_the_last_change() {
    job(concat(&[queued(), vec![priority_changed(50, 80, t(5))]]))
        .when(change_priority(0, t(6)))
        .then_expect_events(vec![priority_changed(80, 0, t(6))]);
}

#[test]
fn change_priority_of_a_running_job_is_accepted() {
    job(running(1))
        .when(change_priority(100, t(1050)))
        .then_expect_events(vec![priority_changed(50, 100, t(1050))]);
}

#[test]
fn change_priority_to_the_same_priority_records_nothing() {
    job(queued())
        .when(change_priority(50, t(5)))
        .then_expect_events(vec![]);
}

#[test]
fn change_priority_above_the_maximum_is_invalid() {
    job(queued())
        .when(change_priority(101, t(5)))
        .then_expect_error(invalid("priority", "must be between 0 and 100, got 101"));
}

#[test]
fn change_priority_of_a_finished_job_is_refused() {
    for (given, state) in [
        (succeeded(), JobState::Succeeded),
        (failed(), JobState::Failed),
        (cancelled_while_queued(), JobState::Cancelled),
    ] {
        job(given)
            .when(change_priority(80, t(5000)))
            .then_expect_error(JobError::AlreadyFinished { state });
    }
}

// ---------------------------------------------------------------------------------------------
// AssignRun
// ---------------------------------------------------------------------------------------------

#[test]
fn assign_the_first_attempt() {
    job(queued())
        .when(assign(RUN_1, t(1000)))
        .then_expect_events(vec![run_assigned(RUN_1, 1, t(1000))]);
}

#[test]
fn assign_after_a_retry_is_the_next_attempt() {
    job(in_backoff(1))
        .when(assign(RUN_2, t(2000)))
        .then_expect_events(vec![run_assigned(RUN_2, 2, t(2000))]);
    job(in_backoff(2))
        .when(assign(RUN_3, t(3000)))
        .then_expect_events(vec![run_assigned(RUN_3, 3, t(3000))]);
}

#[test]
fn assign_during_the_backoff_is_refused_until_eligible() {
    // Attempt 1 failed at t(1100): eligible 10 s later.
    job(in_backoff(1))
        .when(assign(RUN_2, t(1109)))
        .then_expect_error(JobError::InBackoff { until: t(1110) });
    job(in_backoff(1))
        .when(assign(RUN_2, t(1110)))
        .then_expect_events(vec![run_assigned(RUN_2, 2, t(1110))]);
    job(in_backoff(1))
        .when(assign(RUN_2, t(1111)))
        .then_expect_events(vec![run_assigned(RUN_2, 2, t(1111))]);
}

#[test]
fn assign_a_cancelled_job_is_refused() {
    job(cancelled_while_queued())
        .when(assign(RUN_1, t(1000)))
        .then_expect_error(JobError::Cancelled);
}

#[test]
fn assign_a_job_that_is_not_queued_is_refused() {
    job(assigned(1))
        .when(assign(RUN_2, t(1001)))
        .then_expect_error(JobError::NotQueued {
            state: JobState::Assigned,
        });
    job(running(1))
        .when(assign(RUN_2, t(1050)))
        .then_expect_error(JobError::NotQueued {
            state: JobState::Running,
        });
    job(succeeded())
        .when(assign(RUN_2, t(5000)))
        .then_expect_error(JobError::NotQueued {
            state: JobState::Succeeded,
        });
    job(failed())
        .when(assign(RUN_2, t(5000)))
        .then_expect_error(JobError::NotQueued {
            state: JobState::Failed,
        });
}

#[test]
fn assign_the_wrong_number_of_gpus_is_invalid() {
    job(queued())
        .when(assign_on(
            RUN_1,
            EXECUTOR,
            vec!["GPU-0a1b".to_string()],
            t(1000),
        ))
        .then_expect_error(invalid("gpu_uuids", "the job needs exactly 2 GPUs, got 1"));
    let three = vec![
        "GPU-0a1b".to_string(),
        "GPU-2c3d".to_string(),
        "GPU-4e5f".to_string(),
    ];
    job(queued())
        .when(assign_on(RUN_1, EXECUTOR, three, t(1000)))
        .then_expect_error(invalid("gpu_uuids", "the job needs exactly 2 GPUs, got 3"));
}

#[test]
fn assign_duplicate_or_empty_gpu_uuids_is_invalid() {
    let expected = invalid("gpu_uuids", "GPU uuids must be non-empty and distinct");
    let twice = vec!["GPU-0a1b".to_string(), "GPU-0a1b".to_string()];
    job(queued())
        .when(assign_on(RUN_1, EXECUTOR, twice, t(1000)))
        .then_expect_error(expected.clone());
    let empty = vec!["GPU-0a1b".to_string(), String::new()];
    job(queued())
        .when(assign_on(RUN_1, EXECUTOR, empty, t(1000)))
        .then_expect_error(expected);
}

#[test]
fn assign_a_reused_run_id_is_refused() {
    job(in_backoff(1))
        .when(assign(RUN_1, t(2000)))
        .then_expect_error(JobError::DuplicateRun(RUN_1));
}

#[test]
fn assign_to_a_malformed_executor_id_is_invalid() {
    job(queued())
        .when(assign_on(RUN_1, "gpu host 1", gpus(), t(1000)))
        .then_expect_error(invalid(
            "executor_id",
            "may contain only letters, digits, '_' and '-'",
        ));
    job(queued())
        .when(assign_on(RUN_1, "", gpus(), t(1000)))
        .then_expect_error(invalid("executor_id", "must be 1 to 64 characters"));
}

// ---------------------------------------------------------------------------------------------
// ReportRunStarted
// ---------------------------------------------------------------------------------------------

#[test]
fn report_run_started() {
    job(assigned(1))
        .when(start(RUN_1, t(1010)))
        .then_expect_events(vec![run_started(RUN_1, 1, t(1010))]);
    job(assigned(2))
        .when(start(RUN_2, t(2010)))
        .then_expect_events(vec![run_started(RUN_2, 2, t(2010))]);
}

#[test]
fn report_run_started_twice_records_nothing() {
    job(running(1))
        .when(start(RUN_1, t(1011)))
        .then_expect_events(vec![]);
}

#[test]
fn report_run_started_for_an_unknown_run_is_refused() {
    job(assigned(1))
        .when(start(RUN_2, t(1010)))
        .then_expect_error(JobError::RunNotAssigned(RUN_2));
}

#[test]
fn report_run_started_by_another_executor_is_refused() {
    job(assigned(1))
        .when(start_by(RUN_1, OTHER_EXECUTOR, t(1010)))
        .then_expect_error(JobError::WrongExecutor {
            run_id: RUN_1,
            assigned_to: EXECUTOR.to_string(),
            reported_by: OTHER_EXECUTOR.to_string(),
        });
}

#[test]
fn report_run_started_after_the_job_was_cancelled_is_refused() {
    job(cancelled_while_assigned())
        .when(start(RUN_1, t(1010)))
        .then_expect_error(JobError::Cancelled);
}

#[test]
fn report_run_started_for_an_ended_run_is_refused() {
    job(in_backoff(1))
        .when(start(RUN_1, t(1200)))
        .then_expect_error(JobError::RunNotActive {
            run_id: RUN_1,
            state: RunState::Failed,
            action: "start it",
        });
}

// ---------------------------------------------------------------------------------------------
// ReportRunProgress
// ---------------------------------------------------------------------------------------------

#[test]
fn report_run_progress() {
    let metrics = [("loss", 0.42), ("tiles_per_s", 118.5)];
    job(running(1))
        .when(progress(RUN_1, 1, Some(0.25), &metrics, t(1030)))
        .then_expect_events(vec![run_progressed(
            RUN_1,
            1,
            Some(0.25),
            &metrics,
            t(1030),
        )]);
}

#[test]
fn report_run_progress_with_metrics_only_or_a_later_seq() {
    job(running(1))
        .when(progress(RUN_1, 0, None, &[("loss", 0.9)], t(1020)))
        .then_expect_events(vec![run_progressed(
            RUN_1,
            0,
            None,
            &[("loss", 0.9)],
            t(1020),
        )]);
    let reported = concat(&[
        running(1),
        vec![run_progressed(RUN_1, 3, Some(0.25), &[], t(1030))],
    ]);
    job(reported)
        .when(progress(RUN_1, 4, Some(1.0), &[], t(1040)))
        .then_expect_events(vec![run_progressed(RUN_1, 4, Some(1.0), &[], t(1040))]);
}

#[test]
fn report_run_progress_already_seen_records_nothing() {
    let reported = concat(&[
        running(1),
        vec![run_progressed(RUN_1, 3, Some(0.25), &[], t(1030))],
    ]);
    job(reported.clone())
        .when(progress(RUN_1, 3, Some(0.25), &[], t(1031)))
        .then_expect_events(vec![]);
    job(reported)
        .when(progress(RUN_1, 2, Some(0.2), &[], t(1032)))
        .then_expect_events(vec![]);
}

#[test]
fn report_run_progress_outside_zero_to_one_is_invalid() {
    let expected = invalid("progress", "must be between 0 and 1");
    for value in [1.5, -0.1, f64::NAN] {
        job(running(1))
            .when(progress(RUN_1, 1, Some(value), &[], t(1030)))
            .then_expect_error(expected.clone());
    }
}

#[test]
fn report_run_progress_with_a_non_finite_metric_is_invalid() {
    let expected = invalid(
        "metrics.loss",
        "names are 1 to 64 bytes and values finite numbers",
    );
    for value in [f64::NAN, f64::INFINITY] {
        job(running(1))
            .when(progress(RUN_1, 1, Some(0.5), &[("loss", value)], t(1030)))
            .then_expect_error(expected.clone());
    }
}

#[test]
fn report_run_progress_of_a_run_that_is_not_running_is_refused() {
    job(assigned(1))
        .when(progress(RUN_1, 1, Some(0.5), &[], t(1005)))
        .then_expect_error(JobError::RunNotActive {
            run_id: RUN_1,
            state: RunState::Assigned,
            action: "report progress",
        });
    job(in_backoff(1))
        .when(progress(RUN_1, 1, Some(0.5), &[], t(1105)))
        .then_expect_error(JobError::RunNotActive {
            run_id: RUN_1,
            state: RunState::Failed,
            action: "report progress",
        });
}

// ---------------------------------------------------------------------------------------------
// ReportRunSucceeded
// ---------------------------------------------------------------------------------------------

#[test]
fn report_run_succeeded_ends_the_run_and_the_job() {
    job(running(1))
        .when(succeed(RUN_1, t(1100)))
        .then_expect_events(vec![
            run_succeeded(RUN_1, 1, Some(t(1010)), t(1100)),
            job_succeeded(RUN_1, 1, t(1100)),
        ]);
}

#[test]
fn report_run_succeeded_records_the_runs_gpu_utilisation() {
    let utilisation = RunUtilisation {
        gpu_seconds_sampled: 180.0,
        gpu_seconds_busy: 135.0,
        peak_memory_mb: Some(61_440),
    };
    let mut expected = run_succeeded(RUN_1, 1, Some(t(1010)), t(1100));
    if let JobEvent::RunSucceeded {
        utilisation: slot, ..
    } = &mut expected
    {
        *slot = Some(utilisation);
    }
    job(running(1))
        .when(JobCommand::ReportRunSucceeded {
            run_id: RUN_1,
            executor_id: EXECUTOR.to_string(),
            utilisation: Some(utilisation),
            at: t(1100),
        })
        .then_expect_events(vec![expected, job_succeeded(RUN_1, 1, t(1100))]);
    assert_eq!(utilisation.efficiency(), Some(0.75));
}

#[test]
fn utilisation_must_be_finite_and_busy_at_most_sampled() {
    let report = |sampled: f64, busy: f64| JobCommand::ReportRunTimedOut {
        run_id: RUN_1,
        executor_id: EXECUTOR.to_string(),
        utilisation: Some(RunUtilisation {
            gpu_seconds_sampled: sampled,
            gpu_seconds_busy: busy,
            peak_memory_mb: None,
        }),
        at: t(1100),
    };
    job(running(1))
        .when(report(10.0, 10.5))
        .then_expect_error(invalid(
            "utilisation.gpu_seconds_busy",
            "must be at most utilisation.gpu_seconds_sampled",
        ));
    job(running(1))
        .when(report(f64::NAN, 0.0))
        .then_expect_error(invalid(
            "utilisation.gpu_seconds_sampled",
            "must be a finite number of seconds, at least 0",
        ));
    job(running(1))
        .when(report(10.0, -1.0))
        .then_expect_error(invalid(
            "utilisation.gpu_seconds_busy",
            "must be a finite number of seconds, at least 0",
        ));
    assert_eq!(RunUtilisation::default().efficiency(), None);
}

#[test]
fn report_run_succeeded_on_a_later_attempt_counts_all_attempts() {
    job(running(3))
        .when(succeed(RUN_3, t(3100)))
        .then_expect_events(vec![
            run_succeeded(RUN_3, 3, Some(t(3010)), t(3100)),
            job_succeeded(RUN_3, 3, t(3100)),
        ]);
}

#[test]
fn report_run_succeeded_twice_records_nothing() {
    job(succeeded())
        .when(succeed(RUN_1, t(1101)))
        .then_expect_events(vec![]);
}

#[test]
fn report_run_succeeded_of_a_run_that_never_started_is_refused() {
    job(assigned(1))
        .when(succeed(RUN_1, t(1100)))
        .then_expect_error(JobError::RunNotActive {
            run_id: RUN_1,
            state: RunState::Assigned,
            action: "report success",
        });
}

#[test]
fn report_run_succeeded_of_a_failed_run_is_refused() {
    job(in_backoff(1))
        .when(succeed(RUN_1, t(1105)))
        .then_expect_error(JobError::RunNotActive {
            run_id: RUN_1,
            state: RunState::Failed,
            action: "report success",
        });
}

#[test]
fn report_run_succeeded_by_another_executor_is_refused() {
    job(running(1))
        .when(succeed_by(RUN_1, OTHER_EXECUTOR, t(1100)))
        .then_expect_error(JobError::WrongExecutor {
            run_id: RUN_1,
            assigned_to: EXECUTOR.to_string(),
            reported_by: OTHER_EXECUTOR.to_string(),
        });
}

#[test]
fn report_run_succeeded_after_cancel_records_only_the_run() {
    job(cancelled_while_running())
        .when(succeed(RUN_1, t(1100)))
        .then_expect_events(vec![run_succeeded(RUN_1, 1, Some(t(1010)), t(1100))]);
}

// ---------------------------------------------------------------------------------------------
// ReportRunFailed
// ---------------------------------------------------------------------------------------------

#[test]
fn report_run_failed_retryably_schedules_a_retry_after_the_base_backoff() {
    job(running(1))
        .when(fail(RUN_1, true, t(1100)))
        .then_expect_events(vec![
            run_failed(RUN_1, 1, Some(t(1010)), true, t(1100)),
            JobEvent::RetryScheduled {
                next_attempt: 2,
                after_run: Some(RUN_1),
                eligible_at: t(1110),
                backoff_s: 10,
                trigger: RetryTrigger::Automatic,
                at: t(1100),
            },
        ]);
}

#[test]
fn report_run_failed_retryably_doubles_the_backoff_per_attempt() {
    job(running(2))
        .when(fail(RUN_2, true, t(2100)))
        .then_expect_events(vec![
            run_failed(RUN_2, 2, Some(t(2010)), true, t(2100)),
            JobEvent::RetryScheduled {
                next_attempt: 3,
                after_run: Some(RUN_2),
                eligible_at: t(2120),
                backoff_s: 20,
                trigger: RetryTrigger::Automatic,
                at: t(2100),
            },
        ]);
}

#[test]
fn report_run_failed_follows_a_custom_retry_policy() {
    let policy = RetryPolicy {
        base_backoff_s: 30,
        max_backoff_s: 45,
    };
    job_with_policy(policy, running(1))
        .when(fail(RUN_1, true, t(1100)))
        .then_expect_events(vec![
            run_failed(RUN_1, 1, Some(t(1010)), true, t(1100)),
            retry_scheduled(2, RUN_1, 30, t(1100)),
        ]);
    // 60 s doubled, capped at 45 s.
    job_with_policy(policy, running(2))
        .when(fail(RUN_2, true, t(2100)))
        .then_expect_events(vec![
            run_failed(RUN_2, 2, Some(t(2010)), true, t(2100)),
            JobEvent::RetryScheduled {
                next_attempt: 3,
                after_run: Some(RUN_2),
                eligible_at: t(2145),
                backoff_s: 45,
                trigger: RetryTrigger::Automatic,
                at: t(2100),
            },
        ]);
}

#[test]
fn report_run_failed_retryably_with_retries_exhausted_fails_the_job() {
    job(running(3))
        .when(fail(RUN_3, true, t(3100)))
        .then_expect_events(vec![
            run_failed(RUN_3, 3, Some(t(3010)), true, t(3100)),
            job_failed(
                "retries exhausted after 3 attempts: exit status 1",
                3,
                RUN_3,
                t(3100),
            ),
        ]);
}

#[test]
fn report_run_failed_without_retries_fails_the_job_at_once() {
    let mut no_retries = spec();
    no_retries.max_retries = 0;
    let given = vec![
        JobEvent::JobSubmitted {
            job_id: JOB_ID,
            spec: no_retries,
            at: t(0),
        },
        run_assigned(RUN_1, 1, t(1000)),
        run_started(RUN_1, 1, t(1010)),
    ];
    job(given)
        .when(fail(RUN_1, true, t(1100)))
        .then_expect_events(vec![
            run_failed(RUN_1, 1, Some(t(1010)), true, t(1100)),
            job_failed(
                "retries exhausted after 1 attempt: exit status 1",
                1,
                RUN_1,
                t(1100),
            ),
        ]);
}

#[test]
fn report_run_failed_not_retryable_fails_the_job_with_retries_left() {
    job(running(1))
        .when(fail(RUN_1, false, t(1100)))
        .then_expect_events(vec![
            run_failed(RUN_1, 1, Some(t(1010)), false, t(1100)),
            job_failed(FAILURE, 1, RUN_1, t(1100)),
        ]);
}

#[test]
fn report_run_failed_twice_records_nothing() {
    job(in_backoff(1))
        .when(fail(RUN_1, true, t(1101)))
        .then_expect_events(vec![]);
    job(failed())
        .when(fail(RUN_1, false, t(1101)))
        .then_expect_events(vec![]);
}

#[test]
fn report_run_failed_after_cancel_records_only_the_run() {
    job(cancelled_while_running())
        .when(fail(RUN_1, true, t(1100)))
        .then_expect_events(vec![run_failed(RUN_1, 1, Some(t(1010)), true, t(1100))]);
    job(cancelled_while_assigned())
        .when(fail(RUN_1, false, t(1006)))
        .then_expect_events(vec![run_failed(RUN_1, 1, None, false, t(1006))]);
}

#[test]
fn report_run_failed_before_start_is_a_spawn_failure() {
    job(assigned(1))
        .when(JobCommand::ReportRunFailed {
            run_id: RUN_1,
            executor_id: EXECUTOR.to_string(),
            exit_code: None,
            signal: None,
            reason: "spawn failed: python: not found".to_string(),
            retryable: true,
            utilisation: None,
            at: t(1002),
        })
        .then_expect_events(vec![
            JobEvent::RunFailed {
                run_id: RUN_1,
                attempt: 1,
                executor_id: EXECUTOR.to_string(),
                gpu_uuids: gpus(),
                started_at: None,
                exit_code: None,
                signal: None,
                reason: "spawn failed: python: not found".to_string(),
                retryable: true,
                utilisation: None,
                at: t(1002),
            },
            retry_scheduled(2, RUN_1, 10, t(1002)),
        ]);
}

#[test]
fn report_run_failed_of_a_finished_run_is_refused() {
    job(succeeded())
        .when(fail(RUN_1, true, t(1101)))
        .then_expect_error(JobError::RunNotActive {
            run_id: RUN_1,
            state: RunState::Succeeded,
            action: "report failure",
        });
}

#[test]
fn report_run_failed_needs_a_reason() {
    let mut command = fail(RUN_1, true, t(1100));
    if let JobCommand::ReportRunFailed { reason, .. } = &mut command {
        reason.clear();
    }
    job(running(1))
        .when(command)
        .then_expect_error(invalid("reason", "must not be empty"));
}

#[test]
fn report_run_failed_by_another_executor_is_refused() {
    let mut command = fail(RUN_1, true, t(1100));
    if let JobCommand::ReportRunFailed { executor_id, .. } = &mut command {
        *executor_id = OTHER_EXECUTOR.to_string();
    }
    job(running(1))
        .when(command)
        .then_expect_error(JobError::WrongExecutor {
            run_id: RUN_1,
            assigned_to: EXECUTOR.to_string(),
            reported_by: OTHER_EXECUTOR.to_string(),
        });
}

// ---------------------------------------------------------------------------------------------
// ReportRunTimedOut
// ---------------------------------------------------------------------------------------------

#[test]
fn report_run_timed_out_schedules_a_retry() {
    job(running(1))
        .when(time_out(RUN_1, t(4610)))
        .then_expect_events(vec![
            run_timed_out(RUN_1, 1, Some(t(1010)), t(4610)),
            retry_scheduled(2, RUN_1, 10, t(4610)),
        ]);
}

#[test]
fn report_run_timed_out_with_retries_exhausted_fails_the_job() {
    job(running(3))
        .when(time_out(RUN_3, t(6610)))
        .then_expect_events(vec![
            run_timed_out(RUN_3, 3, Some(t(3010)), t(6610)),
            job_failed(
                "retries exhausted after 3 attempts: run exceeded its timeout of 3600 s",
                3,
                RUN_3,
                t(6610),
            ),
        ]);
}

#[test]
fn report_run_timed_out_twice_records_nothing() {
    let timed_out = concat(&[
        running(1),
        vec![
            run_timed_out(RUN_1, 1, Some(t(1010)), t(4610)),
            retry_scheduled(2, RUN_1, 10, t(4610)),
        ],
    ]);
    job(timed_out)
        .when(time_out(RUN_1, t(4611)))
        .then_expect_events(vec![]);
}

#[test]
fn report_run_timed_out_after_cancel_records_only_the_run() {
    job(cancelled_while_running())
        .when(time_out(RUN_1, t(4610)))
        .then_expect_events(vec![run_timed_out(RUN_1, 1, Some(t(1010)), t(4610))]);
}

#[test]
fn report_run_timed_out_of_a_run_that_is_not_running_is_refused() {
    job(assigned(1))
        .when(time_out(RUN_1, t(4610)))
        .then_expect_error(JobError::RunNotActive {
            run_id: RUN_1,
            state: RunState::Assigned,
            action: "report a timeout",
        });
    job(in_backoff(1))
        .when(time_out(RUN_1, t(4610)))
        .then_expect_error(JobError::RunNotActive {
            run_id: RUN_1,
            state: RunState::Failed,
            action: "report a timeout",
        });
}

// ---------------------------------------------------------------------------------------------
// RetryJob
// ---------------------------------------------------------------------------------------------

#[test]
fn retry_a_failed_job_schedules_the_next_attempt_at_once() {
    job(failed())
        .when(retry("ana", t(5000)))
        .then_expect_events(vec![manual_retry_scheduled(2, RUN_1, t(5000))]);
}

#[test]
fn retry_a_job_whose_retries_are_exhausted_allows_one_more_attempt() {
    job(retries_exhausted())
        .when(retry("ana", t(5000)))
        .then_expect_events(vec![manual_retry_scheduled(4, RUN_3, t(5000))]);

    let retried = concat(&[
        retries_exhausted(),
        vec![manual_retry_scheduled(4, RUN_3, t(5000))],
    ]);
    job(retried.clone())
        .when(assign(RUN_4, t(5000)))
        .then_expect_events(vec![run_assigned(RUN_4, 4, t(5000))]);

    // That one attempt is all: its retryable failure fails the job again.
    let fourth_running = concat(&[
        retried,
        vec![
            run_assigned(RUN_4, 4, t(5000)),
            run_started(RUN_4, 4, t(5010)),
        ],
    ]);
    job(fourth_running)
        .when(fail(RUN_4, true, t(5100)))
        .then_expect_events(vec![
            run_failed(RUN_4, 4, Some(t(5010)), true, t(5100)),
            job_failed(
                "retries exhausted after 4 attempts: exit status 1",
                4,
                RUN_4,
                t(5100),
            ),
        ]);
}

#[test]
fn retry_a_job_that_has_not_failed_is_refused() {
    for (given, state) in [
        (queued(), JobState::Queued),
        (in_backoff(1), JobState::Queued),
        (running(1), JobState::Running),
        (succeeded(), JobState::Succeeded),
        (cancelled_while_queued(), JobState::Cancelled),
    ] {
        job(given)
            .when(retry("ana", t(5000)))
            .then_expect_error(JobError::NotRetryable { state });
    }
}

#[test]
fn retry_needs_someone_to_ask_for_it() {
    job(failed())
        .when(retry("", t(5000)))
        .then_expect_error(invalid("by", "must not be empty"));
}

/// `Job::attempts_allowed` is documented as "`1 + max_retries`, plus one per manual retry",
/// so a manual retry keeps the automatic retries a job had left when it failed for a
/// non-retryable reason.
#[test]
fn retry_after_a_non_retryable_failure_keeps_the_automatic_retries_left() {
    // max_retries = 2; attempt 1 failed non-retryably, so both retries are unused.
    let retried = concat(&[failed(), vec![manual_retry_scheduled(2, RUN_1, t(5000))]]);
    assert_eq!(replay(&retried).attempts_allowed, 3 + 1);

    let second_running = concat(&[
        retried,
        vec![
            run_assigned(RUN_2, 2, t(5000)),
            run_started(RUN_2, 2, t(5010)),
        ],
    ]);
    job(second_running)
        .when(fail(RUN_2, true, t(5100)))
        .then_expect_events(vec![
            run_failed(RUN_2, 2, Some(t(5010)), true, t(5100)),
            retry_scheduled(3, RUN_2, 20, t(5100)),
        ]);
}

// ---------------------------------------------------------------------------------------------
// A whole life, and the state it leaves
// ---------------------------------------------------------------------------------------------

/// Runs `command` against the history through the test framework and appends its events.
fn step(history: &mut Vec<JobEvent>, command: JobCommand) -> Vec<JobEvent> {
    let name = command.name();
    let events = job(history.clone())
        .when(command)
        .inspect_result()
        .unwrap_or_else(|err| panic!("{name} refused: {err}"));
    history.extend(events.clone());
    events
}

#[test]
fn a_job_that_fails_once_and_then_succeeds() {
    let mut history = Vec::new();
    step(&mut history, submit(spec()));
    step(&mut history, assign(RUN_1, t(1000)));
    step(&mut history, start(RUN_1, t(1010)));
    step(
        &mut history,
        progress(RUN_1, 1, Some(0.4), &[("loss", 0.7)], t(1050)),
    );
    let failure = step(&mut history, fail(RUN_1, true, t(1100)));
    assert_eq!(failure[1], retry_scheduled(2, RUN_1, 10, t(1100)));
    assert_eq!(
        job(history.clone())
            .when(assign(RUN_2, t(1105)))
            .inspect_result(),
        Err(JobError::InBackoff { until: t(1110) })
    );
    step(&mut history, assign(RUN_2, t(1110)));
    step(&mut history, start(RUN_2, t(1120)));
    let success = step(&mut history, succeed(RUN_2, t(1500)));
    assert_eq!(
        success,
        vec![
            run_succeeded(RUN_2, 2, Some(t(1120)), t(1500)),
            job_succeeded(RUN_2, 2, t(1500)),
        ]
    );

    let types: Vec<String> = history
        .iter()
        .map(cqrs_es::DomainEvent::event_type)
        .collect();
    assert_eq!(
        types,
        [
            "JobSubmitted",
            "RunAssigned",
            "RunStarted",
            "RunProgressed",
            "RunFailed",
            "RetryScheduled",
            "RunAssigned",
            "RunStarted",
            "RunSucceeded",
            "JobSucceeded",
        ]
    );

    assert_eq!(
        replay(&history),
        Job {
            spec: Some(spec()),
            state: Some(JobState::Succeeded),
            runs: vec![
                Run {
                    run_id: RUN_1,
                    attempt: 1,
                    executor_id: EXECUTOR.to_string(),
                    gpu_uuids: gpus(),
                    state: RunState::Failed,
                    started_at: Some(t(1010)),
                    last_report_seq: Some(1),
                },
                Run {
                    run_id: RUN_2,
                    attempt: 2,
                    executor_id: EXECUTOR.to_string(),
                    gpu_uuids: gpus(),
                    state: RunState::Succeeded,
                    started_at: Some(t(1120)),
                    last_report_seq: None,
                },
            ],
            eligible_at: None,
            attempts_allowed: 3,
        }
    );
}

#[test]
fn replay_keeps_a_cancelled_job_cancelled_when_its_run_ends() {
    let mut history = cancelled_while_running();
    step(&mut history, fail(RUN_1, true, t(1100)));
    let job = replay(&history);
    assert_eq!(job.state, Some(JobState::Cancelled));
    assert_eq!(job.runs[0].state, RunState::Failed);
}

#[test]
fn replay_of_a_priority_change_updates_the_spec() {
    let job = replay(&concat(&[queued(), vec![priority_changed(50, 80, t(5))]]));
    assert_eq!(job.spec.map(|spec| spec.priority), Some(80));
}

// ---------------------------------------------------------------------------------------------
// RetryPolicy
// ---------------------------------------------------------------------------------------------

#[test]
fn default_backoff_doubles_from_ten_seconds_up_to_ten_minutes() {
    let policy = RetryPolicy::default();
    let backoffs: Vec<u64> = (1..=8).map(|attempt| policy.backoff_s(attempt)).collect();
    assert_eq!(backoffs, [10, 20, 40, 80, 160, 320, 600, 600]);
    // Attempt 0 does not exist; it is treated like the first.
    assert_eq!(policy.backoff_s(0), 10);
}

#[test]
fn backoff_of_huge_attempt_numbers_does_not_overflow() {
    let policy = RetryPolicy::default();
    assert_eq!(policy.backoff_s(33), 600);
    assert_eq!(policy.backoff_s(64), 600);
    assert_eq!(policy.backoff_s(u32::MAX), 600);

    let uncapped = RetryPolicy {
        base_backoff_s: 1,
        max_backoff_s: u64::MAX,
    };
    assert_eq!(uncapped.backoff_s(33), 1 << 32);
    assert_eq!(uncapped.backoff_s(u32::MAX), 1 << 32);

    let huge_base = RetryPolicy {
        base_backoff_s: u64::MAX / 2,
        max_backoff_s: u64::MAX,
    };
    assert_eq!(huge_base.backoff_s(3), u64::MAX);
}

#[test]
fn backoff_never_exceeds_the_cap_even_below_the_base() {
    let policy = RetryPolicy {
        base_backoff_s: 100,
        max_backoff_s: 30,
    };
    assert_eq!(policy.backoff_s(1), 30);
}
