//! Calling a JSON API over HTTPS, or plain HTTP on a loopback address: the server's
//! `--auth-api` and the client's `--remote-api` are both such calls.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Uri};
use hyper_util::rt::TokioIo;

use super::{Connector, RemoteAddr, RemoteTrust, Scheme};

/// A JSON API at one URL.
#[derive(Clone)]
pub(crate) struct JsonApi {
    uri: Uri,
    connector: Connector,
    timeout: Duration,
}

/// Where `url` is served: `https://`, or `http://` on a loopback address only (such APIs
/// take or give secrets or addresses to trust). The error says why not, in words.
pub(crate) fn api_endpoint(url: &str) -> Result<(Uri, RemoteAddr), String> {
    let uri: Uri = url.parse().map_err(|e| format!("'{url}' is not a URL: {e}"))?;
    let host = uri.host().ok_or_else(|| format!("'{url}' has no host"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
    let (scheme, default_port) = match uri.scheme_str() {
        Some("https") => (Scheme::Tls, 443),
        Some("http") => {
            let loopback =
                host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            if !loopback {
                return Err(format!(
                    "'{url}': plain http:// is allowed only on a loopback address; use https://"
                ));
            }
            (Scheme::Tcp, 80)
        }
        _ => return Err(format!("'{url}': use https:// (or http:// on loopback)")),
    };
    let port = uri.port_u16().unwrap_or(default_port);
    Ok((uri, RemoteAddr { scheme, host, port, path: String::new() }))
}

impl JsonApi {
    /// The API at `url` (see [`api_endpoint`]), trusting the system's roots; every call
    /// ends within `timeout`.
    pub(crate) fn new(url: &str, timeout: Duration) -> Result<Self, String> {
        let (uri, remote) = api_endpoint(url)?;
        let connector = Connector::new(remote, &RemoteTrust::System, timeout).map_err(|e| e.to_string())?;
        Ok(JsonApi { uri, connector, timeout })
    }

    /// The same API at another path of its host (`path` starts with `/`).
    pub(crate) fn at(&self, path: &str) -> Result<Self, String> {
        let mut parts = self.uri.clone().into_parts();
        parts.path_and_query = Some(path.parse().map_err(|e| format!("'{path}' is not a path: {e}"))?);
        let uri = Uri::from_parts(parts).map_err(|e| e.to_string())?;
        Ok(JsonApi { uri, connector: self.connector.clone(), timeout: self.timeout })
    }

    /// Sends `body` (JSON) with POST, or GET without one; the answer's status and at most
    /// `max` bytes of its body.
    pub(crate) async fn call(&self, body: Option<Vec<u8>>, max: usize) -> Result<(u16, Bytes), String> {
        tokio::time::timeout(self.timeout, async {
            let response = self.send(body).await?;
            let status = response.status().as_u16();
            let body = Limited::new(response.into_body(), max)
                .collect()
                .await
                .map_err(|e| format!("reading the answer: {e}"))?
                .to_bytes();
            Ok((status, body))
        })
        .await
        .map_err(|_| format!("no answer within {:?}", self.timeout))?
    }

    /// Sends `body` like [`call`](Self::call) and gives the answer's status and body as it
    /// streams in (a watch); only the answer's head must come within the timeout.
    pub(crate) async fn stream(&self, body: Option<Vec<u8>>) -> Result<(u16, Incoming), String> {
        let response = tokio::time::timeout(self.timeout, self.send(body))
            .await
            .map_err(|_| format!("no answer within {:?}", self.timeout))??;
        Ok((response.status().as_u16(), response.into_body()))
    }

    async fn send(&self, body: Option<Vec<u8>>) -> Result<hyper::Response<Incoming>, String> {
        let stream = self.connector.connect().await.map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let authority = self.uri.authority().map(|a| a.as_str()).unwrap_or_default();
        let path = self.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let method = if body.is_some() { Method::POST } else { Method::GET };
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, authority)
            .header(hyper::header::CONTENT_TYPE, "application/json")
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, concat!("ferry/", env!("CARGO_PKG_VERSION")))
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| e.to_string())?;
        sender.send_request(request).await.map_err(|e| e.to_string())
    }
}
