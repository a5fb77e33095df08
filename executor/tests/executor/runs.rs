//! One run from assignment to its end: success with progress, logs and utilisation; cancel;
//! timeout; failure.

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use serde_json::{Value, json};
use std::time::Duration;

use crate::helpers::{self, count, group_alive, payload, tiles, uuids};

#[tokio::test]
async fn an_assigned_run_gets_its_gpus_and_reports_progress_logs_and_success_once() {
    let h = helpers::start().await;
    let _executor = h.executor("gpu-host-a", "sim:4xH100-80GB", &[], 1).await;
    let gpus = h.gpus_of("gpu-host-a").await;
    assert_eq!(gpus.len(), 4);
    let job = h
        .submit(&tiles(&["--tiles", "24", "--ms-per-tile", "60"]), 2, 600, 0)
        .await;
    let (run, assigned) = h.assign(job, "gpu-host-a", &uuids(&gpus, &[1, 3])).await;
    let events = h.wait_for_event(job, "JobSucceeded").await;

    // CUDA_VISIBLE_DEVICES = exactly the assigned GPUs' indexes.
    let index_of = |uuid: &String| {
        gpus.iter().find(|g| g["uuid"] == uuid.as_str()).unwrap()["index"]
            .as_u64()
            .unwrap()
    };
    let visible = assigned
        .iter()
        .map(|u| index_of(u).to_string())
        .collect::<Vec<_>>()
        .join(",");
    let lines = h.wait_for_log(job, run, "done: 24 tiles").await;
    assert!(
        lines
            .iter()
            .any(|(s, l)| s == "stdout" && l.contains(&format!("CUDA_VISIBLE_DEVICES={visible} "))),
        "CUDA_VISIBLE_DEVICES={visible} not in {lines:?}"
    );
    assert!(
        lines
            .iter()
            .any(|(s, l)| s == "stderr" && l == "loading model weights for 2 GPU(s)")
    );
    assert!(lines.iter().any(|(_, l)| l.starts_with("tile 24/24")));

    // Progress: rate-limited, increasing report_seq, the last update always sent.
    let progressed: Vec<&Value> = events
        .iter()
        .filter(|(t, _)| t == "RunProgressed")
        .map(|(_, p)| &p["RunProgressed"])
        .collect();
    assert!(!progressed.is_empty());
    assert!(
        progressed.len() < 24,
        "not rate-limited: {} reports",
        progressed.len()
    );
    let seqs: Vec<u64> = progressed
        .iter()
        .map(|p| p["report_seq"].as_u64().unwrap())
        .collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
    let last = progressed.last().unwrap();
    assert_eq!(last["progress"], 1.0);
    assert_eq!(last["metrics"]["tiles_done"], 24.0);
    assert!(last["metrics"]["accuracy"].as_f64().unwrap() > 0.9);
    assert!(last["metrics"]["loss"].is_number());

    // The end, once, with the GPUs' utilisation from the (simulated) telemetry.
    assert_eq!(count(&events, "RunStarted"), 1);
    assert_eq!(count(&events, "RunSucceeded"), 1);
    assert_eq!(
        count(&events, "RunFailed") + count(&events, "RunTimedOut"),
        0
    );
    let succeeded = payload(&events, "RunSucceeded");
    assert_eq!(succeeded["run_id"], run.to_string());
    assert_eq!(succeeded["executor_id"], "gpu-host-a");
    let u = &succeeded["utilisation"];
    let sampled = u["gpu_seconds_sampled"].as_f64().unwrap();
    let busy = u["gpu_seconds_busy"].as_f64().unwrap();
    // Two GPUs for ~1.4 s, sampled every 200 ms.
    assert!(sampled > 1.0 && sampled < 2.0 * 10.0, "sampled {sampled}");
    assert!(
        busy > 0.5 * sampled && busy <= sampled,
        "busy {busy} of {sampled}"
    );
    assert!(u["peak_memory_mb"].as_u64().unwrap() > 40 * 1024);
    h.wait_for_done("gpu-host-a", run).await;

    // Telemetry: every GPU sampled; the run's GPUs busy and attributed to it.
    let js = jetstream::new(async_nats::connect(h.nats.url()).await.unwrap());
    let stream = js.get_stream("OVERFLY_TELEMETRY").await.unwrap();
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: format!("overfly.telemetry.gpu-host-a.{}", index_of(&assigned[0])),
            ack_policy: consumer::AckPolicy::None,
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer
        .fetch()
        .max_messages(500)
        .expires(Duration::from_secs(1))
        .messages()
        .await
        .unwrap();
    let mut busy_samples = 0;
    let mut samples = 0;
    while let Some(Ok(message)) = messages.next().await {
        let sample: Value = serde_json::from_slice(&message.payload).unwrap();
        samples += 1;
        assert_eq!(sample["backend"], "sim");
        if sample["run_id"] == json!(run.to_string()) {
            busy_samples += 1;
            assert!(sample["utilisation"].as_f64().unwrap() >= 0.5, "{sample}");
            assert!(sample["power_w"].as_f64().unwrap() > 300.0, "{sample}");
        }
    }
    assert!(
        samples > busy_samples && busy_samples >= 3,
        "{samples} samples, {busy_samples} busy"
    );
}

