//! The query API's OpenAPI document is checked in (`schemas/openapi/query-service.json`).

use std::path::PathBuf;

#[tokio::test]
async fn the_checked_in_openapi_document_matches_the_code() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../schemas/openapi/query-service.json");
    let generated = overfly_query_service::app::openapi_json() + "\n";
    if std::env::var_os("OVERFLY_BLESS").is_some() {
        std::fs::write(&path, &generated).unwrap();
    }
    let checked_in = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        checked_in == generated,
        "schemas/openapi/query-service.json drifted from the code; review the API change, then \
         regenerate with OVERFLY_BLESS=1 cargo test -p overfly-query-service --test api openapi"
    );
}
