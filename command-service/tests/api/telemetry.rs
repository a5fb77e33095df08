//! Tracing: a caller's W3C trace context flows into the events' metadata, and spans leave the
//! process over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (checked against a tiny
//! collector stand-in that records what it receives).

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;

use crate::helpers::{TestDb, TestNats, job_body};

/// Accepts OTLP/HTTP posts; sends (request line, body) of each.
async fn fake_collector() -> (String, mpsc::UnboundedReceiver<(String, Vec<u8>)>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let mut data = Vec::new();
                let mut buf = [0u8; 65536];
                loop {
                    let Ok(n) = socket.read(&mut buf).await else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    data.extend_from_slice(&buf[..n]);
                    let Some(head_end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                        continue;
                    };
                    let head = String::from_utf8_lossy(&data[..head_end]).to_string();
                    let length: usize = head
                        .lines()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case("content-length")
                                .then(|| v.trim().parse().ok())?
                        })
                        .unwrap_or(0);
                    if data.len() < head_end + 4 + length {
                        continue;
                    }
                    let body = data[head_end + 4..head_end + 4 + length].to_vec();
                    let request_line = head.lines().next().unwrap_or_default().to_string();
                    let _ = tx.send((request_line, body));
                    let _ = socket
                        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    data.clear();
                }
            });
        }
    });
    (endpoint, rx)
}

fn hex_to_bytes(hex: &str) -> Vec<u8> {
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_reaches_the_events_and_spans_are_exported_over_otlp() {
    let db = TestDb::create().await;
    let nats = TestNats::start().await;
    let (endpoint, mut received) = fake_collector().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut service = std::process::Command::new(env!("CARGO_BIN_EXE_overfly-command"))
        .arg("serve")
        .env("DATABASE_URL", &db.url)
        .env("NATS_URL", nats.url())
        .env("OVERFLY_COMMAND_ADDR", format!("127.0.0.1:{port}"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(response) = http.get(format!("{base}/readyz")).send().await
            && response.status() == 200
        {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "service did not become ready");

    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = http
        .post(format!("{base}/jobs"))
        .header("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01"))
        .header("X-Correlation-Id", "corr-42")
        .json(&job_body(1))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    let id = response.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_string();

    let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
    let metadata: Value = sqlx::query_scalar("SELECT metadata FROM events WHERE aggregate_id = $1")
        .bind(&id)
        .fetch_one(&pool)
        .await
        .unwrap();
    let traceparent = metadata["traceparent"].as_str().unwrap();
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-")),
        "{traceparent}"
    );
    assert_eq!(metadata["correlation_id"], "corr-42");

    // The exported spans belong to the caller's trace.
    let wanted = hex_to_bytes(trace_id);
    let found = tokio::time::timeout(Duration::from_secs(20), async {
        while let Some((request_line, body)) = received.recv().await {
            if request_line.starts_with("POST /v1/traces")
                && body.windows(wanted.len()).any(|w| w == wanted.as_slice())
            {
                return true;
            }
        }
        false
    })
    .await
    .unwrap_or(false);
    let _ = service.kill();
    let _ = service.wait();
    pool.close().await;
    assert!(
        found,
        "no OTLP export carrying the trace id reached the collector"
    );
}
