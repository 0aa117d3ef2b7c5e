//! Loopback servers for the OAuth 2.0 refresher tests: a token endpoint that rotates refresh
//! tokens and revokes the whole token family when a rotated refresh token comes back (RFC 9700
//! §4.14.2 reuse detection, with an optional grace window for the previous token), and an API
//! that accepts only the access tokens the token endpoint issued and has not expired.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, LOCATION, RETRY_AFTER, WWW_AUTHENTICATE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::sync::{Barrier, Notify, watch};
use tokio::time::Instant;

use crate::support::{self, Server, serve_scoped};

/// How long a server-side wait (barrier, hold) may last before it gives up: a guard so a
/// broken test fails on its counts instead of hanging.
const SERVER_GUARD: Duration = Duration::from_secs(20);

fn response(
    status: StatusCode,
    content_type: Option<&str>,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut res = support::response(status, body);
    if let Some(ct) = content_type {
        res.headers_mut().insert(CONTENT_TYPE, ct.parse().unwrap());
    }
    res
}

fn json_response(status: StatusCode, body: &Value) -> Response<Full<Bytes>> {
    response(status, Some("application/json"), body.to_string())
}

fn oauth_error(status: StatusCode, code: &str, description: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &json!({ "error": code, "error_description": description }),
    )
}

/// How the token endpoint authenticates clients.
#[derive(Clone, Debug)]
pub(crate) enum ClientCheck {
    /// `client_secret_basic`: the exact `Authorization` value expected.
    Basic(String),
    /// `client_secret_post`.
    Post { id: String, secret: String },
    /// A public client: `client_id` in the body, no `Authorization`, no secret.
    Public { id: String },
}

/// Token endpoint settings.
#[derive(Clone, Debug)]
pub(crate) struct TokenConfig {
    pub(crate) client: ClientCheck,
    /// Accept the refresh token just rotated away for this long after its rotation.
    pub(crate) grace: Option<Duration>,
    /// Return a new refresh token with every grant.
    pub(crate) rotate: bool,
    pub(crate) token_type: &'static str,
    pub(crate) expires_in: Value,
}

/// `Basic base64("app:app-secret")`.
pub(crate) const APP_BASIC: &str = "Basic YXBwOmFwcC1zZWNyZXQ=";

impl Default for TokenConfig {
    fn default() -> Self {
        Self {
            client: ClientCheck::Basic(APP_BASIC.to_owned()),
            grace: None,
            rotate: true,
            token_type: "Bearer",
            expires_in: json!(3600),
        }
    }
}

/// A canned answer, served (once) instead of processing the next token request.
#[derive(Clone, Debug)]
pub(crate) struct Scripted {
    pub(crate) status: StatusCode,
    pub(crate) content_type: Option<&'static str>,
    pub(crate) body: Bytes,
    pub(crate) retry_after: Option<&'static str>,
    pub(crate) location: Option<String>,
}

impl Scripted {
    pub(crate) fn new(
        status: StatusCode,
        content_type: Option<&'static str>,
        body: impl Into<Bytes>,
    ) -> Self {
        Self {
            status,
            content_type,
            body: body.into(),
            retry_after: None,
            location: None,
        }
    }

    pub(crate) fn json(status: StatusCode, body: Value) -> Self {
        Self::new(status, Some("application/json"), body.to_string())
    }

    pub(crate) fn retry_after(mut self, value: &'static str) -> Self {
        self.retry_after = Some(value);
        self
    }

    /// A `Location` header (for a redirect).
    pub(crate) fn location(mut self, url: impl Into<String>) -> Self {
        self.location = Some(url.into());
        self
    }
}

/// One token request as the endpoint saw it.
#[derive(Clone, Debug)]
pub(crate) struct Seen {
    pub(crate) method: Method,
    pub(crate) content_type: Option<String>,
    /// The `Content-Length` it came with (`None`: chunked, or none).
    pub(crate) content_length: Option<String>,
    /// The length of the body it received.
    pub(crate) body_len: usize,
    pub(crate) authorization: Option<String>,
    pub(crate) form: Vec<(String, String)>,
}

