//! The HTTP client that posts webhooks: hyper's HTTP/1.1 client connection over our own TCP
//! (and TLS: `net`), with keep-alive connections kept per endpoint, a deadline on the whole
//! exchange, and a bound on what is read of a response.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Uri};
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls::ClientConfig;

use crate::net::{self, Stream};

/// What is read of a response body at most (the rest is not read, and the connection closed).
const MAX_RESPONSE: usize = 64 * 1024;

/// Where an endpoint is.
#[derive(Debug, Clone)]
pub struct Target {
    tls: bool,
    host: String,
    port: u16,
    authority: String,
    path: String,
}

impl Target {
    /// An `http://` or `https://` URL with a host. The error names what is wrong.
    pub fn parse(url: &str) -> Result<Target, String> {
        let uri: Uri = url.parse().map_err(|_| "is not a URL".to_string())?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("must start with http:// or https://".into()),
        };
        let auth = uri.authority().ok_or("has no host")?;
        if auth.as_str().contains('@') {
            return Err("must not carry a user or password (sign with the secret)".into());
        }
        let host = auth.host().trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return Err("has no host".into());
        }
        Ok(Target {
            tls,
            host: host.to_string(),
            port: auth.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            authority: auth.as_str().to_string(),
            path: uri
                .path_and_query()
                .map_or("/".to_string(), |p| p.as_str().to_string()),
        })
    }
}

impl Target {
    pub fn is_tls(&self) -> bool {
        self.tls
    }

    pub fn host(&self) -> &str {
        &self.host
    }
}

/// An answer: the status and the start of the body.
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: String,
}

/// Posts to one endpoint, reusing idle connections.
pub struct Client {
    target: Target,
    tls: Arc<ClientConfig>,
    timeout: Duration,
    idle: Mutex<Vec<SendRequest<Full<Bytes>>>>,
}

impl Client {
    pub fn new(target: Target, tls: Arc<ClientConfig>, timeout: Duration) -> Client {
        Client {
            target,
            tls,
            timeout,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// POSTs `body` with `headers`; the whole exchange within the timeout.
    pub async fn post(&self, headers: &[(&str, String)], body: Bytes) -> anyhow::Result<Answer> {
        tokio::time::timeout(self.timeout, self.exchange(headers, body))
            .await
            .map_err(|_| anyhow!("no answer within {} s", self.timeout.as_secs()))?
    }

    async fn exchange(&self, headers: &[(&str, String)], body: Bytes) -> anyhow::Result<Answer> {
        let t = &self.target;
        let mut req = Request::post(t.path.as_str())
            .header("host", t.authority.as_str())
            .header("content-type", "application/json")
            .header("user-agent", concat!("postbox/", env!("CARGO_PKG_VERSION")));
        for (k, v) in headers {
            req = req.header(*k, v.as_str());
        }
        let req = req.body(Full::new(body)).context("building the request")?;
        let mut sender = self.connection().await?;
        let resp = sender.send_request(req).await.context("sending")?;
        let status = resp.status().as_u16();
        let keep = !resp
            .headers()
            .get("connection")
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"close"));
        let body = match Limited::new(resp.into_body(), MAX_RESPONSE).collect().await {
            Ok(b) => {
                if keep {
                    self.idle.lock().expect("idle list").push(sender);
                }
                String::from_utf8_lossy(&b.to_bytes()).into_owned()
            }
            // Too long or cut off: the status stands; the connection is dropped.
            Err(_) => String::new(),
        };
        Ok(Answer { status, body })
    }

    /// An idle connection that is still open, or a new one.
    async fn connection(&self) -> anyhow::Result<SendRequest<Full<Bytes>>> {
        loop {
            let next = self.idle.lock().expect("idle list").pop();
            match next {
                Some(mut s) => {
                    if s.is_closed() {
                        continue;
                    }
                    if s.ready().await.is_ok() {
                        return Ok(s);
                    }
                }
                None => break,
            }
        }
        let t = &self.target;
        let tcp = net::connect(&t.host, t.port, self.timeout).await?;
        let stream = if t.tls {
            Stream::Tls(Box::new(net::tls(&self.tls, &t.host, tcp).await?))
        } else {
            Stream::Plain(tcp)
        };
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .context("HTTP handshake")?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(sender)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_bad_urls_say_why() {
        let t = Target::parse("https://hooks.example.com/in?x=1").unwrap();
        assert_eq!(
            (t.tls, t.host.as_str(), t.port, t.path.as_str()),
            (true, "hooks.example.com", 443, "/in?x=1")
        );
        let t = Target::parse("http://127.0.0.1:8080").unwrap();
        assert_eq!((t.port, t.path.as_str()), (8080, "/"));
        assert!(Target::parse("ftp://x/").unwrap_err().contains("http"));
        assert!(
            Target::parse("http://u:p@x/")
                .unwrap_err()
                .contains("password")
        );
        assert!(Target::parse("not a url").is_err());
    }
}