#[tokio::test]
async fn cancel_stops_the_process_group_and_its_end_is_reported_once() {
    let h = helpers::start().await;
    let _executor = h
        .executor("gpu-host-b", "sim:2xA100-40GB,2xL4-24GB", &[], 1)
        .await;
    let gpus = h.gpus_of("gpu-host-b").await;
    // Ignores SIGTERM: the executor has to escalate to SIGKILL after its grace.
    let job = h
        .submit(
            &tiles(&[
                "--tiles",
                "100000",
                "--ms-per-tile",
                "50",
                "--ignore-sigterm",
            ]),
            1,
            600,
            2,
        )
        .await;
    let (run, _) = h.assign(job, "gpu-host-b", &uuids(&gpus, &[2])).await;
    h.wait_for_event(job, "RunProgressed").await;
    let pid = h.wait_for_pid("gpu-host-b", run).await;
    let lines = h.wait_for_log(job, run, "overfly-tiles pid=").await;
    assert!(
        lines
            .iter()
            .any(|(_, l)| l.contains(&format!("pid={pid} pgid={pid} "))),
        "the workload leads its own process group: {lines:?}"
    );
    assert!(group_alive(pid));

    let cancel = h
        .post(
            &format!("/jobs/{job}/cancel"),
            &json!({"by": "ana", "reason": "wrong region"}),
        )
        .await;
    assert_eq!(cancel.status(), 200);
    h.wait_until("the workload's process group to be gone", async || {
        !group_alive(pid)
    })
    .await;
    h.wait_for_done("gpu-host-b", run).await;
    let events = h.wait_for_event(job, "RunFailed").await;
    let cancelled_at = events
        .iter()
        .position(|(t, _)| t == "JobCancelled")
        .unwrap();
    let after: Vec<&String> = events[cancelled_at + 1..].iter().map(|(t, _)| t).collect();
    // A progress report already on its way when the cancel was recorded may land after it
    // (the domain still accepts it); then the run's end, once: how the process was stopped
    // (SIGKILL: it ignored SIGTERM), not retryable, and no retry or job failure follows.
    assert_eq!(
        count(&events[cancelled_at + 1..], "RunFailed"),
        1,
        "{after:?}"
    );
    assert!(
        after
            .iter()
            .all(|t| *t == "RunProgressed" || *t == "RunFailed"),
        "reported after the cancel: {after:?}"
    );
    let end = payload(&events, "RunFailed");
    assert_eq!(end["signal"], 9, "{end}");
    assert_eq!(end["retryable"], false);
    assert!(
        end["reason"].as_str().unwrap().starts_with("cancelled"),
        "{end}"
    );
    assert!(
        end["utilisation"]["gpu_seconds_sampled"].as_f64().unwrap() > 0.0,
        "{end}"
    );
    assert_eq!(count(&events, "RetryScheduled"), 0);
    assert_eq!(count(&events, "JobFailed"), 0);
}

