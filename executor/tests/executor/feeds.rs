//! The query service's log and telemetry feeds, fed by a real executor running real
//! workloads: a job's log backlog with `tail`, `follow` until the job is finished and the
//! final `end` (also for a job cancelled while running: its last lines come first), exact
//! resumes with `Last-Event-ID`; GPU samples per executor and for every GPU.

use clap::Parser;
use overfly_testkit::sse::{Message, Sse};
use serde_json::{Value, json};
use uuid::Uuid;

use crate::helpers::{self, Harness, WAIT, tiles, uuids};

/// The query service, in this process, on the harness's database and nats-server.
async fn query_service(h: &Harness) -> String {
    let cli = overfly_query_service::config::Cli::parse_from([
        "overfly-query",
        "--database-url",
        &h.db_url(),
        "--nats-url",
        &h.nats.url(),
        "--addr",
        "127.0.0.1:0",
    ]);
    let app = overfly_query_service::app::Application::build(&cli.config)
        .await
        .unwrap();
    let url = format!("http://{}", app.local_addr());
    tokio::spawn(app.run_until(std::future::pending()));
    url
}

/// `(n, stream, line)` of every line in the `log` messages, in order.
fn lines(messages: &[Message]) -> Vec<(u64, String, String)> {
    messages
        .iter()
        .filter(|m| m.event.as_deref() == Some("log"))
        .flat_map(|m| {
            m.json()["lines"]
                .as_array()
                .unwrap()
                .iter()
                .map(|l| {
                    (
                        l["n"].as_u64().unwrap(),
                        l["stream"].as_str().unwrap().to_string(),
                        l["line"].as_str().unwrap().to_string(),
                    )
                })
                .collect::<Vec<_>>()
        })
        .collect()
}

