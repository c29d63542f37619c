//! The stats listener's HTTP side: routes and admin authentication ([`super::server`]
//! serves them within the port's limits).
//!
//! | request | answer |
//! |---|---|
//! | `GET /` | the HTML page ([`super::html`]) |
//! | `GET /api/stats` | the [`StatsSnapshot`] as JSON |
//! | `GET /metrics` | OpenMetrics text ([`super::prometheus`]) |
//! | `POST /api/servers/{listen}/{server}/state` | admin: `{"state":"ready"\|"drain"\|"maint"}` |
//! | `POST` (or `PUT`) `/api/servers/{listen}/{server}/weight` | admin: `{"weight":N}`, 0 to 256 |
//! | `GET /api/config` | admin: the running configuration as TOML, the token redacted |
//!
//! The GET routes answer from the shared snapshot ([`super::cache`]): fresh at a human or
//! scraper pace, at most 200 ms old under a flood, and each rendering made once per
//! snapshot. An admin change invalidates it, so its answer shows the state just set.
//! Errors are JSON `{"error": "..."}` so scripts driving the admin API can show them as
//! they are.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;

use super::cache::SnapshotCache;
use super::model::{AdminError, AdminState, ServerStats, StatsSource};
use super::prometheus;
use super::server::PortCounters;
use crate::config::MAX_WEIGHT;

/// The largest request body read: an admin request is a few dozen bytes, and nothing else
/// takes a body.
pub const BODY_LIMIT: usize = 4 * 1024;

/// Why a refused admin request was refused when there is no token to check against.
const ADMIN_DISABLED: &str = "admin API disabled (no [stats] admin_token)";

/// What every handler shares.
#[derive(Clone)]
struct App {
    cache: Arc<SnapshotCache>,
    /// `None`: the admin API is off and every admin request gets 403.
    admin_token: Option<Arc<str>>,
}

/// The stats routes over `source`; `admin_token` enables the admin API; `/metrics` shows
/// the port's own `counters` too.
pub fn router(
    source: Arc<dyn StatsSource>,
    admin_token: Option<String>,
    counters: Arc<PortCounters>,
) -> Router {
    let app = App {
        cache: Arc::new(SnapshotCache::new(source, counters)),
        admin_token: admin_token.map(Arc::from),
    };
    Router::new()
        .route("/", get(page))
        .route("/api/stats", get(api_stats))
        .route("/metrics", get(metrics))
        .route(
            "/api/servers/{listen}/{server}/{what}",
            post(change_server).put(change_server),
        )
        .route("/api/config", get(running_config))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .with_state(app)
}

/// Tells browsers and proxies that every answer is a moment's truth.
const NO_STORE: (header::HeaderName, &str) = (header::CACHE_CONTROL, "no-store");

/// The `Content-Type`s axum's `Html` and `Json` would set.
const HTML: &str = "text/html; charset=utf-8";
const JSON: &str = "application/json";
/// TOML has a registered type since 2024 (RFC 9618).
const TOML: &str = "application/toml";

async fn page(State(app): State<App>) -> Response {
    let body = app.cache.get().html();
    ([NO_STORE, (header::CONTENT_TYPE, HTML)], body).into_response()
}

async fn api_stats(State(app): State<App>) -> Response {
    let body = app.cache.get().json();
    ([NO_STORE, (header::CONTENT_TYPE, JSON)], body).into_response()
}

async fn metrics(State(app): State<App>) -> Response {
    let body = app.cache.get().metrics();
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

/// The weight request's body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct WeightRequest {
    /// Wider than a weight, so that 300 is told the range rather than a parse error.
    weight: u64,
}

