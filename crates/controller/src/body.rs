//! Request bodies: size-limited, JSON-decoded with the failing field's path in the
//! error, and answered as `CloudError` on every failure.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// The largest body accepted.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

pub struct JsonBody<T>(pub T);

/// The whole body, at most `MAX_BODY_BYTES` (else 413 as a CloudError).
async fn read(req: Request) -> Result<Bytes, ApiError> {
    axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestEntityTooLarge",
                format!("the request body is larger than {MAX_BODY_BYTES} bytes"),
            )
        })
}

/// Decodes JSON, naming the failing path (`properties.virtualMachines[0].ports[0].number`).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContent",
            "the request body is required (a JSON object)",
        ));
    }
    let de = &mut serde_json::Deserializer::from_slice(bytes);
    let value: T = serde_path_to_error::deserialize(&mut *de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path == "." || path.is_empty() {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContent",
                format!("the request body is not valid JSON: {inner}"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContent",
                format!("{path}: {inner}"),
            )
            .with_target(path)
        }
    })?;
    // Anything after the JSON value (`{...}xyz`) is refused: the write must not happen
    // on a body that is not exactly one JSON value.
    de.end().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "InvalidRequestContent",
            format!("the request body has content after its JSON value: {e}"),
        )
    })?;
    Ok(value)
}

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        let body = read(req).await?;
        decode::<T>(&body).map(JsonBody)
    }
}

/// An optional body: empty means `None`.
pub struct OptionalJsonBody<T>(pub Option<T>);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for OptionalJsonBody<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _: &S) -> Result<Self, Self::Rejection> {
        let body: Bytes = read(req).await?;
        if body.iter().all(|b| b.is_ascii_whitespace()) {
            return Ok(OptionalJsonBody(None));
        }
        decode::<T>(&body).map(|v| OptionalJsonBody(Some(v)))
    }
}