fn numbers(lines: &[(u64, String, String)]) -> Vec<u64> {
    lines.iter().map(|(n, _, _)| *n).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jobs_logs_backlog_with_tail_then_follow_until_the_end_event() {
    let h = helpers::start().await;
    let q = query_service(&h).await;
    let _executor = h.executor("logs-a", "sim:1xH100-80GB", &[], 1).await;
    let gpus = h.gpus_of("logs-a").await;
    let job = h
        .submit(&tiles(&["--tiles", "40", "--ms-per-tile", "75"]), 1, 600, 0)
        .await;
    let (run, _) = h.assign(job, "logs-a", &uuids(&gpus, &[0])).await;
    h.wait_for_log(job, run, "tile 10/40").await;

    // Backlog only, last 5 lines: exactly 5 consecutive lines, and no `end` (still running).
    let mut tail = Sse::connect(&h.http, &format!("{q}/jobs/{job}/logs?tail=5"), None).await;
    let backlog = tail.to_end(WAIT).await;
    assert!(backlog.iter().all(|m| m.event.as_deref() == Some("log")));
    let last5 = numbers(&lines(&backlog));
    assert_eq!(last5.len(), 5, "{backlog:?}");
    assert!(last5.windows(2).all(|w| w[1] == w[0] + 1), "{last5:?}");
    assert!(last5[4] >= 20, "tile 10 is at least line 20: {last5:?}");

    // Follow from the last 3 lines: live until the job is finished, then `end`, then closed.
    let mut follow = Sse::connect(
        &h.http,
        &format!("{q}/jobs/{job}/logs?follow=true&tail=3"),
        None,
    )
    .await;
    let followed = follow.to_end(WAIT).await;
    let end = followed.last().expect("messages");
    assert_eq!(end.event.as_deref(), Some("end"), "{followed:?}");
    assert_eq!(end.json()["state"], "succeeded");
    assert_eq!(end.json()["job_id"], job.to_string());
    assert!(end.id.is_none());
    let all_in_stream = h.log_lines(job, run).await;
    let got = numbers(&lines(&followed));
    assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "{got:?}");
    assert_eq!(
        *got.last().unwrap() as usize,
        all_in_stream.len(),
        "followed to the last line"
    );
    assert!(
        lines(&followed)
            .last()
            .is_some_and(|(_, _, l)| l.contains("done: 40 tiles")),
        "the workload's last line comes before `end`"
    );
    let ids: Vec<u64> = followed[..followed.len() - 1]
        .iter()
        .map(Message::sequence)
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");

    // Late client: the whole log (stdout and stderr, in order), then `end`.
    let mut whole = Sse::connect(&h.http, &format!("{q}/jobs/{job}/logs?follow=true"), None).await;
    let everything = whole.to_end(WAIT).await;
    let all = lines(&everything);
    assert_eq!(
        numbers(&all),
        (1..=all_in_stream.len() as u64).collect::<Vec<_>>()
    );
    assert_eq!(
        all.iter()
            .map(|(_, s, l)| (s.clone(), l.clone()))
            .collect::<Vec<_>>(),
        all_in_stream
    );
    assert!(all.iter().any(|(_, s, _)| s == "stderr"));
    assert_eq!(everything.last().unwrap().event.as_deref(), Some("end"));

    // Resume from the middle: exactly the messages after it, then `end`.
    let logs: Vec<&Message> = everything
        .iter()
        .filter(|m| m.event.as_deref() == Some("log"))
        .collect();
    if logs.len() >= 2 {
        let middle = logs[logs.len() / 2];
        let mut resumed = Sse::connect(
            &h.http,
            &format!("{q}/jobs/{job}/logs?follow=true"),
            middle.id.as_deref(),
        )
        .await;
        let rest = resumed.to_end(WAIT).await;
        let expected: Vec<&Message> = everything
            .iter()
            .skip_while(|m| m.id != middle.id)
            .skip(1)
            .collect();
        assert_eq!(rest.iter().collect::<Vec<_>>(), expected);
    }

    // Bad input and unknown jobs: problem+json naming the field.
    let response = h
        .http
        .get(format!("{q}/jobs/{job}/logs?tail=1000001"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 400);
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("application/problem+json")
    );
    let problem: Value = response.json().await.unwrap();
    assert!(problem.to_string().contains("tail"), "{problem}");
    let response = h
        .http
        .get(format!("{q}/jobs/{}/logs", Uuid::new_v4()))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_job_cancelled_while_running_ends_its_log_feed_after_its_last_lines() {
    let h = helpers::start().await;
    let q = query_service(&h).await;
    let _executor = h.executor("logs-b", "sim:1xH100-80GB", &[], 1).await;
    let gpus = h.gpus_of("logs-b").await;
    let job = h
        .submit(
            &tiles(&["--tiles", "1000", "--ms-per-tile", "50"]),
            1,
            600,
            0,
        )
        .await;
    let (run, _) = h.assign(job, "logs-b", &uuids(&gpus, &[0])).await;
    h.wait_for_log(job, run, "tile 3/1000").await;
    let mut follow = Sse::connect(&h.http, &format!("{q}/jobs/{job}/logs?follow=true"), None).await;
    let first = follow.next(WAIT).await.expect("the backlog");
    assert_eq!(first.event.as_deref(), Some("log"));
    let cancel = h
        .post(
            &format!("/jobs/{job}/cancel"),
            &json!({"by": "ana", "reason": "wrong region"}),
        )
        .await;
    assert_eq!(cancel.status(), 200);
    let mut messages = vec![first];
    messages.extend(follow.to_end(WAIT).await);
    let end = messages.last().unwrap();
    assert_eq!(end.event.as_deref(), Some("end"), "{messages:?}");
    assert_eq!(end.json()["state"], "cancelled");
    // The run's stop was reported before `end`, and its last words are in the feed.
    let got = lines(&messages);
    assert!(
        got.iter().any(|(_, _, l)| l.contains("received SIGTERM")),
        "{got:?}"
    );
    assert_eq!(got.len(), h.log_lines(job, run).await.len());
    let events: Vec<String> = h.events(job).await.into_iter().map(|(t, _)| t).collect();
    assert!(events.contains(&"RunFailed".to_string()), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn gpu_telemetry_feeds_per_executor_and_for_every_gpu_resume_exactly() {
    let h = helpers::start().await;
    let q = query_service(&h).await;
    let _a = h.executor("telemetry-a", "sim:2xH100-80GB", &[], 1).await;
    let _b = h.executor("telemetry-b", "sim:1xA100-40GB", &[], 1).await;

    async fn samples(feed: &mut Sse, count: usize) -> Vec<Message> {
        let mut got = Vec::new();
        while got.len() < count {
            let message = feed.next(WAIT).await.expect("samples keep coming");
            assert_eq!(message.event.as_deref(), Some("sample"));
            got.push(message);
        }
        got
    }

    // One executor's GPUs only, both of them, in stream order.
    let mut a = Sse::connect(
        &h.http,
        &format!("{q}/executors/telemetry-a/telemetry"),
        None,
    )
    .await;
    let from_a = samples(&mut a, 10).await;
    assert!(
        from_a
            .iter()
            .all(|m| m.json()["executor_id"] == "telemetry-a")
    );
    let indexes: std::collections::BTreeSet<u64> = from_a
        .iter()
        .map(|m| m.json()["index"].as_u64().unwrap())
        .collect();
    assert_eq!(indexes, [0, 1].into());
    assert!(from_a.windows(2).all(|w| w[0].sequence() < w[1].sequence()));
    let sample = from_a[0].json();
    assert_eq!(sample["backend"], "sim");
    assert!(sample["memory_total_mb"].as_u64().unwrap() > 0);

    // Resuming after the third: exactly the samples the first client saw after it.
    let mut resumed = Sse::connect(
        &h.http,
        &format!("{q}/executors/telemetry-a/telemetry"),
        from_a[2].id.as_deref(),
    )
    .await;
    assert_eq!(samples(&mut resumed, 7).await, from_a[3..]);

    // Every GPU: both executors; filtered: one.
    let mut every = Sse::connect(&h.http, &format!("{q}/gpus/stream"), None).await;
    let executors: std::collections::BTreeSet<String> = samples(&mut every, 12)
        .await
        .iter()
        .map(|m| m.json()["executor_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        executors,
        ["telemetry-a".into(), "telemetry-b".into()].into()
    );
    let mut only_b = Sse::connect(
        &h.http,
        &format!("{q}/gpus/stream?executor_id=telemetry-b"),
        None,
    )
    .await;
    assert!(
        samples(&mut only_b, 4)
            .await
            .iter()
            .all(|m| m.json()["executor_id"] == "telemetry-b")
    );

    let unknown = h
        .http
        .get(format!("{q}/executors/nope/telemetry"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let bad = h
        .http
        .get(format!("{q}/gpus/stream?executor_id=a.b"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}
