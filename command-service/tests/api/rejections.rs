//! Test 6: every class of bad input gets a 4xx `application/problem+json` naming the field,
//! and leaves the store exactly as it was.

use serde_json::{Value, json};

use crate::helpers::{job_body, spawn_app};

struct Case {
    what: &'static str,
    path: String,
    body: Vec<u8>,
    content_type: &'static str,
    status: u16,
    field: Option<&'static str>,
}

fn case(
    what: &'static str,
    path: &str,
    body: Value,
    status: u16,
    field: Option<&'static str>,
) -> Case {
    Case {
        what,
        path: path.to_string(),
        body: serde_json::to_vec(&body).unwrap(),
        content_type: "application/json",
        status,
        field,
    }
}

fn job_with(change: impl FnOnce(&mut Value)) -> Value {
    let mut body = job_body(1);
    change(&mut body);
    body
}

async fn store_fingerprint(app: &crate::helpers::TestApp) -> (i64, i64, Option<i64>) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM idempotency_keys),
                (SELECT max(global_position) FROM events)",
    )
    .fetch_one(&app.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn every_rejected_input_class_is_a_problem_naming_the_field_and_changes_nothing() {
    let app = spawn_app().await;
    let cancelled = app.submit(&job_body(0)).await;
    let cancel = app
        .post(
            &format!("/jobs/{cancelled}/cancel"),
            &json!({"by": "ana", "reason": "x"}),
        )
        .await;
    assert_eq!(cancel.status(), 200);
    let unknown = uuid::Uuid::new_v4();
    let run = uuid::Uuid::new_v4();
    let gpu = json!({"uuid": "GPU-1", "index": 0, "name": "NVIDIA H100 80GB HBM3", "memory_mb": 81559, "compute_capability": "9.0"});

    let mut cases = vec![
        Case {
            what: "not JSON",
            path: "/jobs".into(),
            body: b"{\"name\":".to_vec(),
            content_type: "application/json",
            status: 400,
            field: None,
        },
        Case {
            what: "wrong content type",
            path: "/jobs".into(),
            body: b"name=x".to_vec(),
            content_type: "text/plain",
            status: 415,
            field: None,
        },
        case(
            "missing field",
            "/jobs",
            job_with(|b| {
                b.as_object_mut().unwrap().remove("timeout_s");
            }),
            422,
            Some("timeout_s"),
        ),
        case(
            "wrong type",
            "/jobs",
            job_with(|b| b["gpus"] = json!("two")),
            422,
            Some("gpus"),
        ),
        case(
            "unknown field",
            "/jobs",
            job_with(|b| b["gpu"] = json!(2)),
            422,
            Some("gpu"),
        ),
        case(
            "priority above 100",
            "/jobs",
            job_with(|b| b["priority"] = json!(300)),
            422,
            Some("priority"),
        ),
        case(
            "negative priority",
            "/jobs",
            job_with(|b| b["priority"] = json!(-1)),
            422,
            Some("priority"),
        ),
        case(
            "no GPU",
            "/jobs",
            job_with(|b| b["gpus"] = json!(0)),
            422,
            Some("gpus"),
        ),
        case(
            "too many GPUs",
            "/jobs",
            job_with(|b| b["gpus"] = json!(9)),
            422,
            Some("gpus"),
        ),
        case(
            "negative memory",
            "/jobs",
            job_with(|b| b["gpu_memory_mb"] = json!(-5)),
            422,
            Some("gpu_memory_mb"),
        ),
        case(
            "empty name",
            "/jobs",
            job_with(|b| b["name"] = json!("")),
            422,
            Some("name"),
        ),
        case(
            "bad account",
            "/jobs",
            job_with(|b| b["account"] = json!("geo team")),
            422,
            Some("account"),
        ),
        case(
            "empty argv",
            "/jobs",
            job_with(|b| b["command"] = json!([])),
            422,
            Some("command"),
        ),
        case(
            "NUL in argv",
            "/jobs",
            job_with(|b| b["command"] = json!(["python", "a\u{0}b"])),
            422,
            Some("command[1]"),
        ),
        case(
            "reserved env",
            "/jobs",
            job_with(|b| b["env"] = json!({"CUDA_VISIBLE_DEVICES": "0"})),
            422,
            Some("env.CUDA_VISIBLE_DEVICES"),
        ),
        case(
            "bad env name",
            "/jobs",
            job_with(|b| b["env"] = json!({"1X": "0"})),
            422,
            Some("env.1X"),
        ),
        case(
            "params not an object",
            "/jobs",
            job_with(|b| b["params"] = json!([1, 2])),
            422,
            Some("params"),
        ),
        case(
            "params over 64 KiB",
            "/jobs",
            job_with(|b| b["params"] = json!({"blob": "x".repeat(70 * 1024)})),
            422,
            Some("params"),
        ),
        case(
            "bad label",
            "/jobs",
            job_with(|b| b["labels"] = json!({"bad key": "v"})),
            422,
            Some("labels.bad key"),
        ),
        case(
            "too many retries",
            "/jobs",
            job_with(|b| b["max_retries"] = json!(11)),
            422,
            Some("max_retries"),
        ),
        case(
            "zero timeout",
            "/jobs",
            job_with(|b| b["timeout_s"] = json!(0)),
            422,
            Some("timeout_s"),
        ),
        case(
            "body over 256 KiB",
            "/jobs",
            job_with(|b| b["params"] = json!({"blob": "x".repeat(300 * 1024)})),
            422,
            Some("body"),
        ),
        case(
            "bad job id",
            "/jobs/not-a-uuid/cancel",
            json!({"by": "a", "reason": "b"}),
            400,
            Some("job_id"),
        ),
        case(
            "unknown job",
            &format!("/jobs/{unknown}/cancel"),
            json!({"by": "a", "reason": "b"}),
            404,
            None,
        ),
        case(
            "cancel a cancelled job",
            &format!("/jobs/{cancelled}/cancel"),
            json!({"by": "a", "reason": "b"}),
            409,
            None,
        ),
        case(
            "priority of a cancelled job",
            &format!("/jobs/{cancelled}/priority"),
            json!({"priority": 5, "by": "a", "reason": "b"}),
            409,
            None,
        ),
        case(
            "assign a cancelled job",
            &format!("/jobs/{cancelled}/runs"),
            json!({"run_id": run, "executor_id": "h1", "gpu_uuids": ["GPU-1", "GPU-2"]}),
            409,
            None,
        ),
        case(
            "start a run never assigned",
            &format!("/jobs/{cancelled}/runs/{run}/started"),
            json!({"executor_id": "h1"}),
            409,
            None,
        ),
        case(
            "bad run id",
            &format!("/jobs/{cancelled}/runs/x/started"),
            json!({"executor_id": "h1"}),
            400,
            Some("run_id"),
        ),
        case(
            "retry a cancelled job",
            &format!("/jobs/{cancelled}/retry"),
            json!({"by": "a", "reason": "b"}),
            409,
            None,
        ),
        case(
            "cancel without reason",
            &format!("/jobs/{unknown}/cancel"),
            json!({"by": "a"}),
            422,
            Some("reason"),
        ),
        case(
            "executor without GPUs",
            "/executors",
            json!({"executor_id": "h1", "hostname": "h1", "gpus": [], "lease_s": 30}),
            422,
            Some("gpus"),
        ),
        case(
            "duplicate GPU",
            "/executors",
            json!({"executor_id": "h1", "hostname": "h1", "gpus": [gpu, gpu], "lease_s": 30}),
            422,
            Some("gpus[1].uuid"),
        ),
        case(
            "bad executor id",
            "/executors",
            json!({"executor_id": "h.1", "hostname": "h1", "gpus": [gpu], "lease_s": 30}),
            422,
            Some("executor_id"),
        ),
        case(
            "zero lease",
            "/executors",
            json!({"executor_id": "h1", "hostname": "h1", "gpus": [gpu], "lease_s": 0}),
            422,
            Some("lease_s"),
        ),
        case(
            "heartbeat of an unknown executor",
            "/executors/nobody/heartbeat",
            json!({}),
            404,
            None,
        ),
        case("unknown route", "/nowhere", json!({}), 404, None),
    ];
    // The same Idempotency-Key with a different body is refused too (it was bound above).
    let mut keyed = job_body(5);
    let response = app
        .http
        .post(app.url("/jobs"))
        .header("Idempotency-Key", "bound")
        .json(&keyed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 201);
    keyed["priority"] = json!(1);

    let before = store_fingerprint(&app).await;
    let response = app
        .http
        .post(app.url("/jobs"))
        .header("Idempotency-Key", "bound")
        .json(&keyed)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);

    for case in cases.drain(..) {
        let response = app
            .http
            .post(app.url(&case.path))
            .header("content-type", case.content_type)
            .body(case.body)
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let content_type = response.headers()["content-type"]
            .to_str()
            .unwrap()
            .to_string();
        let text = response.text().await.unwrap();
        assert_eq!(status, case.status, "{}: {text}", case.what);
        assert_eq!(content_type, "application/problem+json", "{}", case.what);
        let problem: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(problem["status"], case.status, "{}", case.what);
        assert!(
            problem["detail"].as_str().is_some_and(|d| !d.is_empty()),
            "{}",
            case.what
        );
        if let Some(field) = case.field {
            assert_eq!(problem["field"], field, "{}: {text}", case.what);
        }
    }
    assert_eq!(
        store_fingerprint(&app).await,
        before,
        "a rejected request changed the store"
    );
}