/// What the token endpoint grants with the client-credentials grant (RFC 6749 §4.4); without
/// one (the default) it answers `unauthorized_client`.
#[derive(Clone, Debug, Default)]
pub(crate) struct ClientCredentials {
    /// The scopes a client may ask for; a request for another is `invalid_scope`.
    pub(crate) scopes: Vec<String>,
    /// The RFC 8707 resources a client may ask for; another is `invalid_target`.
    pub(crate) resources: Vec<String>,
}

impl Seen {
    /// Every value of a (repeatable) form field, in order.
    pub(crate) fn fields(&self, name: &str) -> Vec<&str> {
        self.form
            .iter()
            .filter(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub(crate) fn field(&self, name: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

struct Family {
    /// Every refresh token of the family, oldest first; the last is current.
    chain: Vec<String>,
    rotated_at: Instant,
    revoked: bool,
}

#[derive(Default)]
struct Db {
    families: Vec<Family>,
    /// Refresh token -> (family, position in its chain).
    refresh: HashMap<String, (usize, usize)>,
    /// Valid access tokens -> family.
    access: HashMap<String, usize>,
    /// Refresh tokens handed out by rotation, in order.
    rotated: Vec<String>,
    next: u64,
    requests: usize,
    grants: usize,
    reuse_detected: usize,
    grace_uses: usize,
    seen: Vec<Seen>,
}

impl Db {
    fn mint(&mut self, prefix: &str) -> String {
        self.next += 1;
        format!("{prefix}-{}", self.next)
    }

    fn new_family(&mut self, refresh: String) -> String {
        let family = self.families.len();
        self.families.push(Family {
            chain: vec![refresh.clone()],
            rotated_at: Instant::now(),
            revoked: false,
        });
        self.refresh.insert(refresh, (family, 0));
        let access = self.mint("atok");
        self.access.insert(access.clone(), family);
        access
    }
}

/// The token endpoint's state, shared with its tests.
pub(crate) struct TokenState {
    config: TokenConfig,
    db: Mutex<Db>,
    script: Mutex<VecDeque<Scripted>>,
    client_credentials: Mutex<Option<ClientCredentials>>,
    client_credentials_grants: AtomicUsize,
    hold_remaining: AtomicUsize,
    held: AtomicUsize,
    held_notify: Notify,
    release: watch::Sender<bool>,
}

impl TokenState {
    fn db(&self) -> std::sync::MutexGuard<'_, Db> {
        self.db.lock().unwrap()
    }

    /// A new session: a fresh token family. Returns (access token, refresh token).
    pub(crate) fn login(&self) -> (String, String) {
        let mut db = self.db();
        let refresh = db.mint("rtok");
        let access = db.new_family(refresh.clone());
        (access, refresh)
    }

    /// A new session whose refresh token is `refresh` (for odd characters).
    pub(crate) fn login_with(&self, refresh: &str) -> String {
        self.db().new_family(refresh.to_owned())
    }

    /// Every access token issued so far stops working (the API answers 401).
    pub(crate) fn expire_access_tokens(&self) {
        self.db().access.clear();
    }

    pub(crate) fn access_valid(&self, token: &str) -> bool {
        self.db().access.contains_key(token)
    }

    /// Serves `answer` instead of processing the next token request.
    pub(crate) fn script(&self, answer: Scripted) {
        self.script.lock().unwrap().push_back(answer);
    }

    /// Processes the next `n` token requests (rotating as usual, or answering as scripted)
    /// but holds their answers until [`release`](Self::release).
    pub(crate) fn hold_next(&self, n: usize) {
        self.hold_remaining.store(n, Ordering::SeqCst);
    }

    /// Waits until `n` answers are held (bounded by the caller's guard).
    pub(crate) async fn held(&self, n: usize) {
        loop {
            let notified = self.held_notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.held.load(Ordering::SeqCst) >= n {
                return;
            }
            notified.await;
        }
    }

    pub(crate) fn release(&self) {
        self.release.send_replace(true);
    }

    /// Lets clients use the client-credentials grant, within `policy`.
    pub(crate) fn allow_client_credentials(&self, policy: ClientCredentials) {
        *self.client_credentials.lock().unwrap() = Some(policy);
    }

    /// Access tokens issued by the client-credentials grant.
    pub(crate) fn client_credentials_grants(&self) -> usize {
        self.client_credentials_grants.load(Ordering::SeqCst)
    }

    /// The client-credentials grant: no refresh token, a new access token each time.
    fn client_credentials_grant(&self, seen: &Seen) -> Response<Full<Bytes>> {
        let Some(policy) = self.client_credentials.lock().unwrap().clone() else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unauthorized_client",
                "client_credentials not allowed for this client",
            );
        };
        if matches!(self.config.client, ClientCheck::Public { .. }) {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client_credentials needs a confidential client",
            );
        }
        if seen.field("refresh_token").is_some() {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "refresh_token on a client_credentials request",
            );
        }
        let scope = seen.field("scope").unwrap_or_default();
        if scope
            .split(' ')
            .filter(|s| !s.is_empty())
            .any(|s| !policy.scopes.iter().any(|p| p == s))
        {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_scope",
                "scope not allowed",
            );
        }
        if seen
            .fields("resource")
            .iter()
            .any(|r| !policy.resources.iter().any(|p| p == r))
        {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_target",
                "resource not allowed",
            );
        }
        let mut db = self.db();
        db.grants += 1;
        let family = db.families.len();
        db.families.push(Family {
            chain: Vec::new(),
            rotated_at: Instant::now(),
            revoked: false,
        });
        let access = db.mint("atok");
        db.access.insert(access.clone(), family);
        drop(db);
        self.client_credentials_grants
            .fetch_add(1, Ordering::SeqCst);
        json_response(
            StatusCode::OK,
            &json!({
                "access_token": access,
                "token_type": self.config.token_type,
                "expires_in": self.config.expires_in,
                "scope": scope,
            }),
        )
    }

    pub(crate) fn requests(&self) -> usize {
        self.db().requests
    }

    pub(crate) fn grants(&self) -> usize {
        self.db().grants
    }

    pub(crate) fn reuse_detected(&self) -> usize {
        self.db().reuse_detected
    }

    pub(crate) fn grace_uses(&self) -> usize {
        self.db().grace_uses
    }

    /// Refresh tokens handed out by rotation, in order.
    pub(crate) fn rotated(&self) -> Vec<String> {
        self.db().rotated.clone()
    }

    /// The current refresh token of the family that `refresh` belongs to.
    pub(crate) fn current_of(&self, refresh: &str) -> Option<String> {
        let db = self.db();
        let &(family, _) = db.refresh.get(refresh)?;
        db.families[family].chain.last().cloned()
    }

    /// Whether `access` was issued in the session (token family) of the refresh token
    /// `refresh`, and is still valid.
    pub(crate) fn issued_in_session_of(&self, access: &str, refresh: &str) -> bool {
        let db = self.db();
        match (db.access.get(access), db.refresh.get(refresh)) {
            (Some(&a), Some(&(r, _))) => a == r,
            _ => false,
        }
    }

    pub(crate) fn family_revoked(&self, refresh: &str) -> bool {
        let db = self.db();
        db.refresh
            .get(refresh)
            .is_some_and(|&(family, _)| db.families[family].revoked)
    }

    pub(crate) fn seen(&self) -> Vec<Seen> {
        self.db().seen.clone()
    }

    fn check_client(&self, authorization: Option<&str>, seen: &Seen) -> bool {
        match &self.config.client {
            ClientCheck::Basic(expected) => {
                authorization == Some(expected.as_str())
                    && seen.field("client_secret").is_none()
                    && seen.field("client_id").is_none()
            }
            ClientCheck::Post { id, secret } => {
                authorization.is_none()
                    && seen.field("client_id") == Some(id)
                    && seen.field("client_secret") == Some(secret)
            }
            ClientCheck::Public { id } => {
                authorization.is_none()
                    && seen.field("client_id") == Some(id)
                    && seen.field("client_secret").is_none()
            }
        }
    }

    /// The refresh-token grant (RFC 6749 §6) with rotation and reuse detection.
    fn grant(&self, seen: &Seen) -> Response<Full<Bytes>> {
        if seen.method != Method::POST {
            return oauth_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "invalid_request",
                "POST only",
            );
        }
        if seen.content_type.as_deref() != Some("application/x-www-form-urlencoded") {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "form body expected",
            );
        }
        if seen
            .authorization
            .as_deref()
            .is_some_and(|a| a.starts_with("Bearer"))
        {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "bearer token on a token request",
            );
        }
        if !self.check_client(seen.authorization.as_deref(), seen) {
            return oauth_error(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "client authentication failed",
            );
        }
        if seen.field("grant_type") == Some("client_credentials") {
            return self.client_credentials_grant(seen);
        }
        if seen.field("grant_type") != Some("refresh_token") {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "unsupported_grant_type",
                "refresh_token only",
            );
        }
        let Some(presented) = seen.field("refresh_token") else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "refresh_token missing",
            );
        };
        let mut db = self.db();
        let Some(&(family, position)) = db.refresh.get(presented) else {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "unknown refresh token",
            );
        };
        if db.families[family].revoked {
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "refresh token revoked",
            );
        }
        let current = db.families[family].chain.len() - 1;
        let in_grace = position + 1 == current
            && self
                .config
                .grace
                .is_some_and(|g| db.families[family].rotated_at.elapsed() <= g);
        if position != current && !in_grace {
            // RFC 9700 §4.14.2: a rotated refresh token came back; revoke the whole family.
            db.reuse_detected += 1;
            db.families[family].revoked = true;
            db.access.retain(|_, f| *f != family);
            return oauth_error(
                StatusCode::BAD_REQUEST,
                "invalid_grant",
                "refresh token reuse detected",
            );
        }
        db.grants += 1;
        let access = db.mint("atok");
        db.access.insert(access.clone(), family);
        let refresh = if in_grace {
            db.grace_uses += 1;
            Some(db.families[family].chain[current].clone())
        } else if self.config.rotate {
            let new = db.mint("rtok");
            let fam = &mut db.families[family];
            fam.chain.push(new.clone());
            fam.rotated_at = Instant::now();
            let len = fam.chain.len();
            db.refresh.insert(new.clone(), (family, len - 1));
            db.rotated.push(new.clone());
            Some(new)
        } else {
            None
        };
        let mut body = json!({
            "access_token": access,
            "token_type": self.config.token_type,
            "expires_in": self.config.expires_in,
            "scope": "api",
            "unknown_extension_field": { "ignored": true },
        });
        if let Some(refresh) = refresh {
            body["refresh_token"] = Value::String(refresh);
        }
        json_response(StatusCode::OK, &body)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let (parts, body) = req.into_parts();
        let body = match body.collect().await {
            Ok(body) => body.to_bytes(),
            Err(_) => return response(StatusCode::BAD_REQUEST, None, ""),
        };
        let header = |name| {
            parts
                .headers
                .get(name)
                .and_then(|v: &http::HeaderValue| v.to_str().ok())
                .map(str::to_owned)
        };
        let seen = Seen {
            method: parts.method.clone(),
            content_type: header(CONTENT_TYPE),
            content_length: header(http::header::CONTENT_LENGTH),
            body_len: body.len(),
            authorization: header(AUTHORIZATION),
            form: form_urlencoded::parse(&body).into_owned().collect(),
        };
        {
            let mut db = self.db();
            db.requests += 1;
            db.seen.push(seen.clone());
        }
        let scripted = self.script.lock().unwrap().pop_front();
        let res = match scripted {
            Some(s) => {
                let mut res = response(s.status, s.content_type, s.body);
                if let Some(ra) = s.retry_after {
                    res.headers_mut().insert(RETRY_AFTER, ra.parse().unwrap());
                }
                if let Some(location) = s.location {
                    res.headers_mut()
                        .insert(LOCATION, location.parse().unwrap());
                }
                res
            }
            None => self.grant(&seen),
        };
        let hold = self
            .hold_remaining
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if hold {
            let mut released = self.release.subscribe();
            self.held.fetch_add(1, Ordering::SeqCst);
            self.held_notify.notify_waiters();
            let _ = tokio::time::timeout(SERVER_GUARD, released.wait_for(|r| *r)).await;
        }
        res
    }
}

