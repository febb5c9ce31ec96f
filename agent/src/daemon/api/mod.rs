//! The approval API: JSON over HTTP, bearer tokens per approver.
//!
//! GET  /v1/requests[?state=pending]   list requests
//! GET  /v1/requests/{id}              one request
//! POST /v1/requests/{id}/approve      {"reason": "..."} (body optional)
//! POST /v1/requests/{id}/deny         {"reason": "..."} (body optional)
//! GET  /v1/sessions/{id}/events      a session's events in time order
//! GET  /v1/stream                     server-sent events: new and resolved requests
//! GET  /v1/openapi.json               this API's OpenAPI document (no token needed)

use std::{collections::HashMap, convert::Infallible, path::PathBuf, sync::Arc};

use axum::{
    Json, Router,
    extract::{Path, Query, State},
    http::{HeaderMap, StatusCode, header},
    response::{IntoResponse, Response, Sse, sse::Event},
    routing::{MethodRouter, get, post},
};
use serde::Deserialize;
use tokio::sync::{broadcast, watch};
use tokio_stream::{Stream, StreamExt, wrappers::BroadcastStream};

use super::handles::BrokerHandle;
use crate::{
    config::Approver,
    model::{ApprovalRequest, DecideError, State as ReqState},
    store::{Store, StoreError},
};

/// What the handlers share.
pub struct ApiState {
    pub broker: BrokerHandle,
    /// token -> approver name
    pub tokens: HashMap<String, String>,
    pub db: PathBuf,
    pub updates: broadcast::Sender<ApprovalRequest>,
}

impl ApiState {
    pub fn new(
        broker: BrokerHandle,
        approvers: &[Approver],
        db: PathBuf,
        updates: broadcast::Sender<ApprovalRequest>,
    ) -> Self {
        let tokens = approvers
            .iter()
            .map(|a| (a.token.clone(), a.name.clone()))
            .collect();
        Self {
            broker,
            tokens,
            db,
            updates,
        }
    }
}

/// Every route: (path, method, handler). The OpenAPI document names
/// exactly these (a test compares them).
pub fn routes() -> Vec<(&'static str, &'static str, MethodRouter<Arc<ApiState>>)> {
    vec![
        ("/v1/requests", "get", get(list)),
        ("/v1/requests/{id}", "get", get(one)),
        ("/v1/requests/{id}/approve", "post", post(approve)),
        ("/v1/requests/{id}/deny", "post", post(deny)),
        ("/v1/sessions/{id}/events", "get", get(session_events)),
        ("/v1/stream", "get", get(stream)),
        ("/v1/openapi.json", "get", get(openapi)),
    ]
}

pub fn router(state: Arc<ApiState>) -> Router {
    routes()
        .into_iter()
        .fold(Router::new(), |r, (path, _, handler)| {
            r.route(path, handler)
        })
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "no such endpoint; see /v1/openapi.json",
            )
        })
        .with_state(state)
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<ApiState>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move {
            let _ = shutdown.changed().await;
        })
        .await
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    ApiError(status, message.into()).into_response()
}

/// An error answer: its status and a JSON body `{"error": "..."}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

/// The approver behind the bearer token, or a 401.
fn approver(state: &ApiState, headers: &HeaderMap) -> Result<String, ApiError> {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| {
            ApiError(
                StatusCode::UNAUTHORIZED,
                "missing bearer token (Authorization: Bearer TOKEN)".into(),
            )
        })?;
    state
        .tokens
        .get(token.trim())
        .cloned()
        .ok_or_else(|| ApiError(StatusCode::UNAUTHORIZED, "unknown token".into()))
}

async fn read_store<T: Send + 'static>(
    state: &ApiState,
    f: impl FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    let db = state.db.clone();
    tokio::task::spawn_blocking(move || Store::open_read_only(&db).and_then(|s| f(&s)))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
}

