//! `Idempotency-Key` for `POST /jobs`: the key is bound to the hash of the first request's
//! body and to the job id it created. A retry with the same body gets the same job; the
//! same key with another body is refused.

use sha2::{Digest, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use overfly_domain::FieldError;

pub const HEADER: &str = "Idempotency-Key";

/// The outcome of claiming a key.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// First use of the key: create the job with this id.
    New(Uuid),
    /// The key was used before with the same body: answer for this job.
    Replay(Uuid),
}

#[derive(Debug, thiserror::Error)]
pub enum ClaimError {
    #[error(transparent)]
    Invalid(FieldError),
    #[error("{HEADER} was already used with a different request body")]
    Mismatch,
    #[error(transparent)]
    Store(#[from] sqlx::Error),
}

pub fn validate_key(key: &str) -> Result<(), FieldError> {
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FieldError::new(
            HEADER,
            "must be 1 to 255 visible ASCII characters",
        ));
    }
    Ok(())
}

/// A stable hash of the request as parsed (not of its bytes: whitespace and key order in the
/// JSON don't matter).
pub fn request_hash(canonical: &serde_json::Value) -> String {
    let digest = Sha256::digest(canonical.to_string().as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Claims `key` for a new job `candidate`, or finds the job an earlier request created.
pub async fn claim(
    pool: &PgPool,
    key: &str,
    hash: &str,
    candidate: Uuid,
) -> Result<Claim, ClaimError> {
    validate_key(key).map_err(ClaimError::Invalid)?;
    let inserted: Option<String> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys (key, request_hash, aggregate_id) VALUES ($1, $2, $3)
         ON CONFLICT (key) DO NOTHING
         RETURNING aggregate_id",
    )
    .bind(key)
    .bind(hash)
    .bind(candidate.to_string())
    .fetch_optional(pool)
    .await?;
    if inserted.is_some() {
        return Ok(Claim::New(candidate));
    }
    let (stored_hash, aggregate_id): (String, String) =
        sqlx::query_as("SELECT request_hash, aggregate_id FROM idempotency_keys WHERE key = $1")
            .bind(key)
            .fetch_one(pool)
            .await?;
    if stored_hash != hash {
        return Err(ClaimError::Mismatch);
    }
    let id = aggregate_id
        .parse()
        .map_err(|e| ClaimError::Store(sqlx::Error::Decode(Box::new(e))))?;
    Ok(Claim::Replay(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hash_ignores_formatting_but_not_content() {
        let a: serde_json::Value = serde_json::from_str(r#"{"a":1,"b":[1,2]}"#).unwrap();
        let b: serde_json::Value = serde_json::from_str("{ \"b\": [1, 2], \"a\": 1 }").unwrap();
        let c: serde_json::Value = serde_json::from_str(r#"{"a":2,"b":[1,2]}"#).unwrap();
        assert_eq!(request_hash(&a), request_hash(&b));
        assert_ne!(request_hash(&a), request_hash(&c));
    }

    #[test]
    fn keys_are_bounded_visible_ascii() {
        assert!(validate_key("demo-tiles-1").is_ok());
        assert!(validate_key("").is_err());
        assert!(validate_key("has space").is_err());
        assert!(validate_key(&"k".repeat(256)).is_err());
    }
}