#[tokio::test]
async fn a_timeout_kills_the_workload_and_is_reported_once() {
    let h = helpers::start().await;
    let _executor = h.executor("gpu-host-c", "sim:2xH100-80GB", &[], 1).await;
    let gpus = h.gpus_of("gpu-host-c").await;
    let job = h
        .submit(
            &tiles(&["--tiles", "3", "--ms-per-tile", "10", "--hang"]),
            1,
            2,
            0,
        )
        .await;
    let (run, _) = h.assign(job, "gpu-host-c", &uuids(&gpus, &[0])).await;
    let pid = h.wait_for_pid("gpu-host-c", run).await;
    let events = h.wait_for_event(job, "RunTimedOut").await;
    assert!(!group_alive(pid), "the timed-out workload is gone");
    h.wait_for_done("gpu-host-c", run).await;
    let events = if count(&events, "JobFailed") == 0 {
        h.wait_for_event(job, "JobFailed").await
    } else {
        events
    };
    assert_eq!(count(&events, "RunTimedOut"), 1);
    assert_eq!(
        count(&events, "RunFailed") + count(&events, "RunSucceeded"),
        0
    );
    assert_eq!(payload(&events, "RunTimedOut")["timeout_s"], 2);
    let started = chrono::DateTime::parse_from_rfc3339(
        payload(&events, "RunStarted")["at"].as_str().unwrap(),
    )
    .unwrap();
    let ended = chrono::DateTime::parse_from_rfc3339(
        payload(&events, "RunTimedOut")["at"].as_str().unwrap(),
    )
    .unwrap();
    let took = (ended - started).num_milliseconds();
    assert!(took >= 2000, "timed out after {took} ms, before its 2 s");
    // Only what the test itself reads again: the final state is recorded once.
    assert_eq!(h.events(job).await.len(), events.len());
}

#[tokio::test]
async fn a_failing_workload_is_reported_with_its_exit_code() {
    let h = helpers::start().await;
    let _executor = h.executor("gpu-host-d", "sim:2xH100-80GB", &[], 1).await;
    let gpus = h.gpus_of("gpu-host-d").await;
    let job = h
        .submit(
            &tiles(&[
                "--tiles",
                "10",
                "--ms-per-tile",
                "20",
                "--fail-at",
                "4",
                "--exit-code",
                "7",
            ]),
            1,
            600,
            0,
        )
        .await;
    let (run, _) = h.assign(job, "gpu-host-d", &uuids(&gpus, &[1])).await;
    let events = h.wait_for_event(job, "JobFailed").await;
    let failed = payload(&events, "RunFailed");
    assert_eq!(failed["run_id"], run.to_string());
    assert_eq!(failed["exit_code"], 7);
    assert_eq!(failed["signal"], Value::Null);
    assert_eq!(failed["reason"], "exited with code 7");
    assert_eq!(failed["retryable"], true);
    assert_eq!(count(&events, "RunFailed"), 1);
    let lines = h.wait_for_log(job, run, "illegal memory access").await;
    assert!(lines.iter().any(|(s, _)| s == "stderr"));

    // A program that cannot start: failed, not retryable (another attempt fails the same way).
    let missing = h
        .submit(&["/nonexistent/infer".to_string()], 1, 600, 3)
        .await;
    h.assign(missing, "gpu-host-d", &uuids(&gpus, &[0])).await;
    let events = h.wait_for_event(missing, "JobFailed").await;
    let failed = payload(&events, "RunFailed");
    assert_eq!(failed["retryable"], false);
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .starts_with("cannot start \"/nonexistent/infer\""),
        "{failed}"
    );
    assert_eq!(count(&events, "RetryScheduled"), 0);
}