async fn list(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    q: Result<Query<ListQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    if let Err(r) = approver(&state, &headers) {
        return r.into_response();
    }
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            "the only query parameter is state=pending|approved|denied|timed_out|abandoned|failed",
        );
    };
    let wanted = match q.state.as_deref().map(|s| (s, ReqState::parse(s))) {
        None => None,
        Some((_, Some(st))) => Some(st),
        Some((s, None)) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "unknown state {s:?}: use pending, approved, denied, timed_out, abandoned or failed"
                ),
            );
        }
    };
    match read_store(&state, move |s| s.requests(wanted)).await {
        Ok(v) => Json(v).into_response(),
        Err(r) => r.into_response(),
    }
}

async fn one(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let id = match approver(&state, &headers).and(number(&id, "request")) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    match read_store(&state, move |s| s.request(id)).await {
        Ok(Some(r)) => Json(r).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no request {id}")),
        Err(r) => r.into_response(),
    }
}

/// A session's events in time order, the policy's decisions (and monitor
/// rules' would-be decisions) among them: a replay over the API.
async fn session_events(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let id = match approver(&state, &headers).and(number(&id, "session")) {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    match read_store(&state, move |s| match s.events(id) {
        Err(StoreError::NoSession(_)) => Ok(None),
        r => r.map(Some),
    })
    .await
    {
        Ok(Some(v)) => Json(v).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no session {id}")),
        Err(r) => r.into_response(),
    }
}

/// A path's id, or a 400 saying what it should have been.
fn number(raw: &str, what: &str) -> Result<u64, ApiError> {
    raw.parse().map_err(|_| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("{what} id must be a number, got {raw:?}"),
        )
    })
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct DecideBody {
    reason: Option<String>,
}

async fn approve(
    state: State<Arc<ApiState>>,
    headers: HeaderMap,
    id: Path<String>,
    body: axum::body::Bytes,
) -> Response {
    decide(state, headers, id, body, true).await
}

async fn deny(
    state: State<Arc<ApiState>>,
    headers: HeaderMap,
    id: Path<String>,
    body: axum::body::Bytes,
) -> Response {
    decide(state, headers, id, body, false).await
}

async fn decide(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Bytes,
    approve: bool,
) -> Response {
    let by = match approver(&state, &headers) {
        Ok(by) => by,
        Err(r) => return r.into_response(),
    };
    let id = match number(&id, "request") {
        Ok(id) => id,
        Err(r) => return r.into_response(),
    };
    let body: DecideBody = if body.iter().all(u8::is_ascii_whitespace) {
        DecideBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("body must be JSON like {{\"reason\": \"...\"}}: {e}"),
                );
            }
        }
    };
    match state.broker.decide(id, approve, by, body.reason).await {
        Ok(r) => Json(r).into_response(),
        Err(e) => {
            let status = match e {
                DecideError::NotFound(_) => StatusCode::NOT_FOUND,
                DecideError::AlreadyDecided { .. } | DecideError::AlreadyApproved { .. } => {
                    StatusCode::CONFLICT
                }
                DecideError::SelfApproval { .. } | DecideError::NotAnApprover { .. } => {
                    StatusCode::FORBIDDEN
                }
                DecideError::LabelsUnread { .. } | DecideError::Stopped => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
            };
            error(status, e.to_string())
        }
    }
}

async fn stream(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Response {
    if let Err(r) = approver(&state, &headers) {
        return r.into_response();
    }
    let rx = state.updates.subscribe();
    let events: std::pin::Pin<Box<dyn Stream<Item = Result<Event, Infallible>> + Send>> =
        Box::pin(BroadcastStream::new(rx).filter_map(|r| {
            let r = r.ok()?;
            let name = if r.state == ReqState::Pending {
                "request"
            } else {
                "resolved"
            };
            Some(Ok(Event::default()
                .event(name)
                .json_data(&r)
                .unwrap_or_default()))
        }));
    Sse::new(events)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

/// The OpenAPI document, checked to be valid JSON by a test.
pub const OPENAPI: &str = include_str!("openapi.json");