/// An admin request to a server as it arrived.
struct AdminCall {
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    path: Result<Path<(String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
}

/// The pieces of an admin request to a server, once authenticated and parsed.
struct ServerRequest<T> {
    peer: String,
    listener: String,
    server: String,
    body: T,
}

/// Authenticates and parses `POST /api/servers/{listen}/{server}/…`. Authentication
/// comes first, so a caller without the token learns nothing (not even which servers
/// exist); the body is parsed whatever its `Content-Type`, since `curl -d` labels JSON as
/// a form. `shape` is the body's form, for the error message.
fn server_request<T: DeserializeOwned>(
    app: &App,
    call: AdminCall,
    shape: &str,
) -> Result<ServerRequest<T>, Box<Response>> {
    let AdminCall {
        peer,
        path,
        headers,
        body,
    } = call;
    let peer = peer_name(peer);
    if let Err(refusal) = authorize(app.admin_token.as_deref(), &headers) {
        tracing::warn!(%peer, reason = refusal.reason, "stats: admin request refused");
        return Err(Box::new(refusal.into_response()));
    }
    let (listener, server) = match path {
        Ok(Path(names)) => names,
        Err(rejection) => {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                &rejection.body_text(),
            )));
        }
    };
    let body = body.map_err(|r| error(r.status(), &r.body_text()))?;
    let body = serde_json::from_slice::<T>(&body).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            &format!("body must be {shape}: {e}"),
        )
    })?;
    Ok(ServerRequest {
        peer,
        listener,
        server,
        body,
    })
}

fn peer_name(peer: Option<Extension<ConnectInfo<SocketAddr>>>) -> String {
    peer.map_or_else(
        || "unknown".to_owned(),
        |Extension(ConnectInfo(a))| a.to_string(),
    )
}

/// What an admin change to a server answers: the server as the snapshot after the change
/// shows it, or why the change was refused.
fn server_changed<T>(
    app: &App,
    request: &ServerRequest<T>,
    changed: Result<(), AdminError>,
) -> Response {
    // Even a refused change drops the shared snapshot: the admin's next look is fresh.
    app.cache.invalidate();
    if let Err(e) = changed {
        return admin_error(&e);
    }
    match find_server(&app.cache, &request.listener, &request.server) {
        Some(stats) => Json(stats).into_response(),
        // A reload replaced the server between the change and the snapshot.
        None => error(
            StatusCode::CONFLICT,
            "changed, but the server is gone from the current configuration",
        ),
    }
}

/// `POST` (or `PUT`) `/api/servers/{listen}/{server}/{what}`: a change to a server, `state`
/// or `weight`.
async fn change_server(
    State(app): State<App>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    path: Result<Path<(String, String, String)>, PathRejection>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let (path, what) = match path {
        Ok(Path((listener, server, what))) => (Ok(Path((listener, server))), what),
        Err(rejection) => (Err(rejection), String::new()),
    };
    let call = AdminCall {
        peer,
        path,
        headers,
        body,
    };
    let answer = match what.as_str() {
        "weight" => set_weight(&app, call),
        // A path that could not be read ("") gets the state route's checks (token first).
        "state" | "" => set_state(&app, call),
        _ => match authorize(app.admin_token.as_deref(), &call.headers) {
            Err(refusal) => Ok(refusal.into_response()),
            Ok(()) => Ok(error(StatusCode::NOT_FOUND, "not found")),
        },
    };
    answer.unwrap_or_else(|response| *response)
}

/// `…/state`: the admin state, HAProxy's `set server … state`.
fn set_state(app: &App, call: AdminCall) -> Result<Response, Box<Response>> {
    let shape = r#"{"state":"ready"|"drain"|"maint"}"#;
    let request = server_request::<StateRequest>(app, call, shape)?;
    let state = request.body.state;
    let changed = app
        .cache
        .source()
        .set_state(&request.listener, &request.server, state);
    if changed.is_ok() {
        tracing::info!(peer = %request.peer, listener = %request.listener,
            server = %request.server, state = state.as_str(), "stats: admin set server state");
    }
    Ok(server_changed(app, &request, changed))
}

