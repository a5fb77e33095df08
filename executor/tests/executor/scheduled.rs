//! The executors with the command service's scheduler: submitted jobs are assigned, run on
//! simulated GPUs and end; a failing job is retried after its backoff, then fails.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::helpers::{self, count, tiles};

/// When a GPU was held: from the run's assignment to its end.
type Span = (DateTime<Utc>, DateTime<Utc>);

fn at(payload: &Value) -> DateTime<Utc> {
    payload["at"].as_str().unwrap().parse().unwrap()
}

#[tokio::test]
async fn scheduled_jobs_run_on_the_executors_and_no_gpu_is_held_twice() {
    let h = helpers::start_with(true).await;
    let _a = h.executor("sched-a", "sim:2xH100-80GB", &[], 1).await;
    let _b = h
        .executor("sched-b", "sim:2xA100-40GB,2xL4-24GB", &[], 1)
        .await;
    let mut jobs = Vec::new();
    for n in 0..8u8 {
        let ms = (20 + 10 * u32::from(n % 3)).to_string();
        jobs.push(
            h.submit(
                &tiles(&["--tiles", "6", "--ms-per-tile", &ms]),
                1 + n % 2,
                600,
                0,
            )
            .await,
        );
    }
    let failing = h
        .submit(
            &tiles(&[
                "--tiles",
                "3",
                "--ms-per-tile",
                "10",
                "--fail-at",
                "2",
                "--exit-code",
                "3",
            ]),
            1,
            600,
            1,
        )
        .await;

    let mut all: HashMap<Uuid, Vec<(String, Value)>> = HashMap::new();
    for &job in &jobs {
        all.insert(job, h.wait_for_event(job, "JobSucceeded").await);
    }
    let failed = h.wait_for_event(failing, "JobFailed").await;
    // Failed, retried after its backoff on a new run, failed again: the job fails.
    assert_eq!(count(&failed, "RunAssigned"), 2, "{failed:?}");
    assert_eq!(count(&failed, "RunFailed"), 2);
    assert_eq!(count(&failed, "RetryScheduled"), 1);
    for (t, p) in &failed {
        if t == "RunFailed" {
            assert_eq!(p["RunFailed"]["exit_code"], 3);
        }
    }
    all.insert(failing, failed);

    assert_no_gpu_held_twice(&all);
}

/// No GPU was held by two runs at once (from a run's assignment to its end), and every run
/// ended.
fn assert_no_gpu_held_twice(all: &HashMap<Uuid, Vec<(String, Value)>>) {
    let mut held: HashMap<String, Vec<Span>> = HashMap::new();
    for events in all.values() {
        let mut open: HashMap<String, (DateTime<Utc>, Vec<String>)> = HashMap::new();
        for (t, p) in events {
            let p = &p[t];
            match t.as_str() {
                "RunAssigned" => {
                    let gpus = serde_json::from_value(p["gpu_uuids"].clone()).unwrap();
                    open.insert(p["run_id"].as_str().unwrap().into(), (at(p), gpus));
                }
                "RunSucceeded" | "RunFailed" | "RunTimedOut" => {
                    let (from, gpus) = open.remove(p["run_id"].as_str().unwrap()).unwrap();
                    for gpu in gpus {
                        held.entry(gpu).or_default().push((from, at(p)));
                    }
                }
                _ => {}
            }
        }
        assert!(open.is_empty(), "a run never ended: {open:?}");
    }
    for (gpu, mut spans) in held {
        spans.sort();
        for pair in spans.windows(2) {
            assert!(pair[0].1 <= pair[1].0, "GPU {gpu} held twice: {pair:?}");
        }
    }
}

