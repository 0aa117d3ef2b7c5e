//! The built-in OAuth 2.0 refresher behind `RefreshLayer`, with a hyper-util client.
//!
//! Starts two loopback servers: a token endpoint that rotates refresh tokens (and would
//! revoke the token family if a rotated one came back), and an API that accepts only the
//! latest access token. Each round the API forgets the current access token and 50 requests
//! start at once: those sent before the first 401 came back are refused, the layer refreshes
//! once and replays each of them once; the later ones wait for the new token.
//!
//! Run with `cargo run --example oauth2`.

use std::collections::HashSet;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;
use tower::{ServiceBuilder, ServiceExt};
use tower_auth_refresh::oauth2::{ClientAuth, OAuth2Refresher, RefreshToken};
use tower_auth_refresh::{BoxError, RefreshEvent, RefreshLayer, ReplayBody, Token};

const ROUNDS: usize = 5;
const CONCURRENCY: usize = 50;

/// What the token endpoint and the API share.
#[derive(Default)]
struct Idp {
    state: Mutex<IdpState>,
    token_requests: AtomicUsize,
    unauthorized: AtomicUsize,
}

#[derive(Default)]
struct IdpState {
    serial: u64,
    current_refresh: String,
    spent_refresh: HashSet<String>,
    valid_access: HashSet<String>,
    reuse_detected: usize,
}

impl Idp {
    fn login(&self) -> (String, String) {
        let mut st = self.state.lock().unwrap();
        st.serial += 1;
        let (access, refresh) = (format!("at-{}", st.serial), format!("rt-{}", st.serial));
        st.current_refresh = refresh.clone();
        st.valid_access.insert(access.clone());
        (access, refresh)
    }

