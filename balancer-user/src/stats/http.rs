//! The stats listener's HTTP side: routes, admin authentication, serving until stopped.
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | the HTML page ([`super::html`]) |
//! | `GET /api/stats` | the [`StatsSnapshot`] as JSON |
//! | `GET /metrics` | OpenMetrics text ([`super::prometheus`]) |
//! | `POST /api/servers/{listen}/{server}/state` | admin: `{"state":"ready"\|"drain"\|"maint"}` |
//!
//! Every request takes a fresh snapshot from the [`StatsSource`]: building one is cheap,
//! and a cache would only make the page lag behind the logs. Errors are JSON
//! `{"error": "..."}` so scripts driving the admin API can show them as they are.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::model::{AdminError, AdminState, ServerStats, StatsSource};
use super::{html, prometheus};

/// The largest request body read: an admin request is a few dozen bytes, and nothing else
/// takes a body.
const BODY_LIMIT: usize = 4 * 1024;

/// How long [`serve`] waits, once stopped, for open requests to finish. Past it the
/// daemon's shutdown is not held hostage by a stalled HTTP client.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

/// Why a refused admin request was refused when there is no token to check against.
const ADMIN_DISABLED: &str = "admin API disabled (no [stats] admin_token)";

/// What every handler shares.
#[derive(Clone)]
struct App {
    source: Arc<dyn StatsSource>,
    /// `None`: the admin API is off and every admin request gets 403.
    admin_token: Option<Arc<str>>,
}

/// The stats routes over `source`; `admin_token` enables the admin API.
pub fn router(source: Arc<dyn StatsSource>, admin_token: Option<String>) -> Router {
    let app = App {
        source,
        admin_token: admin_token.map(Arc::from),
    };
    Router::new()
        .route("/", get(page))
        .route("/api/stats", get(api_stats))
        .route("/metrics", get(metrics))
        .route("/api/servers/{listen}/{server}/state", post(set_state))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

/// Serves `router` on `listener` until `stop` is cancelled, then stops accepting, lets
/// requests in flight finish (idle keep-alive connections are closed) and returns; after
/// [`SHUTDOWN_GRACE`] it returns anyway.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let service = router.into_make_service_with_connect_info::<SocketAddr>();
    let server = axum::serve(listener, service)
        .with_graceful_shutdown(stop.clone().cancelled_owned())
        .into_future();
    let grace_over = async {
        stop.cancelled().await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        result = server => result,
        () = grace_over => {
            tracing::warn!(grace = ?SHUTDOWN_GRACE, "stats: requests still open at shutdown, leaving them");
            Ok(())
        }
    }
}

/// Tells browsers and proxies that every answer is a moment's truth.
const NO_STORE: (header::HeaderName, &str) = (header::CACHE_CONTROL, "no-store");

async fn page(State(app): State<App>) -> Response {
    ([NO_STORE], Html(html::render(&app.source.snapshot()))).into_response()
}

async fn api_stats(State(app): State<App>) -> Response {
    ([NO_STORE], Json(app.source.snapshot())).into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    let body = prometheus::render(&app.source.snapshot());
    (
        [NO_STORE, (header::CONTENT_TYPE, prometheus::CONTENT_TYPE)],
        body,
    )
        .into_response()
}

async fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not found")
}

/// The admin request's body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct StateRequest {
    state: AdminState,
}

/// `POST /api/servers/{listen}/{server}/state`. Authentication comes first, so a caller
/// without the token learns nothing (not even which servers exist); the body is parsed
/// whatever its `Content-Type`, since `curl -d` labels JSON as a form.
async fn set_state(
    State(app): State<App>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let peer = peer.map_or_else(
        || "unknown".to_owned(),
        |Extension(ConnectInfo(a))| a.to_string(),
    );
    if let Err(refusal) = authorize(app.admin_token.as_deref(), &headers) {
        tracing::warn!(%peer, reason = refusal.reason, "stats: admin request refused");
        return refusal.into_response();
    }
    let (listener, server) = match path {
        Ok(Path(names)) => names,
        Err(rejection) => return error(StatusCode::BAD_REQUEST, &rejection.body_text()),
    };
    let state = match body
        .map_err(|r| (r.status(), r.body_text()))
        .and_then(parse_body)
    {
        Ok(state) => state,
        Err((status, message)) => return error(status, &message),
    };
    if let Err(e) = app.source.set_state(&listener, &server, state) {
        return admin_error(&e);
    }
    tracing::info!(%peer, %listener, %server, state = state.as_str(), "stats: admin set server state");
    match find_server(app.source.as_ref(), &listener, &server) {
        Some(stats) => Json(stats).into_response(),
        // A reload replaced the server between the change and the snapshot.
        None => error(
            StatusCode::CONFLICT,
            "state set, but the server is gone from the current configuration",
        ),
    }
}

