//! Given/when/then tests of the `Executor` aggregate: every command, accepted and refused,
//! with the exact events or the exact error it must produce.
//!
//! The standard history: the executor registers at `t(0)` with a 30 s lease and two GPUs,
//! and sends its first heartbeat at `t(5)` (lease until `t(35)`).

use chrono::{DateTime, Duration, TimeZone, Utc};
use cqrs_es::Aggregate;
use cqrs_es::test::{AggregateTestExecutor, TestFramework};

use super::{Executor, ExecutorCommand, ExecutorError, ExecutorEvent, ExecutorState, GpuInfo};
use crate::FieldError;

const EXECUTOR_ID: &str = "gpu-host-1";
const HOSTNAME: &str = "gpu-host-1.lab.example";
const LEASE_S: u32 = 30;

fn t(s: i64) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2025, 3, 1, 12, 0, 0).unwrap() + Duration::seconds(s)
}

fn gpu(index: u32) -> GpuInfo {
    GpuInfo {
        uuid: format!("GPU-{index:04x}-5f1c"),
        index,
        name: "NVIDIA H100 80GB HBM3".to_string(),
        memory_mb: 81_559,
        compute_capability: "9.0".to_string(),
    }
}

fn gpus() -> Vec<GpuInfo> {
    vec![gpu(0), gpu(1)]
}

fn executor(given: Vec<ExecutorEvent>) -> AggregateTestExecutor<Executor> {
    TestFramework::<Executor>::with(()).given(given)
}

fn invalid(field: &str, message: &str) -> ExecutorError {
    ExecutorError::Invalid(FieldError::new(field, message))
}

