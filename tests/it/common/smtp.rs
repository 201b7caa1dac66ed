//! A real SMTP server on 127.0.0.1 for tests: speaks the protocol over TCP (EHLO, STARTTLS,
//! AUTH PLAIN, MAIL, RCPT, DATA with dot-unstuffing, RSET, NOOP, QUIT, and PIPELINING unless
//! told not to offer it), in plaintext, with
//! STARTTLS or with implicit TLS (a throwaway CA's certificate), records every accepted message,
//! and fails on cue: a scripted greeting or AUTH reply, scripted replies to DATA, replies by
//! recipient, a delay, or going down entirely.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

#[derive(Debug, Clone)]
pub struct Received {
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub data: Vec<u8>,
    pub at: SystemTime,
    /// The session was encrypted (STARTTLS or implicit TLS) when the message arrived.
    pub tls: bool,
    /// MAIL FROM, the RCPT TOs and DATA came in one piece (RFC 2920 pipelining): DATA was
    /// already waiting to be read when MAIL FROM was.
    pub pipelined: bool,
}

/// How the server protects its sessions.
#[derive(Clone)]
pub enum Security {
    Plain,
    /// Offers STARTTLS in EHLO and upgrades on request.
    Starttls(Arc<tokio_rustls::rustls::ServerConfig>),
    /// TLS from the first byte.
    Implicit(Arc<tokio_rustls::rustls::ServerConfig>),
}

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

impl Received {
    pub fn message_id(&self) -> String {
        header(&self.data, "Message-ID").unwrap_or_default()
    }
}

/// The value of a header in raw message bytes (unfolded).
pub fn header(data: &[u8], name: &str) -> Option<String> {
    let text = String::from_utf8_lossy(data);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    let unfolded = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    unfolded.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
    })
}

#[derive(Default)]
struct Behaviour {
    /// Replies to the end of DATA, used in order; when empty, "250 OK".
    data_replies: VecDeque<String>,
    /// A reply to RCPT TO for recipients containing the key.
    rcpt_replies: Vec<(String, String)>,
    /// Applied before answering the end of DATA.
    delay: Duration,
    /// Every end of DATA gets this reply while set.
    data_reply_always: Option<String>,
    /// Replaces the 220 greeting (the session then waits for QUIT).
    greeting: Option<String>,
    /// Replaces the 235 reply to AUTH.
    auth_reply: Option<String>,
    /// EHLO does not offer PIPELINING.
    no_pipelining: bool,
    /// Accept at most this many messages in any trailing second; answer the rest with the
    /// reply (a relay's sending rate limit, like SES's `454 Throttling failure`).
    rate_limit: Option<(usize, String)>,
}

/// Reads the next line into `line`; false when the client hung up or the server went down.
async fn next_line(
    r: &mut BufReader<Box<dyn Io>>,
    line: &mut String,
    down: &mut watch::Receiver<bool>,
) -> std::io::Result<bool> {
    line.clear();
    tokio::select! {
        n = r.read_line(line) => Ok(n? > 0),
        _ = down.changed() => Ok(false),
    }
}

/// The accept loop and the signal that closes every session.
type Listening = (JoinHandle<()>, watch::Sender<bool>);

#[derive(Clone)]
pub struct SmtpServer {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    /// When each end of DATA was refused (any non-2xx reply).
    refused: Arc<Mutex<Vec<SystemTime>>>,
    /// Sessions open now, and the most ever open at once.
    sessions: Arc<Mutex<(usize, usize)>>,
    behaviour: Arc<Mutex<Behaviour>>,
    auth_seen: Arc<Mutex<Vec<String>>>,
    state: Arc<Mutex<Option<Listening>>>,
    security: Security,
}

impl SmtpServer {
    pub async fn start() -> SmtpServer {
        Self::start_with(Security::Plain).await
    }

