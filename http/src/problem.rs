//! The one HTTP error type of Overfly's APIs: RFC 9457 `application/problem+json` bodies.
//! Bad input names the offending field, conflicts are 409, and anything unexpected becomes
//! a logged 500 that echoes nothing internal. Each service maps its domain errors onto it.

use poem::{IntoResponse, Response};
use poem_openapi::payload::Payload;
use poem_openapi::registry::{MetaSchemaRef, Registry};
use poem_openapi::types::{ToJSON, Type};
use poem_openapi::{ApiResponse, Object};

pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// A problem detail (RFC 9457).
#[derive(Debug, Clone, PartialEq, Object)]
pub struct Problem {
    /// A URI naming the kind of problem, e.g. `urn:overfly:problem:invalid-field`.
    #[oai(rename = "type")]
    pub kind: String,
    /// Short summary of the kind of problem.
    pub title: String,
    /// The HTTP status code.
    pub status: u16,
    /// What went wrong in this request, for a person.
    pub detail: String,
    /// The request field at fault (JSON path, header or parameter name), when there is one.
    #[oai(skip_serializing_if_is_none)]
    pub field: Option<String>,
}

/// `Problem` as an `application/problem+json` payload.
#[derive(Debug, Clone)]
pub struct ProblemJson(pub Problem);

impl Payload for ProblemJson {
    const CONTENT_TYPE: &'static str = PROBLEM_CONTENT_TYPE;

    fn schema_ref() -> MetaSchemaRef {
        Problem::schema_ref()
    }

    fn register(registry: &mut Registry) {
        Problem::register(registry);
    }
}

impl IntoResponse for ProblemJson {
    fn into_response(self) -> Response {
        let body = self.0.to_json().unwrap_or_default().to_string();
        Response::builder()
            .status(poem::http::StatusCode::from_u16(self.0.status).unwrap_or_default())
            .content_type(PROBLEM_CONTENT_TYPE)
            .body(body)
    }
}

/// Every error the API answers with.
#[derive(Debug, ApiResponse)]
pub enum ApiError {
    /// The request is malformed (not JSON, bad path parameter, …).
    #[oai(status = 400)]
    BadRequest(ProblemJson),
    /// No such job or executor.
    #[oai(status = 404)]
    NotFound(ProblemJson),
    /// The command does not fit the aggregate's current state, or lost a race too often.
    #[oai(status = 409)]
    Conflict(ProblemJson),
    /// A field is invalid; `field` names it.
    #[oai(status = 422)]
    Unprocessable(ProblemJson),
    /// Something failed on our side; the details are in the server's logs.
    #[oai(status = 500)]
    Internal(ProblemJson),
    /// A dependency (Postgres, NATS) is not reachable, or a read model has not caught up yet;
    /// `Retry-After` says when to try again when that is known.
    #[oai(status = 503)]
    Unavailable(ProblemJson, #[oai(header = "Retry-After")] Option<u32>),
}

fn problem(
    status: u16,
    kind: &str,
    title: &str,
    detail: String,
    field: Option<String>,
) -> ProblemJson {
    ProblemJson(Problem {
        kind: format!("urn:overfly:problem:{kind}"),
        title: title.to_string(),
        status,
        detail,
        field,
    })
}

impl ApiError {
    /// 422 naming `field` (a JSON path, header or parameter name).
    pub fn invalid(field: impl Into<String>, message: impl std::fmt::Display) -> Self {
        let field = field.into();
        let detail = format!("{field}: {message}");
        Self::Unprocessable(problem(
            422,
            "invalid-field",
            "Invalid field",
            detail,
            Some(field),
        ))
    }

    pub fn bad_request(detail: impl Into<String>, field: Option<String>) -> Self {
        Self::BadRequest(problem(
            400,
            "bad-request",
            "Bad request",
            detail.into(),
            field,
        ))
    }

    pub fn not_found(detail: impl Into<String>) -> Self {
        Self::NotFound(problem(404, "not-found", "Not found", detail.into(), None))
    }

    pub fn conflict(detail: impl Into<String>) -> Self {
        Self::Conflict(problem(
            409,
            "conflict",
            "Conflict with the current state",
            detail.into(),
            None,
        ))
    }

    pub fn unavailable(detail: impl Into<String>) -> Self {
        Self::Unavailable(
            problem(
                503,
                "unavailable",
                "Service unavailable",
                detail.into(),
                None,
            ),
            None,
        )
    }

    /// 503 with `Retry-After: seconds`.
    pub fn retry_after(detail: impl Into<String>, seconds: u32) -> Self {
        Self::Unavailable(
            problem(
                503,
                "not-caught-up",
                "Not caught up yet",
                detail.into(),
                None,
            ),
            Some(seconds),
        )
    }

    /// Logs the cause with an id and answers with that id only.
    pub fn internal(error: &dyn std::fmt::Display) -> Self {
        let id = uuid::Uuid::new_v4();
        tracing::error!(error_id = %id, error = %error, "internal error");
        Self::Internal(problem(
            500,
            "internal",
            "Internal error",
            format!("internal error {id}; see the server logs"),
            None,
        ))
    }

    /// A problem for any status (used for errors raised by the framework itself).
    pub fn from_status(status: u16, detail: String, field: Option<String>) -> ProblemJson {
        let title = poem::http::StatusCode::from_u16(status)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("Error");
        problem(status, "http", title, detail, field)
    }
}

/// Turns errors raised outside our handlers (unknown route, wrong method, unparsable path
/// parameter, wrong content type, …) into problem+json, keeping their status.
pub async fn catch_all(error: poem::Error) -> Response {
    let detail = error.to_string();
    let field = error
        .downcast_ref::<poem_openapi::error::ParseParamError>()
        .map(|e| e.name.to_string());
    let response = error.into_response();
    let is_problem = response
        .content_type()
        .is_some_and(|ct| ct.starts_with(PROBLEM_CONTENT_TYPE));
    if is_problem {
        return response;
    }
    let status = response.status().as_u16();
    if status >= 500 {
        return ApiError::internal(&detail).into_response();
    }
    ApiError::from_status(status, detail, field).into_response()
}
