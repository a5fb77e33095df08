//! `GET /jobs/{id}/spec`: what an executor reads to start a run of the job.

use serde_json::Value;

use crate::helpers::{job_body, spawn_app};

#[tokio::test]
async fn the_spec_of_a_job_is_what_was_submitted_and_unknown_jobs_are_404() {
    let app = spawn_app().await;
    let id = app.submit(&job_body(4)).await;
    let response = app
        .http
        .get(app.url(&format!("/jobs/{id}/spec")))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let spec: Value = response.json().await.unwrap();
    let submitted = job_body(4);
    assert_eq!(spec["job_id"], id.as_str());
    for field in [
        "name",
        "account",
        "command",
        "env",
        "params",
        "labels",
        "gpus",
        "timeout_s",
    ] {
        assert_eq!(spec[field], submitted[field], "{field}");
    }

    let unknown = app
        .http
        .get(app.url(&format!("/jobs/{}/spec", uuid::Uuid::new_v4())))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
    let bad = app
        .http
        .get(app.url("/jobs/not-a-uuid/spec"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
}
