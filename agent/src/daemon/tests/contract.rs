//! The API's contract: the OpenAPI document names exactly the routes the
//! router serves, and every status the API answers with is documented for
//! the operation that answered it.

use std::{collections::BTreeSet, sync::Arc};

use reqwest::{Method, StatusCode};
use tokio::sync::{broadcast, watch};

use super::{ALICE, BOB, harness};
use crate::daemon::{
    api::{ApiState, OPENAPI, routes, serve},
    handles::BrokerHandle,
};

fn doc() -> serde_json::Value {
    serde_json::from_str(OPENAPI).expect("the OpenAPI document is JSON")
}

#[test]
fn openapi_names_exactly_the_routes_the_router_serves() {
    let doc = doc();
    let documented: BTreeSet<(String, String)> = doc["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, ops)| {
            ops.as_object()
                .expect("operations")
                .keys()
                .map(move |m| (path.clone(), m.clone()))
        })
        .collect();
    let served: BTreeSet<(String, String)> = routes()
        .into_iter()
        .map(|(p, m, _)| (p.to_string(), m.to_string()))
        .collect();
    assert_eq!(documented, served);
}

/// Serves `state` on a port of its own; its base URL.
async fn serve_state(state: ApiState) -> (String, watch::Sender<bool>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (tx, rx) = watch::channel(false);
    tokio::spawn(serve(listener, Arc::new(state), rx));
    (base, tx)
}

/// The path template in the document that `path` (with real ids) fills.
fn template(path: &str) -> String {
    let path = path.split('?').next().unwrap_or(path);
    path.split('/')
        .map(|seg| {
            if seg.chars().next().is_some_and(|c| c.is_ascii_digit()) || seg == "abc" {
                "{id}"
            } else {
                seg
            }
        })
        .collect::<Vec<_>>()
        .join("/")
}