/// Issue #4's test 1: three executors with simulated GPUs, 60 jobs of mixed priority, account,
/// GPU count and memory: every job ends succeeded, no GPU is ever held by two runs, and each
/// job ran where it fits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sixty_mixed_jobs_on_three_executors_all_succeed_without_double_booking() {
    let h = helpers::start_with(true).await;
    let _a = h.executor("mix-a", "sim:4xH100-80GB", &[], 1).await;
    let _b = h.executor("mix-b", "sim:4xA100-40GB", &[], 1).await;
    let _c = h.executor("mix-c", "sim:2xL4-24GB", &[], 1).await;
    let mut jobs = Vec::new();
    for n in 0..60usize {
        let gpus = [1, 1, 2, 4][n % 4];
        // Every fourth job needs 80 GB GPUs (only mix-a has them); others fit anywhere big
        // enough for their GPU count.
        let memory = if n % 4 == 3 {
            80_000
        } else {
            [0, 16_000, 24_000][n % 3]
        };
        let ms = (10 + 10 * (n % 3)).to_string();
        let account = ["geo", "vision", "nlp"][n % 3];
        let response = h
            .post(
                "/jobs",
                &serde_json::json!({
                    "name": format!("mix-{n}"), "account": account,
                    "submitted_by": "ana", "priority": (n * 37) % 101, "gpus": gpus,
                    "gpu_memory_mb": memory,
                    "command": tiles(&["--tiles", "4", "--ms-per-tile", &ms]),
                    "max_retries": 0, "timeout_s": 600,
                }),
            )
            .await;
        assert_eq!(response.status(), 201);
        let id: Uuid = response.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        jobs.push((id, gpus, memory));
    }
    let mut all: HashMap<Uuid, Vec<(String, Value)>> = HashMap::new();
    for &(job, gpus, memory) in &jobs {
        let events = h.wait_for_event(job, "JobSucceeded").await;
        assert_eq!(count(&events, "RunAssigned"), 1, "{events:?}");
        let assigned = &events.iter().find(|(t, _)| t == "RunAssigned").unwrap().1["RunAssigned"];
        assert_eq!(assigned["gpu_uuids"].as_array().unwrap().len(), gpus);
        let executor = assigned["executor_id"].as_str().unwrap();
        if memory == 80_000 {
            assert_eq!(executor, "mix-a", "{assigned}");
        }
        if gpus == 4 && memory > 40_960 {
            assert_eq!(executor, "mix-a");
        }
        if memory > 24_576 || gpus > 2 {
            assert_ne!(executor, "mix-c", "{assigned}");
        }
        all.insert(job, events);
    }
    assert_no_gpu_held_twice(&all);
}

#[tokio::test]
async fn the_run_of_a_crashed_executor_is_retried_on_another_after_its_lease() {
    let h = helpers::start_with(true).await;
    let mut a = h
        .executor("lease-a", "sim:1xH100-80GB", &["--lease-s", "2"], 1)
        .await;
    let job = h
        .submit(&tiles(&["--tiles", "60", "--ms-per-tile", "50"]), 1, 600, 2)
        .await;
    let events = h.wait_for_event(job, "RunStarted").await;
    let first: Vec<_> = events.iter().filter(|(t, _)| t == "RunAssigned").collect();
    assert_eq!(first[0].1["RunAssigned"]["executor_id"], "lease-a");
    // A long lease: only the crashed executor may be found lost, however loaded this host.
    let _b = h.executor("lease-b", "sim:1xH100-80GB", &[], 1).await;
    a.crash();

    let events = h.wait_for_event(job, "JobSucceeded").await;
    let failed = events
        .iter()
        .find(|(t, _)| t == "RunFailed")
        .map(|(_, p)| &p["RunFailed"])
        .expect("the crashed executor's run failed");
    assert_eq!(failed["executor_id"], "lease-a");
    assert_eq!(failed["retryable"], true);
    let succeeded = events
        .iter()
        .find(|(t, _)| t == "RunSucceeded")
        .map(|(_, p)| &p["RunSucceeded"])
        .unwrap();
    assert_eq!(succeeded["executor_id"], "lease-b");
    assert!(
        h.executor_events("lease-a")
            .await
            .contains(&"ExecutorLost".to_string())
    );
}

/// A partitioned executor (frozen past its lease) comes back to find its run failed by the
/// scheduler: it stops the workload, reports nothing more, and registers again.
#[tokio::test]
async fn an_executor_back_from_a_partition_stops_the_runs_it_lost() {
    let h = helpers::start_with(true).await;
    let executor = h
        .executor("stale-a", "sim:1xH100-80GB", &["--lease-s", "2"], 1)
        .await;
    let job = h
        .submit(
            &tiles(&["--tiles", "100000", "--ms-per-tile", "50"]),
            1,
            600,
            0,
        )
        .await;
    let events = h.wait_for_event(job, "RunProgressed").await;
    let run: Uuid = crate::helpers::payload(&events, "RunAssigned")["run_id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let pid = h.wait_for_pid("stale-a", run).await;

    executor.signal(nix::sys::signal::Signal::SIGSTOP);
    let events = h.wait_for_event(job, "JobFailed").await;
    let recorded = events.len();
    assert!(
        helpers::group_alive(pid),
        "the workload runs on while its executor is frozen"
    );
    executor.signal(nix::sys::signal::Signal::SIGCONT);

    h.wait_until("the lost run's workload to be stopped", async || {
        !helpers::group_alive(pid)
    })
    .await;
    h.wait_for_done("stale-a", run).await;
    h.wait_until("the executor to register again", async || {
        h.executor_events("stale-a")
            .await
            .iter()
            .filter(|e| *e == "ExecutorRegistered")
            .count()
            == 2
    })
    .await;
    let after = h.events(job).await;
    assert_eq!(
        after.len(),
        recorded,
        "reported after the run was failed: {:?}",
        &after[recorded..]
    );
}