fn replay(events: &[ExecutorEvent]) -> Executor {
    let mut executor = Executor::default();
    for event in events {
        executor.apply(event.clone());
    }
    executor
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

fn register_with(
    executor_id: &str,
    gpus: Vec<GpuInfo>,
    lease_s: u32,
    at: DateTime<Utc>,
) -> ExecutorCommand {
    ExecutorCommand::RegisterExecutor {
        executor_id: executor_id.to_string(),
        hostname: HOSTNAME.to_string(),
        gpus,
        lease_s,
        at,
    }
}

fn register(at: DateTime<Utc>) -> ExecutorCommand {
    register_with(EXECUTOR_ID, gpus(), LEASE_S, at)
}

fn heartbeat(at: DateTime<Utc>) -> ExecutorCommand {
    ExecutorCommand::Heartbeat { at }
}

fn drain(by: &str, at: DateTime<Utc>) -> ExecutorCommand {
    ExecutorCommand::Drain {
        by: by.to_string(),
        reason: "driver upgrade".to_string(),
        at,
    }
}

fn deregister(reason: &str, at: DateTime<Utc>) -> ExecutorCommand {
    ExecutorCommand::Deregister {
        reason: reason.to_string(),
        at,
    }
}

fn mark_lost(at: DateTime<Utc>) -> ExecutorCommand {
    ExecutorCommand::MarkLost { at }
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

fn registered(session: u32, at: DateTime<Utc>) -> ExecutorEvent {
    ExecutorEvent::ExecutorRegistered {
        executor_id: EXECUTOR_ID.to_string(),
        hostname: HOSTNAME.to_string(),
        gpus: gpus(),
        lease_s: LEASE_S,
        session,
        at,
    }
}

fn activated(at: DateTime<Utc>) -> ExecutorEvent {
    ExecutorEvent::ExecutorActivated { at }
}

fn heartbeat_recorded(at: DateTime<Utc>) -> ExecutorEvent {
    ExecutorEvent::ExecutorHeartbeat {
        lease_expires_at: at + Duration::seconds(i64::from(LEASE_S)),
        at,
    }
}

fn draining(at: DateTime<Utc>) -> ExecutorEvent {
    ExecutorEvent::ExecutorDraining {
        by: "ops".to_string(),
        reason: "driver upgrade".to_string(),
        at,
    }
}

fn deregistered(at: DateTime<Utc>) -> ExecutorEvent {
    ExecutorEvent::ExecutorDeregistered {
        reason: "shutdown".to_string(),
        at,
    }
}

fn lost(
    last_heartbeat_at: Option<DateTime<Utc>>,
    lease_expired_at: DateTime<Utc>,
    at: DateTime<Utc>,
) -> ExecutorEvent {
    ExecutorEvent::ExecutorLost {
        last_heartbeat_at,
        lease_expired_at,
        at,
    }
}

// ---------------------------------------------------------------------------------------------
// Histories (the "given")
// ---------------------------------------------------------------------------------------------

/// Registered at `t(0)`, never heartbeated.
fn just_registered() -> Vec<ExecutorEvent> {
    vec![registered(1, t(0))]
}

/// First heartbeat at `t(5)`: lease until `t(35)`.
fn active() -> Vec<ExecutorEvent> {
    vec![
        registered(1, t(0)),
        activated(t(5)),
        heartbeat_recorded(t(5)),
    ]
}

fn active_draining() -> Vec<ExecutorEvent> {
    [active(), vec![draining(t(10))]].concat()
}

/// Lease ran out at `t(35)`; marked lost at `t(40)`.
fn marked_lost() -> Vec<ExecutorEvent> {
    [active(), vec![lost(Some(t(5)), t(35), t(40))]].concat()
}

fn gone() -> Vec<ExecutorEvent> {
    [active(), vec![deregistered(t(20))]].concat()
}

#[test]
fn the_histories_reach_the_states_they_are_named_after() {
    let state = |events: Vec<ExecutorEvent>| replay(&events).state;
    assert_eq!(state(just_registered()), Some(ExecutorState::Registered));
    assert_eq!(state(active()), Some(ExecutorState::Active));
    assert_eq!(state(active_draining()), Some(ExecutorState::Draining));
    assert_eq!(state(marked_lost()), Some(ExecutorState::Lost));
    assert_eq!(state(gone()), Some(ExecutorState::Gone));
}

// ---------------------------------------------------------------------------------------------
// RegisterExecutor
// ---------------------------------------------------------------------------------------------

#[test]
fn register_starts_the_first_session() {
    executor(vec![])
        .when(register(t(0)))
        .then_expect_events(vec![registered(1, t(0))]);
}

#[test]
fn register_again_after_a_restart_starts_a_new_session() {
    for given in [
        just_registered(),
        active(),
        active_draining(),
        marked_lost(),
        gone(),
    ] {
        executor(given)
            .when(register(t(100)))
            .then_expect_events(vec![registered(2, t(100))]);
    }
    let second_session = [marked_lost(), vec![registered(2, t(100))]].concat();
    executor(second_session)
        .when(register(t(200)))
        .then_expect_events(vec![registered(3, t(200))]);
}

#[test]
fn register_without_gpus_is_invalid() {
    executor(vec![])
        .when(register_with(EXECUTOR_ID, vec![], LEASE_S, t(0)))
        .then_expect_error(invalid("gpus", "an executor has 1 to 64 GPUs"));
}

#[test]
fn register_a_duplicate_gpu_uuid_is_invalid() {
    let mut second = gpu(1);
    second.uuid = gpu(0).uuid;
    executor(vec![])
        .when(register_with(
            EXECUTOR_ID,
            vec![gpu(0), second],
            LEASE_S,
            t(0),
        ))
        .then_expect_error(invalid("gpus[1].uuid", "duplicate GPU uuid"));
}

#[test]
fn register_a_duplicate_gpu_index_is_invalid() {
    let mut second = gpu(1);
    second.index = 0;
    executor(vec![])
        .when(register_with(
            EXECUTOR_ID,
            vec![gpu(0), second],
            LEASE_S,
            t(0),
        ))
        .then_expect_error(invalid("gpus[1].index", "duplicate GPU index"));
}

#[test]
fn register_a_malformed_compute_capability_is_invalid() {
    for capability in ["9", "nine.0", "9.", "", "9.0.1"] {
        let mut bad = gpu(1);
        bad.compute_capability = capability.to_string();
        executor(vec![])
            .when(register_with(EXECUTOR_ID, vec![gpu(0), bad], LEASE_S, t(0)))
            .then_expect_error(invalid(
                "gpus[1].compute_capability",
                "must be major.minor, e.g. 9.0",
            ));
    }
}

#[test]
fn register_a_gpu_without_memory_is_invalid() {
    let mut bad = gpu(0);
    bad.memory_mb = 0;
    executor(vec![])
        .when(register_with(EXECUTOR_ID, vec![bad], LEASE_S, t(0)))
        .then_expect_error(invalid(
            "gpus[0].memory_mb",
            "must be between 1 and 1048576, got 0",
        ));
}

#[test]
fn register_a_malformed_executor_id_is_invalid() {
    executor(vec![])
        .when(register_with("gpu.host.1", gpus(), LEASE_S, t(0)))
        .then_expect_error(invalid(
            "executor_id",
            "may contain only letters, digits, '_' and '-'",
        ));
    executor(vec![])
        .when(register_with("", gpus(), LEASE_S, t(0)))
        .then_expect_error(invalid("executor_id", "must be 1 to 64 characters"));
}

#[test]
fn register_with_a_lease_out_of_range_is_invalid() {
    executor(vec![])
        .when(register_with(EXECUTOR_ID, gpus(), 0, t(0)))
        .then_expect_error(invalid("lease_s", "must be between 1 and 3600, got 0"));
    executor(vec![])
        .when(register_with(EXECUTOR_ID, gpus(), 3601, t(0)))
        .then_expect_error(invalid("lease_s", "must be between 1 and 3600, got 3601"));
}

#[test]
fn register_without_a_hostname_is_invalid() {
    executor(vec![])
        .when(ExecutorCommand::RegisterExecutor {
            executor_id: EXECUTOR_ID.to_string(),
            hostname: " ".to_string(),
            gpus: gpus(),
            lease_s: LEASE_S,
            at: t(0),
        })
        .then_expect_error(invalid("hostname", "must not be empty"));
}

// ---------------------------------------------------------------------------------------------
// Heartbeat
// ---------------------------------------------------------------------------------------------

#[test]
fn first_heartbeat_activates_the_executor_and_extends_its_lease() {
    executor(just_registered())
        .when(heartbeat(t(5)))
        .then_expect_events(vec![
            activated(t(5)),
            ExecutorEvent::ExecutorHeartbeat {
                lease_expires_at: t(35),
                at: t(5),
            },
        ]);
}

#[test]
fn later_heartbeats_only_extend_the_lease() {
    executor(active())
        .when(heartbeat(t(20)))
        .then_expect_events(vec![ExecutorEvent::ExecutorHeartbeat {
            lease_expires_at: t(50),
            at: t(20),
        }]);
    executor(active_draining())
        .when(heartbeat(t(20)))
        .then_expect_events(vec![heartbeat_recorded(t(20))]);
}

#[test]
fn first_heartbeat_of_a_new_session_activates_it_again() {
    let re_registered = [marked_lost(), vec![registered(2, t(100))]].concat();
    executor(re_registered)
        .when(heartbeat(t(101)))
        .then_expect_events(vec![activated(t(101)), heartbeat_recorded(t(101))]);
}

#[test]
fn heartbeat_of_a_lost_or_gone_executor_is_refused() {
    executor(marked_lost())
        .when(heartbeat(t(41)))
        .then_expect_error(ExecutorError::NotRegistered {
            state: ExecutorState::Lost,
        });
    executor(gone())
        .when(heartbeat(t(21)))
        .then_expect_error(ExecutorError::NotRegistered {
            state: ExecutorState::Gone,
        });
}

#[test]
fn heartbeat_of_an_unknown_executor_is_not_found() {
    executor(vec![])
        .when(heartbeat(t(5)))
        .then_expect_error(ExecutorError::NotFound);
}

// ---------------------------------------------------------------------------------------------
// Drain
// ---------------------------------------------------------------------------------------------

#[test]
fn drain_an_active_or_registered_executor() {
    executor(active())
        .when(drain("ops", t(10)))
        .then_expect_events(vec![draining(t(10))]);
    executor(just_registered())
        .when(drain("ops", t(10)))
        .then_expect_events(vec![draining(t(10))]);
}

#[test]
fn drain_twice_records_nothing() {
    executor(active_draining())
        .when(drain("ops", t(11)))
        .then_expect_events(vec![]);
}

#[test]
fn drain_a_lost_or_gone_executor_is_refused() {
    executor(marked_lost())
        .when(drain("ops", t(41)))
        .then_expect_error(ExecutorError::NotRegistered {
            state: ExecutorState::Lost,
        });
    executor(gone())
        .when(drain("ops", t(21)))
        .then_expect_error(ExecutorError::NotRegistered {
            state: ExecutorState::Gone,
        });
}

#[test]
fn drain_an_unknown_executor_is_not_found() {
    executor(vec![])
        .when(drain("ops", t(10)))
        .then_expect_error(ExecutorError::NotFound);
}

#[test]
fn drain_needs_someone_to_ask_for_it() {
    executor(active())
        .when(drain("", t(10)))
        .then_expect_error(invalid("by", "must not be empty"));
}

// ---------------------------------------------------------------------------------------------
// Deregister
// ---------------------------------------------------------------------------------------------

#[test]
fn deregister_from_any_live_state() {
    for given in [
        just_registered(),
        active(),
        active_draining(),
        marked_lost(),
    ] {
        executor(given)
            .when(deregister("shutdown", t(60)))
            .then_expect_events(vec![deregistered(t(60))]);
    }
}

#[test]
fn deregister_twice_records_nothing() {
    executor(gone())
        .when(deregister("shutdown", t(21)))
        .then_expect_events(vec![]);
}

#[test]
fn deregister_an_unknown_executor_is_not_found() {
    executor(vec![])
        .when(deregister("shutdown", t(21)))
        .then_expect_error(ExecutorError::NotFound);
}

#[test]
fn deregister_needs_a_reason() {
    executor(active())
        .when(deregister("", t(21)))
        .then_expect_error(invalid("reason", "must not be empty"));
}

// ---------------------------------------------------------------------------------------------
// MarkLost
// ---------------------------------------------------------------------------------------------

#[test]
fn mark_lost_before_the_lease_expires_is_refused() {
    executor(active())
        .when(mark_lost(t(34)))
        .then_expect_error(ExecutorError::LeaseNotExpired { until: t(35) });
}

#[test]
fn mark_lost_once_the_lease_expired() {
    executor(active())
        .when(mark_lost(t(35)))
        .then_expect_events(vec![lost(Some(t(5)), t(35), t(35))]);
    executor(active())
        .when(mark_lost(t(40)))
        .then_expect_events(vec![lost(Some(t(5)), t(35), t(40))]);
    executor(active_draining())
        .when(mark_lost(t(40)))
        .then_expect_events(vec![lost(Some(t(5)), t(35), t(40))]);
}

#[test]
fn mark_lost_counts_from_the_latest_heartbeat() {
    let later_heartbeat = [active(), vec![heartbeat_recorded(t(20))]].concat();
    executor(later_heartbeat.clone())
        .when(mark_lost(t(40)))
        .then_expect_error(ExecutorError::LeaseNotExpired { until: t(50) });
    executor(later_heartbeat)
        .when(mark_lost(t(50)))
        .then_expect_events(vec![lost(Some(t(20)), t(50), t(50))]);
}

#[test]
fn mark_lost_of_an_executor_that_never_heartbeated_counts_from_registration() {
    executor(just_registered())
        .when(mark_lost(t(29)))
        .then_expect_error(ExecutorError::LeaseNotExpired { until: t(30) });
    executor(just_registered())
        .when(mark_lost(t(31)))
        .then_expect_events(vec![lost(None, t(30), t(31))]);
}

#[test]
fn mark_lost_of_a_new_session_ignores_the_old_lease() {
    let re_registered = [marked_lost(), vec![registered(2, t(100))]].concat();
    executor(re_registered.clone())
        .when(mark_lost(t(120)))
        .then_expect_error(ExecutorError::LeaseNotExpired { until: t(130) });
    executor(re_registered)
        .when(mark_lost(t(130)))
        .then_expect_events(vec![lost(None, t(130), t(130))]);
}

#[test]
fn mark_lost_twice_records_nothing() {
    executor(marked_lost())
        .when(mark_lost(t(45)))
        .then_expect_events(vec![]);
}

#[test]
fn mark_lost_of_a_gone_executor_is_refused() {
    executor(gone())
        .when(mark_lost(t(100)))
        .then_expect_error(ExecutorError::Gone);
}

#[test]
fn mark_lost_of_an_unknown_executor_is_not_found() {
    executor(vec![])
        .when(mark_lost(t(100)))
        .then_expect_error(ExecutorError::NotFound);
}

// ---------------------------------------------------------------------------------------------
// The state events leave
// ---------------------------------------------------------------------------------------------

#[test]
fn replay_rebuilds_the_executor() {
    let history = [active(), vec![heartbeat_recorded(t(20)), draining(t(25))]].concat();
    assert_eq!(
        replay(&history),
        Executor {
            state: Some(ExecutorState::Draining),
            gpus: gpus(),
            lease_s: LEASE_S,
            session: 1,
            registered_at: Some(t(0)),
            last_heartbeat_at: Some(t(20)),
            lease_expires_at: Some(t(50)),
        }
    );
}

#[test]
fn replay_of_a_new_registration_forgets_the_old_session() {
    let history = [marked_lost(), vec![registered(2, t(100))]].concat();
    assert_eq!(
        replay(&history),
        Executor {
            state: Some(ExecutorState::Registered),
            gpus: gpus(),
            lease_s: LEASE_S,
            session: 2,
            registered_at: Some(t(100)),
            last_heartbeat_at: None,
            lease_expires_at: None,
        }
    );
}
