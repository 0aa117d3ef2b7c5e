//! Helpers shared by the bench binaries (each binary uses a part of them).

#![allow(dead_code)]

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use bytes::Bytes;
use http::header::AUTHORIZATION;
use http::{Request, Response};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use tower_auth_refresh::{RefreshError, RefreshLayer, Token, refresh_fn};

/// The value of the environment variable `name`, or `default` if unset or unparsable.
pub(crate) fn env_or<T: FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of `v` (the upper middle for an even count); sorts `v`.
pub(crate) fn median<T: Copy + PartialOrd>(v: &mut [T]) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).expect("comparable figures"));
    v[v.len() / 2]
}

/// A layer holding a valid `secret`, whose refresher only counts its calls (and fails): a
/// benchmark asserts the count stays zero, so no refresh skews a figure.
pub(crate) fn valid_token_layer(secret: &str) -> (Arc<AtomicUsize>, RefreshLayer) {
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    let layer = RefreshLayer::new(refresh_fn(move |_stale| {
        counter.fetch_add(1, Ordering::SeqCst);
        async { Err::<Token, _>(RefreshError::terminal("no refresh in this benchmark")) }
    }))
    .initial_token(Token::bearer(secret).expect("a valid token"));
    (calls, layer)
}

/// CPU time this process has used (all threads, user + system), from `/proc/self/stat`, in
/// seconds (clock ticks of 10 ms).
pub(crate) fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at `state` (field 3).
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // utime and stime are fields 14 and 15, i.e. 11 and 12 after `state`.
    (ticks(11) + ticks(12)) / 100.0
}

/// Requests the [`token_server`] refused for a missing or wrong token.
pub(crate) static REFUSED: AtomicU64 = AtomicU64::new(0);

/// A hyper HTTP/1 server on `127.0.0.1:0` (`TCP_NODELAY`) that reads each request's body and
/// answers `200 ok`, counting in [`REFUSED`] the requests without `Bearer <secret>`.
pub(crate) async fn token_server(secret: &str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let expected = format!("Bearer {secret}");
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            stream.set_nodelay(true).unwrap();
            let expected = expected.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let ok = req
                        .headers()
                        .get(AUTHORIZATION)
                        .is_some_and(|v| v == expected.as_str());
                    async move {
                        if !ok {
                            REFUSED.fetch_add(1, Ordering::Relaxed);
                        }
                        req.into_body().collect().await?;
                        Ok::<_, hyper::Error>(Response::new(Full::new(Bytes::from_static(b"ok"))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

/// The request shapes of the end-to-end benches.
#[derive(Clone, Copy)]
pub(crate) enum Case {
    Get,
    Post1k,
}

impl Case {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Case::Get => "GET, empty body",
            Case::Post1k => "POST, 1 KiB body",
        }
    }

    /// The case a count mode runs, from the variable `var` (`get`, the default, or `post_1k`).
    #[allow(dead_code)] // not every bench has a count mode
    pub(crate) fn from_env(var: &str) -> Self {
        match std::env::var(var).as_deref().unwrap_or("get") {
            "get" => Case::Get,
            "post_1k" => Case::Post1k,
            other => panic!("unknown {var} {other}"),
        }
    }
}

/// What a count mode (instructions per request, for callgrind) starts from: the line and
/// case named by `<prefix>_LINE` (default `refresh`) and `<prefix>_CASE`, and a
/// current-thread runtime.
#[allow(dead_code)] // not every bench has a count mode
pub(crate) fn count_start(prefix: &str) -> (String, Case, tokio::runtime::Runtime) {
    let line = std::env::var(format!("{prefix}_LINE")).unwrap_or_else(|_| "refresh".into());
    let case = Case::from_env(&format!("{prefix}_CASE"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    (line, case, rt)
}

/// The loopback server a count mode sends to, the 1 KiB payload of its POSTs, and a layer
/// with a valid token (with its refresher's call count, which must stay 0).
#[allow(dead_code)] // not every bench has a count mode
pub(crate) async fn count_fixture(
    secret: &'static str,
) -> (SocketAddr, Bytes, Arc<AtomicUsize>, RefreshLayer) {
    let addr = token_server(secret).await;
    let (calls, layer) = valid_token_layer(secret);
    (addr, Bytes::from(vec![b'x'; 1024]), calls, layer)
}
