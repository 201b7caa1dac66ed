//! Connecting to an IMAP server: TCP, then TLS (rustls, ring provider) from the first byte or
//! after STARTTLS, or nothing at all when a mailbox says `tls = "none"`; the greeting; LOGIN.

use std::sync::Arc;

use anyhow::{Context as _, anyhow, bail};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::ClientConfig;

use crate::net::Stream;

use super::config::{ImapTls, Mailbox};

pub type Session = async_imap::Session<Stream>;
type Client = async_imap::Client<Stream>;

/// The TLS configuration for `mb`: the public web roots plus its `ca_file`.
pub fn tls_config(mb: &Mailbox) -> anyhow::Result<Arc<ClientConfig>> {
    crate::net::tls_config(mb.ca_file.as_deref())
}

/// Connects, secures the stream as the mailbox says, reads the greeting and logs in.
/// Returns the session and whether the server offers IDLE, MOVE and UIDPLUS.
pub async fn connect(mb: &Mailbox, tls: &Arc<ClientConfig>) -> anyhow::Result<(Session, Caps)> {
    let tcp = crate::net::connect(&mb.host, mb.port, mb.connect_timeout).await?;
    let client = match mb.tls {
        ImapTls::Tls => {
            let mut c = Client::new(Stream::Tls(Box::new(upgrade(mb, tls, tcp).await?)));
            greeting(&mut c).await?;
            c
        }
        ImapTls::None => {
            let mut c = Client::new(Stream::Plain(tcp));
            greeting(&mut c).await?;
            c
        }
        ImapTls::Starttls => {
            let mut c = Client::new(Stream::Plain(tcp));
            greeting(&mut c).await?;
            c.run_command_and_check_ok("STARTTLS", None)
                .await
                .context("STARTTLS refused")?;
            let Stream::Plain(tcp) = c.into_inner() else {
                unreachable!("the stream is plain before STARTTLS")
            };
            Client::new(Stream::Tls(Box::new(upgrade(mb, tls, tcp).await?)))
        }
    };
    use secrecy::ExposeSecret;
    let mut session = client
        .login(&mb.username, mb.password.expose_secret())
        .await
        .map_err(|(e, _)| anyhow!("login as {} refused: {e}", mb.username))?;
    let caps = session.capabilities().await.context("CAPABILITY")?;
    let caps = Caps {
        idle: caps.has_str("IDLE"),
        mv: caps.has_str("MOVE"),
        uidplus: caps.has_str("UIDPLUS"),
    };
    Ok((session, caps))
}

/// What the server offers that the watcher uses.
#[derive(Debug, Clone, Copy)]
pub struct Caps {
    pub idle: bool,
    pub mv: bool,
    pub uidplus: bool,
}

async fn upgrade(
    mb: &Mailbox,
    tls: &Arc<ClientConfig>,
    tcp: TcpStream,
) -> anyhow::Result<TlsStream<TcpStream>> {
    crate::net::tls(tls, &mb.host, tcp)
        .await
        .with_context(|| format!("port {}", mb.port))
}

async fn greeting(c: &mut Client) -> anyhow::Result<()> {
    match c.read_response().await.context("reading the greeting")? {
        None => bail!("the server closed the connection before its greeting"),
        Some(r) => {
            if let async_imap::imap_proto::Response::Data {
                status: async_imap::imap_proto::Status::Bye,
                outcome,
            } = r.parsed()
            {
                bail!(
                    "the server said BYE: {}",
                    outcome.information.as_deref().unwrap_or("")
                );
            }
            Ok(())
        }
    }
}