/// The API: 200 for a valid access token, 401 (RFC 6750 `invalid_token`) otherwise.
pub(crate) struct ApiState {
    tokens: Arc<TokenState>,
    ok: AtomicUsize,
    unauthorized: AtomicUsize,
    /// The barrier and how many more unauthorized requests it takes.
    barrier: Mutex<Option<(Arc<Barrier>, usize)>>,
}

impl ApiState {
    /// Holds the next `n` unauthorized requests until all `n` have arrived, so that `n`
    /// requests are refused together.
    pub(crate) fn gather_unauthorized(&self, n: usize) {
        *self.barrier.lock().unwrap() = Some((Arc::new(Barrier::new(n)), n));
    }

    pub(crate) fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }

    pub(crate) fn unauthorized(&self) -> usize {
        self.unauthorized.load(Ordering::SeqCst)
    }

    async fn handle(self: Arc<Self>, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let token = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if token.is_some_and(|t| self.tokens.access_valid(t)) {
            self.ok.fetch_add(1, Ordering::SeqCst);
            return response(StatusCode::OK, Some("text/plain"), "ok");
        }
        self.unauthorized.fetch_add(1, Ordering::SeqCst);
        let barrier = {
            let mut slot = self.barrier.lock().unwrap();
            let taken = slot.as_mut().map(|(barrier, remaining)| {
                *remaining -= 1;
                (barrier.clone(), *remaining == 0)
            });
            match taken {
                Some((barrier, last)) => {
                    if last {
                        *slot = None;
                    }
                    Some(barrier)
                }
                None => None,
            }
        };
        if let Some(barrier) = barrier {
            let _ = tokio::time::timeout(SERVER_GUARD, barrier.wait()).await;
        }
        let mut res = response(StatusCode::UNAUTHORIZED, None, "");
        res.headers_mut().insert(
            WWW_AUTHENTICATE,
            r#"Bearer error="invalid_token""#.parse().unwrap(),
        );
        res
    }
}