    pub async fn start_with(security: Security) -> SmtpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind smtp");
        let s = SmtpServer {
            addr: listener.local_addr().unwrap(),
            received: Default::default(),
            refused: Default::default(),
            sessions: Default::default(),
            behaviour: Default::default(),
            auth_seen: Default::default(),
            state: Default::default(),
            security,
        };
        s.serve(listener);
        s
    }

    /// The greeting sessions get from now on (e.g. "554 5.7.1 no service").
    pub fn set_greeting(&self, reply: Option<&str>) {
        self.behaviour.lock().unwrap().greeting = reply.map(str::to_string);
    }

    /// Whether EHLO offers PIPELINING from now on (it does by default, as Postfix does).
    pub fn offer_pipelining(&self, offer: bool) {
        self.behaviour.lock().unwrap().no_pipelining = !offer;
    }

    /// The reply to AUTH from now on (e.g. "535 5.7.8 bad credentials").
    pub fn set_auth_reply(&self, reply: Option<&str>) {
        self.behaviour.lock().unwrap().auth_reply = reply.map(str::to_string);
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    fn serve(&self, listener: TcpListener) {
        let (tx, rx) = watch::channel(false);
        let me = self.clone();
        let h = tokio::spawn(async move {
            loop {
                let Ok((sock, _)) = listener.accept().await else {
                    return;
                };
                let _ = sock.set_nodelay(true);
                let me2 = me.clone();
                let rx2 = rx.clone();
                {
                    let mut n = me.sessions.lock().unwrap();
                    n.0 += 1;
                    n.1 = n.1.max(n.0);
                }
                tokio::spawn(async move {
                    let _ = me2.session(sock, rx2).await;
                    me2.sessions.lock().unwrap().0 -= 1;
                });
            }
        });
        *self.state.lock().unwrap() = Some((h, tx));
    }

    /// Goes down: stops listening (connections are refused) and drops every open session.
    pub async fn stop(&self) {
        if let Some((h, tx)) = self.state.lock().unwrap().take() {
            let _ = tx.send(true);
            h.abort();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// Comes back on the same port.
    pub async fn resume(&self) {
        let listener = TcpListener::bind(self.addr).await.expect("rebind smtp");
        self.serve(listener);
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    pub fn auth_seen(&self) -> Vec<String> {
        self.auth_seen.lock().unwrap().clone()
    }

    /// The next end-of-DATA replies, in order (e.g. "451 4.3.0 try later").
    pub fn script_data_replies(&self, replies: &[&str]) {
        self.behaviour
            .lock()
            .unwrap()
            .data_replies
            .extend(replies.iter().map(|s| s.to_string()));
    }

    pub fn always_reply_to_data(&self, reply: Option<&str>) {
        self.behaviour.lock().unwrap().data_reply_always = reply.map(str::to_string);
    }

    pub fn reply_to_rcpt(&self, recipient_contains: &str, reply: &str) {
        self.behaviour
            .lock()
            .unwrap()
            .rcpt_replies
            .push((recipient_contains.into(), reply.into()));
    }

    /// Forgets every `reply_to_rcpt` rule: all recipients are accepted again.
    pub fn clear_rcpt_replies(&self) {
        self.behaviour.lock().unwrap().rcpt_replies.clear();
    }

    /// Accepts at most `per_second` messages in any trailing second, refusing the rest with
    /// `reply`; None: no limit.
    pub fn set_rate_limit(&self, limit: Option<(usize, &str)>) {
        self.behaviour.lock().unwrap().rate_limit = limit.map(|(n, r)| (n, r.to_string()));
    }

    /// The most sessions (connections) ever open at once.
    pub fn max_sessions(&self) -> usize {
        self.sessions.lock().unwrap().1
    }

    /// When each end of DATA was refused.
    pub fn refused(&self) -> Vec<SystemTime> {
        self.refused.lock().unwrap().clone()
    }

    pub fn set_delay(&self, d: Duration) {
        self.behaviour.lock().unwrap().delay = d;
    }

    async fn session(
        &self,
        sock: TcpStream,
        mut down: watch::Receiver<bool>,
    ) -> std::io::Result<()> {
        let mut tls = false;
        let io: Box<dyn Io> = match &self.security {
            Security::Implicit(config) => {
                tls = true;
                Box::new(
                    tokio_rustls::TlsAcceptor::from(config.clone())
                        .accept(sock)
                        .await?,
                )
            }
            _ => Box::new(sock),
        };
        let mut r = BufReader::new(io);
        let greeting = self.behaviour.lock().unwrap().greeting.clone();
        let refused = greeting.is_some();
        let greeting = greeting.unwrap_or_else(|| "220 test.local ESMTP postbox-test".into());
        r.get_mut()
            .write_all(format!("{greeting}\r\n").as_bytes())
            .await?;
        r.get_mut().flush().await?;
        let mut from = String::new();
        let mut rcpts: Vec<String> = Vec::new();
        let mut pipelined = false;
        let mut line = String::new();
        loop {
            if !next_line(&mut r, &mut line, &mut down).await? {
                return Ok(());
            }
            let cmd = line.trim_end().to_string();
            let upper = cmd.to_ascii_uppercase();
            let reply: String = if refused && upper != "QUIT" {
                "503 5.5.1 no service".into()
            } else if upper.starts_with("EHLO") {
                let starttls = if !tls && matches!(self.security, Security::Starttls(_)) {
                    "250-STARTTLS\r\n"
                } else {
                    ""
                };
                let pipelining = if self.behaviour.lock().unwrap().no_pipelining {
                    ""
                } else {
                    "250-PIPELINING\r\n"
                };
                format!(
                    "250-test.local\r\n{starttls}{pipelining}250-8BITMIME\r\n250-AUTH PLAIN LOGIN\r\n250 SMTPUTF8"
                )
            } else if upper == "STARTTLS" {
                let Security::Starttls(config) = &self.security else {
                    r.get_mut().write_all(b"502 5.5.1 no TLS here\r\n").await?;
                    continue;
                };
                r.get_mut()
                    .write_all(b"220 2.0.0 ready for TLS\r\n")
                    .await?;
                let plain = r.into_inner();
                let secured = tokio_rustls::TlsAcceptor::from(config.clone())
                    .accept(plain)
                    .await?;
                r = BufReader::new(Box::new(secured));
                tls = true;
                continue;
            } else if upper.starts_with("HELO") {
                "250 test.local".into()
            } else if upper.starts_with("AUTH PLAIN") {
                self.auth_seen.lock().unwrap().push(cmd.clone());
                let scripted = self.behaviour.lock().unwrap().auth_reply.clone();
                scripted.unwrap_or_else(|| "235 2.7.0 Authentication successful".into())
            } else if upper.starts_with("MAIL FROM:") {
                // The path, then parameters: "<a@b> SIZE=1", or "<> SIZE=1" for a bounce.
                from = cmd[10..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_matches(|c| c == '<' || c == '>')
                    .to_string();
                rcpts.clear();
                let unread = String::from_utf8_lossy(r.buffer()).to_ascii_uppercase();
                pipelined = unread.contains("\r\nDATA\r\n");
                "250 2.1.0 OK".into()
            } else if upper.starts_with("RCPT TO:") {
                let rcpt = cmd[8..]
                    .split_whitespace()
                    .next()
                    .unwrap_or("")
                    .trim_matches(|c| c == '<' || c == '>')
                    .to_string();
                let special = self
                    .behaviour
                    .lock()
                    .unwrap()
                    .rcpt_replies
                    .iter()
                    .find(|(k, _)| rcpt.contains(k.as_str()))
                    .map(|(_, v)| v.clone());
                match special {
                    Some(r) => r,
                    None => {
                        rcpts.push(rcpt);
                        "250 2.1.5 OK".into()
                    }
                }
            } else if upper == "DATA" && rcpts.is_empty() {
                // Every RCPT was refused (a pipelining client sends DATA regardless).
                "554 5.5.1 no valid recipients".into()
            } else if upper == "DATA" {
                r.get_mut()
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                r.get_mut().flush().await?;
                let mut data = Vec::new();
                loop {
                    if !next_line(&mut r, &mut line, &mut down).await? {
                        return Ok(());
                    }
                    if line == ".\r\n" || line == ".\n" {
                        break;
                    }
                    let l = line.strip_prefix('.').unwrap_or(&line);
                    data.extend_from_slice(l.as_bytes());
                }
                let (delay, mut reply, limit) = {
                    let mut b = self.behaviour.lock().unwrap();
                    let reply = b
                        .data_reply_always
                        .clone()
                        .or_else(|| b.data_replies.pop_front())
                        .unwrap_or_else(|| "250 2.0.0 OK queued".into());
                    (b.delay, reply, b.rate_limit.clone())
                };
                if !delay.is_zero() {
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {},
                        _ = down.changed() => return Ok(()),
                    }
                }
                let mut received = self.received.lock().unwrap();
                if let Some((max, refusal)) = limit
                    && reply.starts_with('2')
                {
                    let now = SystemTime::now();
                    let recent = received
                        .iter()
                        .rev()
                        .take_while(|r| {
                            now.duration_since(r.at).unwrap_or_default() < Duration::from_secs(1)
                        })
                        .count();
                    if recent >= max {
                        reply = refusal;
                    }
                }
                if !reply.starts_with('2') {
                    self.refused.lock().unwrap().push(SystemTime::now());
                }
                if reply.starts_with('2') {
                    received.push(Received {
                        mail_from: from.clone(),
                        rcpt_to: rcpts.clone(),
                        data,
                        at: SystemTime::now(),
                        tls,
                        pipelined,
                    });
                }
                drop(received);
                reply
            } else if upper == "RSET" {
                rcpts.clear();
                "250 2.0.0 OK".into()
            } else if upper == "NOOP" {
                "250 2.0.0 OK".into()
            } else if upper == "QUIT" {
                r.get_mut().write_all(b"221 2.0.0 Bye\r\n").await?;
                return Ok(());
            } else {
                "502 5.5.2 Command not recognized".into()
            };
            // One write per reply: two small writes meet Nagle and delayed ACKs (40 ms each).
            r.get_mut()
                .write_all(format!("{reply}\r\n").as_bytes())
                .await?;
            r.get_mut().flush().await?;
        }
    }
}