/// `…/weight`: HAProxy's `set weight`.
fn set_weight(app: &App, call: AdminCall) -> Result<Response, Box<Response>> {
    let shape = format!(r#"{{"weight":N}} with N from 0 to {MAX_WEIGHT}"#);
    let request = server_request::<WeightRequest>(app, call, &shape)?;
    let changed = match u32::try_from(request.body.weight) {
        Ok(weight) if weight <= MAX_WEIGHT => {
            let changed = app
                .cache
                .source()
                .set_weight(&request.listener, &request.server, weight);
            if changed.is_ok() {
                tracing::info!(peer = %request.peer, listener = %request.listener,
                    server = %request.server, weight, "stats: admin set server weight");
            }
            changed
        }
        _ => Err(AdminError::WeightOutOfRange {
            weight: request.body.weight,
            max: MAX_WEIGHT,
        }),
    };
    Ok(server_changed(app, &request, changed))
}

/// `GET /api/config`: the configuration in force as TOML. Behind the admin token: the
/// file may name internal addresses and users; the token itself is never shown.
async fn running_config(
    State(app): State<App>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
) -> Response {
    if let Err(refusal) = authorize(app.admin_token.as_deref(), &headers) {
        let peer = peer_name(peer);
        tracing::warn!(%peer, reason = refusal.reason, "stats: admin request refused");
        return refusal.into_response();
    }
    let text = app.cache.source().running_config();
    ([NO_STORE, (header::CONTENT_TYPE, TOML)], text).into_response()
}

fn admin_error(e: &AdminError) -> Response {
    match e {
        AdminError::UnknownListener(_) | AdminError::UnknownServer { .. } => {
            error(StatusCode::NOT_FOUND, &e.to_string())
        }
        AdminError::WeightOutOfRange { .. } => error(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}

/// The server as the snapshot after the change shows it.
fn find_server(cache: &SnapshotCache, listener: &str, server: &str) -> Option<ServerStats> {
    cache
        .get()
        .snapshot
        .listeners
        .iter()
        .find(|l| l.name == listener)?
        .servers
        .iter()
        .find(|s| s.name == server)
        .cloned()
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

    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;
    use tokio_util::sync::CancellationToken;

    use super::*;
    use crate::stats::model::StatsSnapshot;
    use crate::stats::prometheus::tests::sample;
    use crate::stats::server::{
        Limits, MAX_BUF_SIZE, MAX_HEADER_SIZE, MAX_HEADERS, NICE, Port, serve,
    };

    /// An admin call the fake received: listener, server, and what was set.
    type Call = (String, String, Change);

    #[derive(Clone, Debug, PartialEq, Eq)]
    enum Change {
        State(AdminState),
        Weight(u32),
    }

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
            self.change(listener, server, Change::State(state), |s| {
                s.admin_state = state.as_str().to_owned();
                s.status = state.as_str().to_uppercase().replace("READY", "UP");
            })
        }

        fn set_weight(&self, listener: &str, server: &str, weight: u32) -> Result<(), AdminError> {
            self.change(listener, server, Change::Weight(weight), |s| {
                s.weight = weight;
            })
        }

        fn running_config(&self) -> String {
            "[stats]\n# admin_token is set (not shown)\n".to_owned()
        }
    }

    impl Fake {
        /// Applies `apply` to the server and records the call, as the daemon would.
        fn change(
            &self,
            listener: &str,
            server: &str,
            change: Change,
            apply: impl FnOnce(&mut ServerStats),
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
            apply(s);
            self.calls
                .lock()
                .unwrap()
                .push((listener.to_owned(), server.to_owned(), change));
            Ok(())
        }
    }

    /// A running stats server and the means to stop it.
    struct Server {
        addr: SocketAddr,
        stop: CancellationToken,
        task: JoinHandle<std::io::Result<()>>,
        counters: Arc<PortCounters>,
    }

    async fn start(source: Arc<Fake>, token: Option<&str>) -> Server {
        start_with(source, token, Limits::default()).await
    }

    async fn start_with(source: Arc<Fake>, token: Option<&str>, limits: Limits) -> Server {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let counters = Arc::new(PortCounters::new(limits));
        let app = router(source, token.map(str::to_owned), counters.clone());
        let task = tokio::spawn(serve(listener, app, limits, counters.clone(), stop.clone()));
        Server {
            addr,
            stop,
            task,
            counters,
        }
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
            // HAProxy's Chk, Dwn, LastChg and Downtime, and the runtime weight.
            "checks_failed",
            "down_transitions",
            "last_change_secs",
            "last_change_at",
            "downtime_secs",
            "weight",
            "config_weight",
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
        let expected = vec![(
            "smtp".to_owned(),
            "mx1".to_owned(),
            Change::State(AdminState::Drain),
        )];
        assert_eq!(fake.calls(), expected);
    }

    const WEIGHT_PATH: &str = "/api/servers/smtp/mx1/weight";

    #[tokio::test]
    async fn weight_is_set_with_the_token_and_within_the_range() {
        let fake = Fake::new();
        let server = start(fake.clone(), Some(TOKEN)).await;
        let reply = request(server.addr, "POST", WEIGHT_PATH, &[], r#"{"weight":3}"#).await;
        assert_eq!(reply.status, 401);
        for bad in [r#"{"weight":257}"#, r#"{"weight":4294967296}"#] {
            let reply = request(server.addr, "POST", WEIGHT_PATH, &[GOOD_AUTH], bad).await;
            assert_eq!(reply.status, 400, "{bad}");
            assert!(
                reply
                    .error()
                    .starts_with("weight must be between 0 and 256"),
                "{}",
                reply.error()
            );
        }
        for bad in [r#"{"weight":-1}"#, r#"{"weight":"3"}"#, r#"{"w":3}"#, ""] {
            let reply = request(server.addr, "POST", WEIGHT_PATH, &[GOOD_AUTH], bad).await;
            assert_eq!(reply.status, 400, "{bad}");
            assert!(
                reply
                    .error()
                    .starts_with(r#"body must be {"weight":N} with N from 0 to 256"#),
                "{}",
                reply.error()
            );
        }
        let unknown = "/api/servers/smtp/mx9/weight";
        let reply = request(server.addr, "PUT", unknown, &[GOOD_AUTH], r#"{"weight":3}"#).await;
        assert_eq!(reply.status, 404);
        assert!(fake.calls().is_empty());
        for (method, weight) in [("POST", 3), ("PUT", 0)] {
            let body = format!(r#"{{"weight":{weight}}}"#);
            let reply = request(server.addr, method, WEIGHT_PATH, &[GOOD_AUTH], &body).await;
            assert_eq!(reply.status, 200, "{method}: {}", reply.body);
            let stats: ServerStats = serde_json::from_str(&reply.body).unwrap();
            assert_eq!(stats.weight, weight);
        }
        let set = |w| ("smtp".to_owned(), "mx1".to_owned(), Change::Weight(w));
        assert_eq!(fake.calls(), [set(3), set(0)]);
    }

    #[tokio::test]
    async fn unknown_server_change_is_404_after_the_token() {
        let fake = Fake::new();
        let server = start(fake.clone(), Some(TOKEN)).await;
        let path = "/api/servers/smtp/mx1/colour";
        let reply = request(server.addr, "POST", path, &[], "{}").await;
        assert_eq!(reply.status, 401);
        let reply = request(server.addr, "POST", path, &[GOOD_AUTH], "{}").await;
        assert_eq!(reply.status, 404);
        assert!(fake.calls().is_empty());
    }

    #[tokio::test]
    async fn running_config_needs_the_token() {
        let server = start(Fake::new(), Some(TOKEN)).await;
        let reply = request(server.addr, "GET", "/api/config", &[], "").await;
        assert_eq!(reply.status, 401);
        let wrong = [("Authorization", "Bearer nope")];
        let reply = request(server.addr, "GET", "/api/config", &wrong, "").await;
        assert_eq!(reply.status, 401);
        let reply = request(server.addr, "GET", "/api/config", &[GOOD_AUTH], "").await;
        assert_eq!(reply.status, 200);
        assert_eq!(reply.header("content-type"), Some(TOML));
        assert_eq!(reply.header("cache-control"), Some("no-store"));
        assert!(reply.body.starts_with("[stats]\n"), "{}", reply.body);
        let disabled = start(Fake::new(), None).await;
        let reply = request(disabled.addr, "GET", "/api/config", &[GOOD_AUTH], "").await;
        assert_eq!(reply.status, 403);
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

    /// Short enough that the timeout tests are quick, long enough for any request here.
    const SHORT: Duration = Duration::from_millis(400);

    /// The bound for anything that must end: far past every limit, short of a hang.
    const HANG: Duration = Duration::from_secs(20);

    /// Reads one response off a kept-alive connection (head, then Content-Length bytes).
    async fn read_response(stream: &mut TcpStream) -> Reply {
        let mut raw = Vec::new();
        let mut byte = [0u8; 1];
        while !raw.ends_with(b"\r\n\r\n") {
            assert_eq!(stream.read(&mut byte).await.unwrap(), 1, "closed mid-head");
            raw.push(byte[0]);
        }
        let head = String::from_utf8(raw).unwrap();
        let mut reply = parse_reply(&head);
        let length: usize = reply.header("content-length").unwrap().parse().unwrap();
        let mut body = vec![0u8; length];
        stream.read_exact(&mut body).await.unwrap();
        reply.body = String::from_utf8(body).unwrap();
        reply
    }

    /// A connection with one keep-alive `GET /api/stats` answered: it surely holds a place.
    async fn served_connection(addr: SocketAddr) -> TcpStream {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /api/stats HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(read_response(&mut stream).await.status, 200);
        stream
    }

    /// Everything the server sends until it closes the connection (a reset counts as a
    /// close); panics if it is still open after [`HANG`].
    async fn read_until_closed(stream: &mut TcpStream) -> Vec<u8> {
        let mut raw = Vec::new();
        let mut buffer = [0u8; 4096];
        tokio::time::timeout(HANG, async {
            loop {
                match stream.read(&mut buffer).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => raw.extend_from_slice(&buffer[..n]),
                }
            }
        })
        .await
        .expect("the server closed the connection");
        raw
    }

    fn timeouts(limit: Duration) -> Limits {
        Limits {
            timeout: limit,
            ..Limits::default()
        }
    }

    #[tokio::test]
    async fn slowloris_is_closed_at_the_timeout() {
        let server = start_with(Fake::new(), None, timeouts(SHORT)).await;
        let stream = TcpStream::connect(server.addr).await.unwrap();
        let (mut reader, mut writer) = stream.into_split();
        // A header byte every 50 ms, for as long as the server listens: activity alone
        // does not keep a connection.
        let dribble = tokio::spawn(async move {
            let request = b"GET / HTTP/1.1\r\nHost: test\r\nX-Slow: "
                .iter()
                .chain(std::iter::repeat(&b'a'));
            for byte in request {
                if writer.write_all(&[*byte]).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
        let mut raw = Vec::new();
        tokio::time::timeout(HANG, reader.read_to_end(&mut raw))
            .await
            .expect("the slow client was closed")
            .ok();
        assert!(raw.is_empty(), "no answer to a request never finished");
        tokio::time::timeout(HANG, dribble).await.unwrap().unwrap();
        assert_eq!(server.counters.stats().timed_out, 1);
        assert_eq!(server.counters.stats().connections_cur, 0);
    }

    #[tokio::test]
    async fn idle_and_slow_body_connections_are_closed_at_the_timeout() {
        let fake = Fake::new();
        let server = start_with(fake.clone(), Some(TOKEN), timeouts(SHORT)).await;
        // Says nothing at all.
        let mut idle = TcpStream::connect(server.addr).await.unwrap();
        // A kept-alive connection after its answer.
        let mut kept = served_connection(server.addr).await;
        // Headers in time, then a body that never comes.
        let mut slow_body = TcpStream::connect(server.addr).await.unwrap();
        let head = format!(
            "POST {STATE_PATH} HTTP/1.1\r\nHost: test\r\nAuthorization: Bearer {TOKEN}\r\n\
             Content-Length: 17\r\n\r\n{{\"state\""
        );
        slow_body.write_all(head.as_bytes()).await.unwrap();
        for stream in [&mut idle, &mut kept, &mut slow_body] {
            assert!(read_until_closed(stream).await.is_empty());
        }
        assert!(fake.calls().is_empty());
        let stats = server.counters.stats();
        assert_eq!(
            (stats.timed_out, stats.connections_cur),
            (3, 0),
            "{stats:?}"
        );
    }

    #[tokio::test]
    async fn each_request_moves_the_deadline() {
        let server = start_with(Fake::new(), None, timeouts(SHORT)).await;
        let mut stream = served_connection(server.addr).await;
        // Requests spaced at half the timeout: together far longer than one timeout.
        for _ in 0..6 {
            tokio::time::sleep(SHORT / 2).await;
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\n\r\n")
                .await
                .unwrap();
            assert_eq!(read_response(&mut stream).await.status, 200);
        }
        assert_eq!(server.counters.stats().timed_out, 0);
    }

    #[tokio::test]
    async fn connections_over_the_cap_are_refused() {
        let limits = Limits {
            maxconn: 3,
            ..Limits::default()
        };
        let server = start_with(Fake::new(), None, limits).await;
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(served_connection(server.addr).await);
        }
        for _ in 0..5 {
            let mut extra = TcpStream::connect(server.addr).await.unwrap();
            let raw = read_until_closed(&mut extra).await;
            let reply = parse_reply(&String::from_utf8(raw).unwrap());
            assert_eq!(reply.status, 503);
            assert_eq!(reply.error(), "too many connections to the stats port");
        }
        let stats = server.counters.stats();
        assert_eq!(
            (
                stats.connections_cur,
                stats.connections_total,
                stats.refused
            ),
            (3, 3, 5),
            "{stats:?}"
        );
        // A place given back is a place for the next client; the held ones still work.
        drop(held.pop());
        let reply = tokio::time::timeout(HANG, async {
            loop {
                let mut stream = TcpStream::connect(server.addr).await.unwrap();
                stream
                    .write_all(
                        b"GET /api/stats HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n",
                    )
                    .await
                    .unwrap();
                let raw = read_until_closed(&mut stream).await;
                let reply = parse_reply(&String::from_utf8(raw).unwrap());
                if reply.status == 200 {
                    return reply;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("a freed place is used");
        assert_eq!(
            serde_json::from_str::<StatsSnapshot>(&reply.body).unwrap(),
            sample()
        );
        for stream in &mut held {
            stream
                .write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
                .await
                .unwrap();
            assert_eq!(read_response(stream).await.status, 200);
        }
    }

    #[tokio::test]
    async fn a_page_larger_than_the_buffers_is_served_whole() {
        let fake = Fake::new();
        {
            let mut snapshot = fake.snapshot.lock().unwrap();
            let server = snapshot.listeners[0].servers[0].clone();
            snapshot.listeners[0].servers = (0..2000)
                .map(|i| ServerStats {
                    name: format!("mx{i}"),
                    ..server.clone()
                })
                .collect();
        }
        let server = start(fake.clone(), None).await;
        let reply = request(server.addr, "GET", "/", &[], "").await;
        assert_eq!(reply.status, 200);
        assert!(reply.body.len() > 16 * MAX_BUF_SIZE, "{}", reply.body.len());
        assert!(reply.body.contains(r#"id="srv-smtp-mx1999""#));
        let reply = request(server.addr, "GET", "/api/stats", &[], "").await;
        let parsed: StatsSnapshot = serde_json::from_str(&reply.body).unwrap();
        assert_eq!(parsed, fake.snapshot());
    }

    #[tokio::test]
    async fn oversized_or_too_many_headers_are_431() {
        let server = start(Fake::new(), None).await;
        let big = "x".repeat(MAX_HEADER_SIZE);
        let reply = request(server.addr, "GET", "/api/stats", &[("X-Big", &big)], "").await;
        assert_eq!(reply.status, 431);
        let names: Vec<String> = (0..MAX_HEADERS).map(|i| format!("X-H{i}")).collect();
        let many: Vec<(&str, &str)> = names.iter().map(|n| (n.as_str(), "1")).collect();
        let reply = request(server.addr, "GET", "/api/stats", &many, "").await;
        assert_eq!(reply.status, 431);
        // Just under both limits is fine.
        let few = &many[..MAX_HEADERS - 4];
        let reply = request(server.addr, "GET", "/api/stats", few, "").await;
        assert_eq!(reply.status, 200);
    }

    #[tokio::test]
    async fn metrics_show_the_port() {
        let limits = Limits {
            maxconn: 1,
            ..Limits::default()
        };
        let server = start_with(Fake::new(), None, limits).await;
        let held = served_connection(server.addr).await;
        let mut refused = TcpStream::connect(server.addr).await.unwrap();
        read_until_closed(&mut refused).await;
        drop(held);
        // Served once the held connection's end is noticed (503 until then).
        let reply = tokio::time::timeout(HANG, async {
            loop {
                let reply = request(server.addr, "GET", "/metrics", &[], "").await;
                if reply.status == 200 {
                    return reply;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("served once the place is free");
        let value = |name: &str| -> u64 {
            let prefix = format!("{name} ");
            let line = reply.body.lines().find(|l| l.starts_with(&prefix));
            line.unwrap_or_else(|| panic!("{name} in\n{}", reply.body))[prefix.len()..]
                .parse()
                .unwrap()
        };
        // This request's own connection is the one open.
        assert_eq!(value("mxlb_stats_connections_current"), 1);
        assert_eq!(value("mxlb_stats_connections_limit"), 1);
        assert_eq!(value("mxlb_stats_connections_total"), 2);
        assert!(value("mxlb_stats_connections_refused_total") >= 1);
        assert_eq!(value("mxlb_stats_connections_timed_out_total"), 0);
        assert_eq!(value("mxlb_stats_snapshots_total"), 2);
    }

    /// The nice value of this process's thread called `name`, from /proc.
    fn thread_nice(name: &str) -> Option<i64> {
        std::fs::read_dir("/proc/self/task")
            .ok()?
            .flatten()
            .find_map(|task| {
                let stat = std::fs::read_to_string(task.path().join("stat")).ok()?;
                let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
                // Field 19 (nice) is the 17th after the command name.
                (comm == name).then(|| rest.split_whitespace().nth(16)?.parse().ok())?
            })
    }

    #[tokio::test]
    async fn own_thread_serves_at_a_lower_priority_and_stops() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits::default();
        let counters = Arc::new(PortCounters::new(limits));
        let port = Port {
            listener,
            router: router(Fake::new(), None, counters.clone()),
            limits,
            counters,
        };
        let stop = CancellationToken::new();
        let thread = port.spawn(stop.clone()).unwrap();
        let reply = request(addr, "GET", "/api/stats", &[], "").await;
        assert_eq!(reply.status, 200);
        assert_eq!(thread_nice("mxlb-stats"), Some(i64::from(NICE)));
        stop.cancel();
        let joined = tokio::task::spawn_blocking(move || thread.join());
        tokio::time::timeout(HANG, joined)
            .await
            .expect("the thread ends once stopped")
            .unwrap()
            .unwrap();
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "the port is closed"
        );
    }

    #[test]
    fn constant_time_eq_compares() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(constant_time_eq(b"", b""));
    }
}
