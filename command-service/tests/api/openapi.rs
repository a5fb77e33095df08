//! The exported OpenAPI document of the command API is checked in (`schemas/openapi/`):
//! clients are generated from it, so it must not drift from the code unnoticed.

use std::path::PathBuf;

#[tokio::test]
async fn the_checked_in_openapi_document_matches_the_code() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/openapi/command-service.json");
    let generated = overfly_command_service::app::openapi_json() + "\n";
    if std::env::var_os("OVERFLY_BLESS").is_some() {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "schemas/openapi/command-service.json drifted from the code; review the API change, \
         then regenerate with OVERFLY_BLESS=1 cargo test -p overfly-command-service --test api openapi"
    );
}

#[tokio::test]
async fn the_service_serves_its_document_swagger_ui_and_health() {
    let app = crate::helpers::spawn_app().await;
    let spec: serde_json::Value = app
        .http
        .get(app.url("/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(spec["paths"]["/jobs"]["post"].is_object());
    let docs = app.http.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap().contains("swagger"));
    let health = app.http.get(app.url("/healthz")).send().await.unwrap();
    assert_eq!(health.status(), 200);
    let ready = app.http.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 200);
}
