//! The operator subcommands of `overfly-command`, run as real processes.

use std::time::Duration;

use crate::helpers::{job_body, spawn_app, stream_events};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_info_reports_the_stream_and_the_relay_position() {
    let app = spawn_app().await;
    for n in 0..3 {
        app.submit(&job_body(n)).await;
    }
    assert_eq!(
        stream_events(&app.nats.url(), 3, Duration::from_secs(10))
            .await
            .len(),
        3
    );
    // The relay stores its position when it catches up.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_overfly-command"))
        .arg("stream-info")
        .env("DATABASE_URL", &app.db.url)
        .env("NATS_URL", app.nats.url())
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("messages   3"), "{stdout}");
    assert!(stdout.contains("events in Postgres  3"), "{stdout}");
    let position: i64 = sqlx::query_scalar("SELECT max(global_position) FROM events")
        .fetch_one(&app.pool)
        .await
        .unwrap();
    assert!(
        stdout.contains(&format!("global_position={position}")),
        "{stdout}"
    );
}