fn parse_body(body: Bytes) -> Result<AdminState, (StatusCode, String)> {
    serde_json::from_slice::<StateRequest>(&body)
        .map(|request| request.state)
        .map_err(|e| {
            let message = format!(r#"body must be {{"state":"ready"|"drain"|"maint"}}: {e}"#);
            (StatusCode::BAD_REQUEST, message)
        })
}

fn admin_error(e: &AdminError) -> Response {
    match e {
        AdminError::UnknownListener(_) | AdminError::UnknownServer { .. } => {
            error(StatusCode::NOT_FOUND, &e.to_string())
        }
    }
}

fn find_server(source: &dyn StatsSource, listener: &str, server: &str) -> Option<ServerStats> {
    source
        .snapshot()
        .listeners
        .into_iter()
        .find(|l| l.name == listener)?
        .servers
        .into_iter()
        .find(|s| s.name == server)
}

/// An admin request turned away before it could change anything.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    reason: &'static str,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let mut response = error(self.status, self.reason);
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = HeaderValue::from_static("Bearer");
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, challenge);
        }
        response
    }
}

/// Checks `Authorization: Bearer <token>` against the configured token.
fn authorize(expected: Option<&str>, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(expected) = expected else {
        return Err(Refusal {
            status: StatusCode::FORBIDDEN,
            reason: ADMIN_DISABLED,
        });
    };
    let unauthorized = |reason| Refusal {
        status: StatusCode::UNAUTHORIZED,
        reason,
    };
    let presented = bearer_token(headers).ok_or(unauthorized("missing bearer token"))?;
    if constant_time_eq(presented.as_bytes(), expected.as_bytes()) {
        Ok(())
    } else {
        Err(unauthorized("invalid bearer token"))
    }
}