#[tokio::test]
async fn every_status_the_api_answers_is_documented() {
    let mut h = harness(300).await;
    assert_eq!(super::pending(&h).await.len(), 1);
    // The same store, behind a broker that has stopped.
    let (stopped, _) = BrokerHandle::channel();
    let (updates, _) = broadcast::channel(1);
    let db = h._dir.path().join("airlock.db");
    let (down, _d) = serve_state(ApiState::new(
        stopped,
        &super::approvers(),
        db,
        updates.clone(),
    ))
    .await;
    // An API whose store cannot be read.
    let (broken, _b) = serve_state(ApiState::new(
        h.assembly.broker.clone(),
        &super::approvers(),
        h._dir.path().join("no/such.db"),
        updates,
    ))
    .await;
    let none = "";
    let cases: &[(&str, Method, &str, &str, &str, StatusCode)] = &[
        (
            &h.base,
            Method::GET,
            "/v1/requests",
            none,
            "",
            StatusCode::UNAUTHORIZED,
        ),
        (
            &h.base,
            Method::GET,
            "/v1/requests?state=maybe",
            ALICE,
            "",
            StatusCode::BAD_REQUEST,
        ),
        (
            &h.base,
            Method::GET,
            "/v1/requests",
            ALICE,
            "",
            StatusCode::OK,
        ),
        (
            &broken,
            Method::GET,
            "/v1/requests",
            ALICE,
            "",
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
        (
            &h.base,
            Method::GET,
            "/v1/requests/abc",
            ALICE,
            "",
            StatusCode::BAD_REQUEST,
        ),
        (
            &h.base,
            Method::GET,
            "/v1/requests/99",
            ALICE,
            "",
            StatusCode::NOT_FOUND,
        ),
        (
            &h.base,
            Method::GET,
            "/v1/requests/1",
            none,
            "",
            StatusCode::UNAUTHORIZED,
        ),
        (
            &broken,
            Method::GET,
            "/v1/requests/1",
            ALICE,
            "",
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
        (
            &h.base,
            Method::GET,
            "/v1/requests/1",
            ALICE,
            "",
            StatusCode::OK,
        ),
        (
            &h.base,
            Method::GET,
            "/v1/sessions/abc/events",
            ALICE,
            "",
            StatusCode::BAD_REQUEST,
        ),
        (
            &h.base,
            Method::GET,
            "/v1/sessions/99/events",
            ALICE,
            "",
            StatusCode::NOT_FOUND,
        ),
        (
            &h.base,
            Method::GET,
            "/v1/sessions/1/events",
            none,
            "",
            StatusCode::UNAUTHORIZED,
        ),
        (
            &broken,
            Method::GET,
            "/v1/sessions/1/events",
            ALICE,
            "",
            StatusCode::INTERNAL_SERVER_ERROR,
        ),
        (
            &h.base,
            Method::GET,
            "/v1/sessions/1/events",
            ALICE,
            "",
            StatusCode::OK,
        ),
        (
            &h.base,
            Method::GET,
            "/v1/openapi.json",
            none,
            "",
            StatusCode::OK,
        ),
        (
            &h.base,
            Method::GET,
            "/v1/stream",
            none,
            "",
            StatusCode::UNAUTHORIZED,
        ),
        (
            &h.base,
            Method::POST,
            "/v1/requests/1/approve",
            none,
            "",
            StatusCode::UNAUTHORIZED,
        ),
        (
            &h.base,
            Method::POST,
            "/v1/requests/abc/approve",
            ALICE,
            "",
            StatusCode::BAD_REQUEST,
        ),
        (
            &h.base,
            Method::POST,
            "/v1/requests/1/approve",
            ALICE,
            "{not json",
            StatusCode::BAD_REQUEST,
        ),
        (
            &h.base,
            Method::POST,
            "/v1/requests/99/approve",
            ALICE,
            "",
            StatusCode::NOT_FOUND,
        ),
        (
            &h.base,
            Method::POST,
            "/v1/requests/1/approve",
            BOB,
            "",
            StatusCode::FORBIDDEN,
        ),
        (
            &h.base,
            Method::POST,
            "/v1/requests/1/deny",
            BOB,
            "",
            StatusCode::FORBIDDEN,
        ),
        (
            &down,
            Method::POST,
            "/v1/requests/1/approve",
            ALICE,
            "",
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            &down,
            Method::POST,
            "/v1/requests/1/deny",
            ALICE,
            "",
            StatusCode::SERVICE_UNAVAILABLE,
        ),
        (
            &h.base,
            Method::POST,
            "/v1/requests/1/approve",
            ALICE,
            "",
            StatusCode::OK,
        ),
        (
            &h.base,
            Method::POST,
            "/v1/requests/1/approve",
            ALICE,
            "",
            StatusCode::CONFLICT,
        ),
        (
            &h.base,
            Method::POST,
            "/v1/requests/1/deny",
            ALICE,
            "",
            StatusCode::CONFLICT,
        ),
        (
            &h.base,
            Method::POST,
            "/v1/requests/abc/deny",
            ALICE,
            "",
            StatusCode::BAD_REQUEST,
        ),
        (
            &h.base,
            Method::POST,
            "/v1/requests/99/deny",
            ALICE,
            "",
            StatusCode::NOT_FOUND,
        ),
        (
            &h.base,
            Method::POST,
            "/v1/requests/1/deny",
            none,
            "",
            StatusCode::UNAUTHORIZED,
        ),
    ];
    let doc = doc();
    let client = reqwest::Client::new();
    let mut seen = BTreeSet::new();
    for (base, method, path, token, body, want) in cases {
        let mut req = client.request(method.clone(), format!("{base}{path}"));
        if !token.is_empty() {
            req = req.bearer_auth(token);
        }
        if !body.is_empty() {
            req = req.body(body.to_string());
        }
        let got = req.send().await.unwrap().status();
        assert_eq!(got, *want, "{method} {path}");
        let op = &doc["paths"][template(path)][method.as_str().to_lowercase()];
        assert!(
            op["responses"].get(got.as_str()).is_some(),
            "{method} {path} answered {got}, which the document does not list for {}",
            template(path)
        );
        seen.insert((template(path), method.to_string()));
    }
    // Every documented operation was exercised (the stream's 200 by the
    // stream test).
    let served: BTreeSet<(String, String)> = routes()
        .into_iter()
        .map(|(p, m, _)| (p.to_string(), m.to_uppercase()))
        .collect();
    assert_eq!(seen, served);
    let _ = h.child.kill();
    let _ = h.child.wait();
}