    /// RFC 6749 §6 with rotation; RFC 9700 reuse detection.
    fn grant(&self, form: &[(String, String)]) -> (StatusCode, String) {
        let field = |name: &str| {
            form.iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let mut st = self.state.lock().unwrap();
        let presented = field("refresh_token").unwrap_or_default();
        if field("grant_type") != Some("refresh_token") || presented != st.current_refresh {
            if st.spent_refresh.contains(presented) {
                st.reuse_detected += 1;
                st.valid_access.clear();
                st.current_refresh.clear();
            }
            return (
                StatusCode::BAD_REQUEST,
                r#"{"error":"invalid_grant"}"#.to_owned(),
            );
        }
        st.serial += 1;
        let (access, refresh) = (format!("at-{}", st.serial), format!("rt-{}", st.serial));
        let spent = std::mem::replace(&mut st.current_refresh, refresh.clone());
        st.spent_refresh.insert(spent);
        st.valid_access.insert(access.clone());
        let body = format!(
            r#"{{"access_token":"{access}","token_type":"Bearer","expires_in":3600,"refresh_token":"{refresh}"}}"#
        );
        (StatusCode::OK, body)
    }

    async fn token_endpoint(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        self.token_requests.fetch_add(1, Ordering::SeqCst);
        let basic_ok = req
            .headers()
            .get(AUTHORIZATION)
            .is_some_and(|v| v == "Basic ZGVtbzpkZW1vLXNlY3JldA==");
        let body = req
            .into_body()
            .collect()
            .await
            .map(|b| b.to_bytes())
            .unwrap_or_default();
        let form: Vec<(String, String)> = form_urlencoded::parse(&body).into_owned().collect();
        let (status, body) = if basic_ok {
            self.grant(&form)
        } else {
            (
                StatusCode::UNAUTHORIZED,
                r#"{"error":"invalid_client"}"#.to_owned(),
            )
        };
        let mut res = Response::new(Full::new(Bytes::from(body)));
        *res.status_mut() = status;
        res.headers_mut()
            .insert(CONTENT_TYPE, "application/json".parse().unwrap());
        res
    }

    async fn api(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let token = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let ok = token.is_some_and(|t| self.state.lock().unwrap().valid_access.contains(t));
        let mut res = Response::new(Full::new(Bytes::from_static(b"hello")));
        if !ok {
            self.unauthorized.fetch_add(1, Ordering::SeqCst);
            *res.status_mut() = StatusCode::UNAUTHORIZED;
            res.headers_mut().insert(
                WWW_AUTHENTICATE,
                r#"Bearer error="invalid_token""#.parse().unwrap(),
            );
        }
        res
    }
}

/// Serves `handler` on 127.0.0.1 with a fresh port; the server lives as long as the runtime.
async fn serve<F, Fut>(handler: F) -> std::io::Result<SocketAddr>
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let handler = handler.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let fut = handler(req);
                    async move { Ok::<_, Infallible>(fut.await) }
                });
                let _ = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    Ok(addr)
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let idp = Arc::new(Idp::default());
    let i = idp.clone();
    let token_addr = serve(move |req| i.clone().token_endpoint(req)).await?;
    let i = idp.clone();
    let api_addr = serve(move |req| i.clone().api(req)).await?;

    // The login handed us an access token and a refresh token.
    let (access, refresh) = idp.login();

    // A plain client for token requests: it does not wear the refresh layer.
    let token_client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    let persisted = Arc::new(Mutex::new(Vec::<String>::new()));
    let store = persisted.clone();
    let refresher = OAuth2Refresher::builder(
        format!("http://{token_addr}/oauth/token").parse()?,
        token_client,
    )
    .client_id("demo")
    .client_secret("demo-secret", ClientAuth::Basic)
    .refresh_token(refresh)
    .on_rotation(move |new: RefreshToken| {
        let store = store.clone();
        // A real application writes to its keychain or database here.
        async move {
            let mut store = store.lock().unwrap();
            store.push(new.secret().to_owned());
            println!(
                "  on_rotation: new refresh token #{} persisted",
                store.len()
            );
            Ok::<_, Infallible>(())
        }
    })
    .build()?;

    let layer = RefreshLayer::new(refresher.clone()).initial_token(Token::bearer(access)?);
    let handle = layer.token_handle();
    let mut events = handle.subscribe();
    let api_client = ServiceBuilder::new()
        .layer(layer)
        .service(Client::builder(TokioExecutor::new()).build_http::<ReplayBody<Full<Bytes>>>());
    let url = format!("http://{api_addr}/hello");

    for round in 1..=ROUNDS {
        // The API forgets every access token: the next requests are refused with 401.
        idp.state.lock().unwrap().valid_access.clear();
        let unauthorized_before = idp.unauthorized.load(Ordering::SeqCst);
        let requests: Vec<_> = (0..CONCURRENCY)
            .map(|_| {
                let req = Request::get(url.as_str())
                    .body(Full::new(Bytes::new()))
                    .unwrap();
                tokio::spawn(api_client.clone().oneshot(req))
            })
            .collect();
        let mut ok = 0;
        for request in requests {
            if request.await?.map(|res| res.status() == StatusCode::OK)? {
                ok += 1;
            }
        }
        let refused = idp.unauthorized.load(Ordering::SeqCst) - unauthorized_before;
        println!(
            "round {round}: {ok}/{CONCURRENCY} requests OK; {refused} were refused with 401 first"
        );
        while let Some(Ok(event)) = events.try_recv() {
            if let RefreshEvent::Refreshed { generation } = event {
                println!("  refreshed: the token is now generation {generation}");
            }
        }
    }

    let persisted = persisted.lock().unwrap().len();
    let state = idp.state.lock().unwrap();
    println!();
    println!(
        "token requests:              {}",
        idp.token_requests.load(Ordering::SeqCst)
    );
    println!("refresh tokens rotated:      {}", state.spent_refresh.len());
    println!("rotations persisted by hook: {persisted}");
    println!("reuse detected by the IdP:   {}", state.reuse_detected);
    println!(
        "refresher holds the IdP's current refresh token: {}",
        refresher
            .refresh_token()
            .is_some_and(|t| t.secret() == state.current_refresh)
    );
    Ok(())
}
