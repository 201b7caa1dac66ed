//! A small SMTP connection pool over lettre's `AsyncSmtpConnection`, for plaintext and STARTTLS.
//!
//! Why not lettre's own pool: lettre opens its sockets without TCP_NODELAY and writes the message
//! and the final `.` separately, so every message waits for the peer's delayed ACK (~40 ms on
//! Linux): measured 44 ms per message against smtp-sink, 0.1 ms with TCP_NODELAY. That capped a
//! 32-connection pool near 700 messages/s. Here we open the socket ourselves with TCP_NODELAY
//! and hand it to lettre, which still speaks the protocol (EHLO, STARTTLS, AUTH, MAIL/RCPT/DATA).

use std::sync::Mutex;
use std::time::{Duration, Instant};

use lettre::Message;
use lettre::transport::smtp::authentication::{Credentials, DEFAULT_MECHANISMS};
use lettre::transport::smtp::client::{AsyncSmtpConnection, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use tokio::sync::Semaphore;

use super::{Outcome, classify};

pub struct SmtpPool {
    host: String,
    port: u16,
    starttls: bool,
    hello: ClientId,
    credentials: Option<Credentials>,
    connect_timeout: Duration,
    idle_timeout: Duration,
    idle: Mutex<Vec<(AsyncSmtpConnection, Instant)>>,
    permits: Semaphore,
}

impl SmtpPool {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        host: String,
        port: u16,
        starttls: bool,
        hello: ClientId,
        credentials: Option<Credentials>,
        connect_timeout: Duration,
        idle_timeout: Duration,
        max: usize,
    ) -> Self {
        Self {
            host,
            port,
            starttls,
            hello,
            credentials,
            connect_timeout,
            idle_timeout,
            idle: Mutex::new(Vec::new()),
            permits: Semaphore::new(max.max(1)),
        }
    }

    async fn connect(&self) -> Result<AsyncSmtpConnection, String> {
        let tcp = tokio::time::timeout(
            self.connect_timeout,
            tokio::net::TcpStream::connect((self.host.as_str(), self.port)),
        )
        .await
        .map_err(|_| format!("connection to {}:{} timed out", self.host, self.port))?
        .map_err(|e| format!("cannot connect to {}:{}: {e}", self.host, self.port))?;
        tcp.set_nodelay(true)
            .map_err(|e| format!("cannot set TCP_NODELAY: {e}"))?;
        let mut conn = AsyncSmtpConnection::connect_with_transport(Box::new(tcp), &self.hello)
            .await
            .map_err(|e| e.to_string())?;
        if self.starttls {
            let params = TlsParameters::new(self.host.clone()).map_err(|e| e.to_string())?;
            conn.starttls(params, &self.hello)
                .await
                .map_err(|e| e.to_string())?;
        }
        if let Some(c) = &self.credentials {
            conn.auth(DEFAULT_MECHANISMS, c)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(conn)
    }

    /// A pooled connection that still answers NOOP, or a new one.
    async fn checkout(&self) -> Result<AsyncSmtpConnection, String> {
        loop {
            let next = self.idle.lock().expect("pool lock").pop();
            match next {
                Some((mut c, since)) if since.elapsed() < self.idle_timeout => {
                    if c.test_connected().await {
                        return Ok(c);
                    }
                    c.abort().await;
                }
                Some((mut c, _)) => c.abort().await,
                None => return self.connect().await,
            }
        }
    }

    pub async fn send(&self, message: &Message) -> Outcome {
        let _permit = self
            .permits
            .acquire()
            .await
            .expect("semaphore never closed");
        let mut conn = match self.checkout().await {
            Ok(c) => c,
            Err(text) => return Outcome::Temporary { code: None, text },
        };
        let res = conn.send(message.envelope(), &message.formatted()).await;
        if conn.has_broken() {
            conn.abort().await;
        } else {
            self.idle
                .lock()
                .expect("pool lock")
                .push((conn, Instant::now()));
        }
        classify(res)
    }
}
