//! API errors, always answered as Azure's `CloudError` body:
//! `{"error": {"code", "message", "target", "details": []}}`.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use jitgate_core::FieldError;
use jitgate_store::StoreError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub target: Option<String>,
    /// Seconds for a `Retry-After` header (503, 429).
    pub retry_after: Option<u64>,
}

/// Attached to every error response so the audit layer can record what was refused.
#[derive(Debug, Clone)]
pub struct ErrorInfo {
    pub code: &'static str,
    pub message: String,
    pub target: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            target: None,
            retry_after: None,
        }
    }

    pub fn with_target(mut self, target: impl Into<String>) -> Self {
        self.target = Some(target.into());
        self
    }

    /// 400 naming the offending field, in message and `target`.
    pub fn field(e: FieldError) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContent",
            format!("{}: {}", e.field, e.message),
        )
        .with_target(e.field)
    }

    pub fn bad_param(name: &str, message: impl std::fmt::Display) -> Self {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidParameter",
            format!("{name}: {message}"),
        )
        .with_target(name)
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::NOT_FOUND, "ResourceNotFound", message)
    }

    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::CONFLICT, "Conflict", message)
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        ApiError::new(StatusCode::UNAUTHORIZED, "AuthenticationFailed", message)
    }

    pub fn forbidden(principal: &str, action: &str, scope: &str) -> Self {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "AuthorizationFailed",
            format!(
                "The client '{principal}' does not have authorization to perform action '{action}' over scope '{scope}' or the scope is invalid."
            ),
        )
        .with_target(scope.to_owned())
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalError",
            "the controller failed to process the request; see its log",
        )
    }
}

/// How long a caller refused for a full write queue is asked to wait.
pub const BUSY_RETRY_AFTER_SECS: u64 = 1;

/// 503 with `Retry-After`: nothing is wrong with the call, try it again shortly.
fn retry_later(code: &'static str, message: String) -> ApiError {
    let mut e = ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message);
    e.retry_after = Some(BUSY_RETRY_AFTER_SECS);
    e
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            // Not a failure of the controller: too many writes at once. Nothing was
            // changed; the caller retries.
            StoreError::Busy { queued } => retry_later(
                "ServerBusy",
                format!(
                    "the controller has {queued} writes waiting, the most it queues; nothing was changed: retry in {BUSY_RETRY_AFTER_SECS} s"
                ),
            ),
            // The database is unreachable for now (a failover): nothing this call
            // asked may have been done, or it may; a retry with the same idempotency
            // key settles which.
            StoreError::Unavailable(m) => {
                tracing::warn!(error = %m, "the database is unavailable");
                retry_later(
                    "DatabaseUnavailable",
                    format!(
                        "the controller cannot reach its database now; retry in {BUSY_RETRY_AFTER_SECS} s (an initiate with the same Idempotency-Key is never made twice)"
                    ),
                )
            }
            e => ApiError::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = jitgate_proto::api::CloudError {
            error: jitgate_proto::api::CloudErrorBody {
                code: self.code.to_owned(),
                message: self.message.clone(),
                target: self.target.clone(),
                details: Vec::new(),
                additional_info: Vec::new(),
            },
        };
        let mut resp = (self.status, Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(secs),
            );
        }
        resp.extensions_mut().insert(ErrorInfo {
            code: self.code,
            message: self.message,
            target: self.target,
        });
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;
