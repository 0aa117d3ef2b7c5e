//! The token request: client authentication, the form, sending it and reading the answer.

use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use tower_service::Service;

use super::error::{ErrorKind, OAuth2Error};
use super::{Inner, REDACTED, RefreshToken};
use crate::{BoxError, RefreshRequest};

pub(crate) enum Auth {
    /// A public client.
    None,
    /// The ready-made `Authorization` header, marked sensitive.
    Basic(HeaderValue),
    /// The secret, for the form body.
    Post(Box<str>),
}

impl<C> Inner<C> {
    pub(crate) fn request(&self, refresh_token: &RefreshToken) -> Request<Full<Bytes>> {
        let mut form = form_urlencoded::Serializer::new(String::new());
        form.append_pair("grant_type", "refresh_token");
        form.append_pair("refresh_token", refresh_token.secret());
        if let Some(scope) = &self.scope {
            form.append_pair("scope", scope);
        }
        match &self.auth {
            Auth::None | Auth::Post(_) => {
                if let Some(id) = &self.client_id {
                    form.append_pair("client_id", id);
                }
            }
            Auth::Basic(_) => {}
        }
        if let Auth::Post(secret) = &self.auth {
            form.append_pair("client_secret", secret);
        }
        let mut req = Request::new(Full::new(Bytes::from(form.finish())));
        *req.method_mut() = Method::POST;
        *req.uri_mut() = self.endpoint.clone();
        let headers = req.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded"),
        );
        headers.insert(ACCEPT, HeaderValue::from_static("application/json"));
        if let Auth::Basic(value) = &self.auth {
            headers.insert(AUTHORIZATION, value.clone());
        }
        req.extensions_mut().insert(RefreshRequest);
        req
    }

    /// Takes secrets out of server-supplied text.
    pub(crate) fn redact(&self, text: String, presented: &RefreshToken) -> String {
        let mut text = text;
        let secrets = [Some(presented.secret()), self.client_secret.as_deref()];
        for secret in secrets.into_iter().flatten() {
            if !secret.is_empty() && text.contains(secret) {
                text = text.replace(secret, REDACTED);
            }
        }
        text
    }
}

/// Sends the request and reads the whole answer, up to `max_body` bytes.
pub(crate) async fn exchange<C, ResBody>(
    mut client: C,
    req: Request<Full<Bytes>>,
    max_body: usize,
) -> Result<(StatusCode, HeaderMap, Result<Bytes, OAuth2Error>), OAuth2Error>
where
    C: Service<Request<Full<Bytes>>, Response = Response<ResBody>>,
    C::Error: Into<BoxError>,
    ResBody: Body,
    ResBody::Error: Into<BoxError>,
{
    let transport = |e: C::Error| OAuth2Error::new(ErrorKind::Transport).with_source(e.into());
    std::future::poll_fn(|cx| client.poll_ready(cx))
        .await
        .map_err(transport)?;
    let res = client.call(req).await.map_err(transport)?;
    let (parts, body) = res.into_parts();
    let too_large = || {
        OAuth2Error::new(ErrorKind::BodyTooLarge)
            .with_status(parts.status)
            .with_limit(max_body)
    };
    let body = if body.size_hint().lower() > max_body as u64 {
        Err(too_large())
    } else {
        match Limited::new(body, max_body).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(err) if err.is::<LengthLimitError>() => Err(too_large()),
            Err(err) => Err(OAuth2Error::new(ErrorKind::Body)
                .with_status(parts.status)
                .with_source(err)),
        }
    };
    Ok((parts.status, parts.headers, body))
}
