//! The stats/admin HTTP API, driven in-process with requests read from the fuzz input as
//! HTTP/1 text: a request line (`METHOD TARGET`), header lines, a blank line, the body.
//! Inputs that are not a well-formed method, URI or header are skipped: hyper refuses
//! those before the router sees them.
//!
//! Besides "never panics": no request reaches `set_state`, `set_weight` or
//! `running_config` unless it carried the admin token.
#![no_main]

use std::sync::{Arc, LazyLock, Mutex};

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Method, Request, Uri, header};
use libfuzzer_sys::fuzz_target;
use mxlb::stats::model::{AdminError, AdminState, StatsSnapshot, StatsSource};
use mxlb::stats::{Limits, PortCounters, router};
use tower::ServiceExt;

const TOKEN: &str = "fuzz-admin-token";

/// A daemon stand-in with one listener `smtp` and servers `mx1` and `mx2`; it records
/// every admin call that reaches it.
struct Fake {
    snapshot: StatsSnapshot,
    calls: Mutex<Vec<String>>,
}

impl Fake {
    /// Records an admin call on `listener/server` and answers as the daemon would.
    fn admin_call(&self, call: String, listener: &str, server: &str) -> Result<(), AdminError> {
        self.calls.lock().unwrap().push(call);
        match (listener, server) {
            ("smtp", "mx1" | "mx2") => Ok(()),
            ("smtp", _) => Err(AdminError::UnknownServer {
                listener: listener.to_owned(),
                server: server.to_owned(),
            }),
            _ => Err(AdminError::UnknownListener(listener.to_owned())),
        }
    }
}

impl StatsSource for Fake {
    fn snapshot(&self) -> StatsSnapshot {
        self.snapshot.clone()
    }

    fn set_state(&self, listener: &str, server: &str, state: AdminState) -> Result<(), AdminError> {
        self.admin_call(
            format!("set_state {listener}/{server} {state:?}"),
            listener,
            server,
        )
    }

    fn set_weight(&self, listener: &str, server: &str, weight: u32) -> Result<(), AdminError> {
        self.admin_call(
            format!("set_weight {listener}/{server} {weight}"),
            listener,
            server,
        )
    }

    fn running_config(&self) -> String {
        self.calls.lock().unwrap().push("running_config".to_owned());
        "[global]\n".to_owned()
    }
}

fn snapshot() -> StatsSnapshot {
    let server = |name: &str| {
        serde_json::json!({
            "name": name, "addr": "192.0.2.10:25", "status": "UP", "admin_state": "ready",
            "checked": true, "check_status": "L7OK/250 in 1ms", "check_detail": "250 mx <&>",
            "weight": 10, "backup": false, "sessions_cur": 1, "sessions_max": 2,
            "sessions_limit": 0, "sessions_total": 3, "bytes_in": 4, "bytes_out": 5,
            "kernel_bytes": 6, "connect_errors": 0, "last_change_secs": 1.5,
            "downtime_secs": 0.0
        })
    };
    let listener = serde_json::json!({
        "name": "smtp", "bind": ["0.0.0.0:25"], "balance": "roundrobin",
        "sessions_cur": 1, "sessions_max": 2, "sessions_limit": 100, "sessions_total": 3,
        "bytes_in": 4, "bytes_out": 5, "refused_no_server": 0,
        "refused_limits": {"global": 0, "listener": 0, "server": 0, "source_conn": 0,
                           "source_rate": 0, "resources": 0},
        "accept_errors": 0, "sources_tracked": 0, "servers": [server("mx1"), server("mx2")]
    });
    serde_json::from_value(serde_json::json!({
        "version": "0.1.0", "uptime_secs": 1.0, "relay": "kernel", "conns_cur": 1,
        "maxconn": 100, "listeners": [listener]
    }))
    .expect("a valid snapshot")
}

struct Harness {
    runtime: tokio::runtime::Runtime,
    fake: Arc<Fake>,
    router: Router,
}

static HARNESS: LazyLock<Harness> = LazyLock::new(|| {
    let fake = Arc::new(Fake {
        snapshot: snapshot(),
        calls: Mutex::new(Vec::new()),
    });
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a tokio runtime");
    let counters = Arc::new(PortCounters::new(Limits::default()));
    let router = router(fake.clone(), Some(TOKEN.to_owned()), counters);
    Harness {
        runtime,
        fake,
        router,
    }
});

fuzz_target!(|data: &[u8]| {
    let Some(request) = request(data) else {
        return;
    };
    let has_token = request
        .headers()
        .get_all(header::AUTHORIZATION)
        .iter()
        .any(|value| contains(value.as_bytes(), TOKEN.as_bytes()));
    let h = &*HARNESS;
    h.fake.calls.lock().unwrap().clear();
    h.runtime.block_on(async {
        let response = h.router.clone().oneshot(request).await.expect("infallible");
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("a response body");
    });
    let calls = h.fake.calls.lock().unwrap();
    assert!(
        has_token || calls.is_empty(),
        "an admin call reached without the token: {calls:?}"
    );
});

/// The request the input describes, or `None` if hyper would not have let it through.
fn request(data: &[u8]) -> Option<Request<Body>> {
    let (head, body) = match data.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(end) => (&data[..end], &data[end + 4..]),
        None => (data, &[][..]),
    };
    let mut lines = head
        .split(|&b| b == b'\n')
        .map(|l| l.strip_suffix(b"\r").unwrap_or(l));
    let mut request_line = lines.next()?.split(|&b| b == b' ');
    let method = Method::from_bytes(request_line.next()?).ok()?;
    let uri = Uri::try_from(request_line.next()?).ok()?;
    let mut request = Request::builder()
        .method(method)
        .uri(uri)
        .body(Body::from(body.to_vec()))
        .ok()?;
    for line in lines {
        let colon = line.iter().position(|&b| b == b':')?;
        let name = HeaderName::from_bytes(line[..colon].trim_ascii()).ok()?;
        let value = HeaderValue::from_bytes(line[colon + 1..].trim_ascii()).ok()?;
        request.headers_mut().append(name, value);
    }
    Some(request)
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