/// The token of an `Authorization: Bearer` header (the scheme is case-insensitive).
fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Compares without stopping at the first difference, so response timing does not reveal
/// how much of a guessed token was right (the length is not secret enough to hide).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// A JSON error: `{"error": message}`.
fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": message }))).into_response()
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio::task::JoinHandle;

    use super::*;
    use crate::stats::model::StatsSnapshot;
    use crate::stats::prometheus::tests::sample;

    type Call = (String, String, AdminState);

    /// A daemon stand-in: serves the sample snapshot and records admin calls.
    struct Fake {
        snapshot: Mutex<StatsSnapshot>,
        calls: Mutex<Vec<Call>>,
    }

    impl Fake {
        fn new() -> Arc<Fake> {
            Arc::new(Fake {
                snapshot: Mutex::new(sample()),
                calls: Mutex::new(Vec::new()),
            })
        }

        fn calls(&self) -> Vec<Call> {
            self.calls.lock().unwrap().clone()
        }
    }

    impl StatsSource for Fake {
        fn snapshot(&self) -> StatsSnapshot {
            self.snapshot.lock().unwrap().clone()
        }

        fn set_state(
            &self,
            listener: &str,
            server: &str,
            state: AdminState,
        ) -> Result<(), AdminError> {
            let mut snapshot = self.snapshot.lock().unwrap();
            let l = snapshot
                .listeners
                .iter_mut()
                .find(|l| l.name == listener)
                .ok_or_else(|| AdminError::UnknownListener(listener.to_owned()))?;
            let s = l
                .servers
                .iter_mut()
                .find(|s| s.name == server)
                .ok_or_else(|| AdminError::UnknownServer {
                    listener: listener.to_owned(),
                    server: server.to_owned(),
                })?;
            s.admin_state = state.as_str().to_owned();
            s.status = state.as_str().to_uppercase().replace("READY", "UP");
            self.calls
                .lock()
                .unwrap()
                .push((listener.to_owned(), server.to_owned(), state));
            Ok(())
        }
    }

    /// A running stats server and the means to stop it.
    struct Server {
        addr: SocketAddr,
        stop: CancellationToken,
        task: JoinHandle<std::io::Result<()>>,
    }

    async fn start(source: Arc<Fake>, token: Option<&str>) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let app = router(source, token.map(str::to_owned));
        let task = tokio::spawn(serve(listener, app, stop.clone()));
        Server { addr, stop, task }
    }

    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn error(&self) -> String {
            let value: serde_json::Value = serde_json::from_str(&self.body).unwrap();
            value["error"].as_str().unwrap().to_owned()
        }
    }

    /// A minimal HTTP/1.1 client: one request per connection, body read to EOF.
    async fn request(
        addr: SocketAddr,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &str,
    ) -> Reply {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let mut text = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (name, value) in headers {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        text.push_str("\r\n");
        text.push_str(body);
        stream.write_all(text.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        stream.read_to_end(&mut raw).await.unwrap();
        parse_reply(&String::from_utf8(raw).unwrap())
    }

    fn parse_reply(raw: &str) -> Reply {
        let (head, body) = raw.split_once("\r\n\r\n").unwrap();
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .unwrap()
            .split(' ')
            .nth(1)
            .unwrap()
            .parse()
            .unwrap();
        let headers = lines
            .map(|l| l.split_once(": ").unwrap())
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .collect();
        Reply {
            status,
            headers,
            body: body.to_owned(),
        }
    }

    const STATE_PATH: &str = "/api/servers/smtp/mx1/state";
    const TOKEN: &str = "s3cret";
    const GOOD_AUTH: (&str, &str) = ("Authorization", "Bearer s3cret");

    async fn post_state(server: &Server, path: &str, auth: &[(&str, &str)], body: &str) -> Reply {
        request(server.addr, "POST", path, auth, body).await
    }

    #[tokio::test]
    async fn page_is_html() {
        let server = start(Fake::new(), None).await;
        let reply = request(server.addr, "GET", "/", &[], "").await;
        assert_eq!(reply.status, 200);
        assert_eq!(
            reply.header("content-type"),
            Some("text/html; charset=utf-8")
        );
        assert_eq!(reply.header("cache-control"), Some("no-store"));
        assert!(
            reply
                .body
                .contains(r#"<tr id="srv-smtp-mx1" data-status="UP""#)
        );
    }

    #[tokio::test]
    async fn api_stats_round_trips() {
        let server = start(Fake::new(), None).await;
        let reply = request(server.addr, "GET", "/api/stats", &[], "").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some("application/json"));
        let parsed: StatsSnapshot = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(parsed, sample());
    }

    #[test]
    fn snapshot_json_round_trips() {
        let json = serde_json::to_string(&sample()).unwrap();
        let back: StatsSnapshot = serde_json::from_str(&json).unwrap();
        assert_eq!(back, sample());
        // The contract's field names.
        let value: serde_json::Value = serde_json::from_str(&json).unwrap();
        let server = &value["listeners"][0]["servers"][0];
        for field in [
            "name",
            "addr",
            "status",
            "check_status",
            "sessions_cur",
            "sessions_total",
            "bytes_in",
            "bytes_out",
        ] {
            assert!(!server[field].is_null(), "{field}");
        }
    }

    #[tokio::test]
    async fn metrics_are_openmetrics() {
        let server = start(Fake::new(), None).await;
        let reply = request(server.addr, "GET", "/metrics", &[], "").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some(prometheus::CONTENT_TYPE));
        assert!(reply.body.contains("mxlb_up 1\n"));
        assert!(reply.body.ends_with("# EOF\n"));
    }

    #[tokio::test]
    async fn unknown_path_is_404() {
        let server = start(Fake::new(), None).await;
        let reply = request(server.addr, "GET", "/nope", &[], "").await;
        assert_eq!(reply.status, 404);
        assert_eq!(reply.error(), "not found");
    }

    #[tokio::test]
    async fn admin_disabled_is_403() {
        let fake = Fake::new();
        let server = start(fake.clone(), None).await;
        let reply = post_state(&server, STATE_PATH, &[GOOD_AUTH], r#"{"state":"drain"}"#).await;
        assert_eq!(reply.status, 403);
        assert_eq!(reply.error(), ADMIN_DISABLED);
        assert!(fake.calls().is_empty());
    }

    #[tokio::test]
    async fn missing_token_is_401() {
        let fake = Fake::new();
        let server = start(fake.clone(), Some(TOKEN)).await;
        let reply = post_state(&server, STATE_PATH, &[], r#"{"state":"drain"}"#).await;
        assert_eq!(reply.status, 401);
        assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        assert!(fake.calls().is_empty());
        assert_eq!(fake.snapshot(), sample());
    }

    #[tokio::test]
    async fn wrong_token_is_401() {
        let fake = Fake::new();
        let server = start(fake.clone(), Some(TOKEN)).await;
        for auth in [
            "Bearer s3creT",
            "Bearer s3cret2",
            "Basic czNjcmV0",
            "Bearer",
            "s3cret",
        ] {
            let headers = [("Authorization", auth)];
            let reply = post_state(&server, STATE_PATH, &headers, r#"{"state":"drain"}"#).await;
            assert_eq!(reply.status, 401, "{auth}");
            assert_eq!(reply.header("www-authenticate"), Some("Bearer"));
        }
        assert!(fake.calls().is_empty());
    }

    #[tokio::test]
    async fn unknown_listener_or_server_is_404() {
        let fake = Fake::new();
        let server = start(fake.clone(), Some(TOKEN)).await;
        let body = r#"{"state":"maint"}"#;
        let reply = post_state(&server, "/api/servers/smtp/mx9/state", &[GOOD_AUTH], body).await;
        assert_eq!(reply.status, 404);
        assert!(reply.error().contains("mx9"), "{}", reply.error());
        let reply = post_state(&server, "/api/servers/imap/mx1/state", &[GOOD_AUTH], body).await;
        assert_eq!(reply.status, 404);
        assert!(fake.calls().is_empty());
    }

    #[tokio::test]
    async fn bad_body_is_400() {
        let fake = Fake::new();
        let server = start(fake.clone(), Some(TOKEN)).await;
        for body in [
            "",
            "drain",
            r#"{"state":"off"}"#,
            r#"{"state":"DRAIN"}"#,
            r#"{"state":"drain","x":1}"#,
            r#"{}"#,
        ] {
            let reply = post_state(&server, STATE_PATH, &[GOOD_AUTH], body).await;
            assert_eq!(reply.status, 400, "{body}");
            assert!(
                reply.error().starts_with("body must be"),
                "{}",
                reply.error()
            );
        }
        assert!(fake.calls().is_empty());
    }

    #[tokio::test]
    async fn oversized_body_is_refused() {
        let fake = Fake::new();
        let server = start(fake.clone(), Some(TOKEN)).await;
        let body = format!(r#"{{"state":"drain","pad":"{}"}}"#, "x".repeat(BODY_LIMIT));
        let reply = post_state(&server, STATE_PATH, &[GOOD_AUTH], &body).await;
        assert_eq!(reply.status, 413);
        assert!(fake.calls().is_empty());
    }

    #[tokio::test]
    async fn good_request_sets_state() {
        let fake = Fake::new();
        let server = start(fake.clone(), Some(TOKEN)).await;
        let headers = [GOOD_AUTH, ("Content-Type", "application/json")];
        let reply = post_state(&server, STATE_PATH, &headers, r#"{"state":"drain"}"#).await;
        assert_eq!(reply.status, 200, "{}", reply.body);
        let stats: ServerStats = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(
            (stats.name.as_str(), stats.admin_state.as_str()),
            ("mx1", "drain")
        );
        assert_eq!(stats.status, "DRAIN");
        let expected = vec![("smtp".to_owned(), "mx1".to_owned(), AdminState::Drain)];
        assert_eq!(fake.calls(), expected);
    }

    #[tokio::test]
    async fn bearer_scheme_is_case_insensitive() {
        let fake = Fake::new();
        let server = start(fake.clone(), Some(TOKEN)).await;
        let headers = [("Authorization", "bearer s3cret")];
        let reply = post_state(&server, STATE_PATH, &headers, r#"{"state":"maint"}"#).await;
        assert_eq!(reply.status, 200);
        assert_eq!(fake.calls().len(), 1);
    }

    #[tokio::test]
    async fn get_on_admin_route_changes_nothing() {
        let fake = Fake::new();
        let server = start(fake.clone(), Some(TOKEN)).await;
        let reply = request(server.addr, "GET", STATE_PATH, &[GOOD_AUTH], "").await;
        assert_eq!(reply.status, 405);
        assert!(fake.calls().is_empty());
    }

    #[tokio::test]
    async fn serve_returns_when_stopped() {
        let server = start(Fake::new(), None).await;
        // An idle keep-alive connection must not hold the shutdown up.
        let _idle = TcpStream::connect(server.addr).await.unwrap();
        server.stop.cancel();
        let result = tokio::time::timeout(Duration::from_secs(10), server.task)
            .await
            .unwrap()
            .unwrap();
        assert!(result.is_ok());
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }
}
