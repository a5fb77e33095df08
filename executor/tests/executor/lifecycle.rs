//! The executor's own lifecycle: a restart loses no assignment; SIGTERM drains.

use nix::sys::signal::Signal;

use crate::helpers::{self, count, group_alive, payload, tiles, uuids};

#[tokio::test]
async fn runs_assigned_while_the_executor_was_down_run_after_it_restarts() {
    let h = helpers::start().await;
    let mut executor = h.executor("gpu-host-r", "sim:4xH100-80GB", &[], 1).await;
    let gpus = h.gpus_of("gpu-host-r").await;

    // A run in progress when the executor crashes (SIGKILL): its workload survives the crash
    // as an orphan.
    let orphan_job = h
        .submit(
            &tiles(&["--tiles", "1", "--ms-per-tile", "10", "--hang"]),
            1,
            600,
            1,
        )
        .await;
    let (orphan_run, _) = h
        .assign(orphan_job, "gpu-host-r", &uuids(&gpus, &[0]))
        .await;
    h.wait_for_event(orphan_job, "RunStarted").await;
    let orphan_pid = h.wait_for_pid("gpu-host-r", orphan_run).await;
    executor.crash();
    assert!(
        group_alive(orphan_pid),
        "the workload outlives the crashed executor"
    );

    // Assigned while nobody consumes the executor's events.
    let job = h
        .submit(&tiles(&["--tiles", "5", "--ms-per-tile", "20"]), 2, 600, 0)
        .await;
    let (run, _) = h.assign(job, "gpu-host-r", &uuids(&gpus, &[2, 3])).await;

    let _restarted = h.executor("gpu-host-r", "sim:4xH100-80GB", &[], 2).await;
    let events = h.wait_for_event(job, "JobSucceeded").await;
    assert_eq!(payload(&events, "RunSucceeded")["run_id"], run.to_string());
    assert_eq!(count(&events, "RunSucceeded"), 1);

    // The orphan is killed, and its run reported failed (retryable) by the new process.
    let orphan_events = h.wait_for_event(orphan_job, "RunFailed").await;
    let failed = payload(&orphan_events, "RunFailed");
    assert_eq!(failed["run_id"], orphan_run.to_string());
    assert_eq!(
        failed["reason"],
        "executor restarted while the run was running"
    );
    assert_eq!(failed["retryable"], true);
    h.wait_until("the orphaned workload to be killed", async || {
        !group_alive(orphan_pid)
    })
    .await;
}

#[tokio::test]
async fn sigterm_drains_lets_short_work_finish_and_stops_the_rest() {
    let h = helpers::start().await;
    let mut executor = h
        .executor(
            "gpu-host-s",
            "sim:2xH100-80GB",
            &["--drain-grace-s", "6"],
            1,
        )
        .await;
    let gpus = h.gpus_of("gpu-host-s").await;
    let short = h
        .submit(&tiles(&["--tiles", "40", "--ms-per-tile", "50"]), 1, 600, 0)
        .await;
    let long = h
        .submit(
            &tiles(&["--tiles", "1", "--ms-per-tile", "10", "--hang"]),
            1,
            600,
            1,
        )
        .await;
    let (short_run, _) = h.assign(short, "gpu-host-s", &uuids(&gpus, &[0])).await;
    let (long_run, _) = h.assign(long, "gpu-host-s", &uuids(&gpus, &[1])).await;
    h.wait_for_event(short, "RunStarted").await;
    h.wait_for_event(long, "RunStarted").await;
    let long_pid = h.wait_for_pid("gpu-host-s", long_run).await;

    executor.signal(Signal::SIGTERM);
    h.wait_until("the executor to drain", async || {
        h.executor_events("gpu-host-s")
            .await
            .contains(&"ExecutorDraining".to_string())
    })
    .await;
    // Short work finishes within the grace …
    let events = h.wait_for_event(short, "JobSucceeded").await;
    assert_eq!(
        payload(&events, "RunSucceeded")["run_id"],
        short_run.to_string()
    );
    // … the rest is stopped after it and reported failed, retryable.
    let events = h.wait_for_event(long, "RunFailed").await;
    let failed = payload(&events, "RunFailed");
    assert_eq!(failed["run_id"], long_run.to_string());
    assert_eq!(failed["reason"], "executor shut down");
    assert_eq!(failed["retryable"], true);
    assert_eq!(
        count(&events, "RetryScheduled"),
        1,
        "the job gets another attempt"
    );
    assert!(!group_alive(long_pid));

    let status = executor.exited(std::time::Duration::from_secs(30)).await;
    assert!(status.success(), "{status:?}");
    let lifecycle = h.executor_events("gpu-host-s").await;
    assert_eq!(
        lifecycle.last().map(String::as_str),
        Some("ExecutorDeregistered"),
        "{lifecycle:?}"
    );
    let draining = lifecycle
        .iter()
        .position(|e| e == "ExecutorDraining")
        .unwrap();
    assert!(draining < lifecycle.len() - 1);
}
