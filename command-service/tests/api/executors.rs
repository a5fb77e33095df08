//! Executors heartbeat for ever: their aggregate is snapshotted, and commands keep answering
//! with the right version and position across snapshots.

use serde_json::{Value, json};

use crate::helpers::spawn_app;

#[tokio::test]
async fn heartbeats_are_snapshotted_and_versions_stay_exact() {
    let app = spawn_app().await;
    let register = app
        .post(
            "/executors",
            &json!({
                "executor_id": "gpu-host-1", "hostname": "gpu-host-1.example", "lease_s": 30,
                "gpus": [
                    {"uuid": "GPU-a", "index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559, "compute_capability": "9.0"},
                    {"uuid": "GPU-b", "index": 1, "name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559, "compute_capability": "9.0"}
                ]
            }),
        )
        .await;
    assert_eq!(register.status(), 200);
    let mut version = register.json::<Value>().await.unwrap()["version"]
        .as_i64()
        .unwrap();
    assert_eq!(version, 1);
    for n in 0..150 {
        let response = app
            .post("/executors/gpu-host-1/heartbeat", &json!({}))
            .await;
        assert_eq!(response.status(), 200);
        let accepted: Value = response.json().await.unwrap();
        // The first heartbeat also activates the executor: two events.
        let expected = version + if n == 0 { 2 } else { 1 };
        assert_eq!(accepted["version"], expected, "heartbeat {n}");
        let position: i64 = sqlx::query_scalar(
            "SELECT global_position FROM events WHERE aggregate_id = 'gpu-host-1' AND sequence = $1",
        )
        .bind(expected)
        .fetch_one(&app.pool)
        .await
        .unwrap();
        assert_eq!(accepted["position"], position);
        version = expected;
    }
    let snapshot: (i64, Value) = sqlx::query_as(
        "SELECT last_sequence, payload FROM snapshots WHERE aggregate_type = 'executor' AND aggregate_id = 'gpu-host-1'",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap();
    assert!(snapshot.0 >= 100, "snapshot taken at {}", snapshot.0);
    assert_eq!(snapshot.1["state"], "active");

    let drain = app
        .post(
            "/executors/gpu-host-1/drain",
            &json!({"by": "ops", "reason": "kernel update"}),
        )
        .await;
    assert_eq!(drain.status(), 200);
    assert_eq!(drain.json::<Value>().await.unwrap()["version"], version + 1);
    // Draining twice records nothing and answers with the current version.
    let again = app
        .post(
            "/executors/gpu-host-1/drain",
            &json!({"by": "ops", "reason": "kernel update"}),
        )
        .await;
    assert_eq!(again.json::<Value>().await.unwrap()["version"], version + 1);
}
