//! The scorer's HTTP API next to `/healthz`, `/readyz` and `/metrics`:
//!
//! `POST /v1/score` with `{"model", "prompt" | "messages" | "token_ids",
//! "endpoints"?, "cache_salt"?}` returns `{"model", "blocks", "scores":
//! [{"endpoint", "blocks", "tier", "score", ...}], "picked", "reason"}` — a
//! dry run of the decision Envoy would get (nothing is counted in flight).

use crate::decide::{Prompt, RouteRequest};
use crate::request;
use crate::route::{EndpointPicker, Report};
use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use kvroute_core::index::Index;
use std::sync::Arc;

#[derive(serde::Deserialize)]
struct ScoreBody {
    model: String,
    #[serde(default)]
    token_ids: Option<Vec<u32>>,
    #[serde(default)]
    endpoints: Option<Vec<String>>,
    #[serde(default)]
    cache_salt: Option<String>,
}

type ApiError = (StatusCode, Json<serde_json::Value>);

fn bad_request(msg: String) -> ApiError {
    (
        StatusCode::BAD_REQUEST,
        Json(serde_json::json!({"error": {"message": msg, "type": "invalid_request_error"}})),
    )
}

/// Routes under `/v1`. Bodies up to `max_body_bytes` (`--max-body-bytes`,
/// the ext_proc cap too: a prompt Envoy can route can be scored here;
/// axum's own default would be 2 MiB); larger ones get 413.
pub fn router<I: Index + 'static>(
    scorer: Arc<EndpointPicker<I>>,
    max_body_bytes: usize,
) -> axum::Router {
    axum::Router::new()
        .route("/v1/score", post(score::<I>))
        .layer(axum::extract::DefaultBodyLimit::max(max_body_bytes))
        .with_state(scorer)
}

async fn score<I: Index + 'static>(
    State(scorer): State<Arc<EndpointPicker<I>>>,
    body: axum::body::Bytes,
) -> Result<Json<Report>, ApiError> {
    let extra: ScoreBody = serde_json::from_slice(&body).map_err(|e| bad_request(e.to_string()))?;
    let req = match extra.token_ids {
        Some(ids) => RouteRequest {
            model: extra.model,
            prompt: Prompt::TokenIds(ids),
            cache_salt: extra.cache_salt,
            chat_template_kwargs: None,
            request_id: None,
        },
        None => request::parse(&body, None).map_err(|e| bad_request(e.to_string()))?,
    };
    Ok(Json(
        scorer
            .score_for_caller(&req, extra.endpoints.as_deref())
            .await,
    ))
}
