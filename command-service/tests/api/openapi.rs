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