/// A token endpoint and an API on two loopback ports.
pub(crate) struct Servers {
    pub(crate) token: Arc<TokenState>,
    pub(crate) api: Arc<ApiState>,
    pub(crate) token_server: Server,
    pub(crate) api_server: Server,
}

pub(crate) fn token_state(config: TokenConfig) -> Arc<TokenState> {
    Arc::new(TokenState {
        config,
        db: Mutex::new(Db::default()),
        script: Mutex::new(VecDeque::new()),
        client_credentials: Mutex::new(None),
        client_credentials_grants: AtomicUsize::new(0),
        hold_remaining: AtomicUsize::new(0),
        held: AtomicUsize::new(0),
        held_notify: Notify::new(),
        release: watch::channel(false).0,
    })
}

fn api_state(tokens: Arc<TokenState>) -> Arc<ApiState> {
    Arc::new(ApiState {
        tokens,
        ok: AtomicUsize::new(0),
        unauthorized: AtomicUsize::new(0),
        barrier: Mutex::new(None),
    })
}

impl Servers {
    pub(crate) async fn start(config: TokenConfig) -> Self {
        let token = token_state(config);
        let api = api_state(token.clone());
        let t = token.clone();
        let token_server = serve_scoped(move |req| t.clone().handle(req)).await;
        let a = api.clone();
        let api_server = serve_scoped(move |req| a.clone().handle(req)).await;
        Self {
            token,
            api,
            token_server,
            api_server,
        }
    }

    pub(crate) fn token_url(&self) -> String {
        self.token_server.url("/oauth/token")
    }

    pub(crate) fn api_url(&self) -> String {
        self.api_server.url("/resource")
    }
}

/// A token endpoint (`/oauth/token`) and an API (anything else) on ONE origin.
pub(crate) struct SharedOrigin {
    pub(crate) token: Arc<TokenState>,
    pub(crate) api: Arc<ApiState>,
    pub(crate) server: Server,
}

impl SharedOrigin {
    pub(crate) async fn start(config: TokenConfig) -> Self {
        let token = token_state(config);
        let api = api_state(token.clone());
        let (t, a) = (token.clone(), api.clone());
        let server = serve_scoped(move |req: Request<Incoming>| {
            let (t, a) = (t.clone(), a.clone());
            async move {
                if req.uri().path() == "/oauth/token" {
                    t.handle(req).await
                } else {
                    a.handle(req).await
                }
            }
        })
        .await;
        Self { token, api, server }
    }
}
