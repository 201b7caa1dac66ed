//! Connecting to an IMAP server: TCP, then TLS (rustls, ring provider) from the first byte or
//! after STARTTLS, or nothing at all when a mailbox says `tls = "none"`; the greeting; LOGIN.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use anyhow::{Context as _, anyhow, bail};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};

use super::config::{ImapTls, Mailbox};

/// The byte stream under an IMAP session.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

pub type Session = async_imap::Session<Stream>;
type Client = async_imap::Client<Stream>;

/// A TLS client configuration: the public web roots plus the mailbox's `ca_file`. The ring
/// provider is passed explicitly (lettre links rustls too; no process-wide default is assumed).
pub fn tls_config(mb: &Mailbox) -> anyhow::Result<Arc<ClientConfig>> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = &mb.ca_file {
        for cert in CertificateDer::pem_file_iter(path)
            .with_context(|| format!("cannot read ca_file {}", path.display()))?
        {
            let cert = cert.with_context(|| format!("bad PEM in ca_file {}", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("unusable certificate in {}", path.display()))?;
        }
    }
    let config =
        ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()
            .context("TLS setup")?
            .with_root_certificates(roots)
            .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Connects, secures the stream as the mailbox says, reads the greeting and logs in.
/// Returns the session and whether the server offers IDLE, MOVE and UIDPLUS.
pub async fn connect(mb: &Mailbox, tls: &Arc<ClientConfig>) -> anyhow::Result<(Session, Caps)> {
    let tcp = tokio::time::timeout(
        mb.connect_timeout,
        TcpStream::connect((mb.host.as_str(), mb.port)),
    )
    .await
    .map_err(|_| anyhow!("connecting to {}:{} timed out", mb.host, mb.port))?
    .with_context(|| format!("cannot connect to {}:{}", mb.host, mb.port))?;
    let _ = tcp.set_nodelay(true);
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
    let name = ServerName::try_from(mb.host.clone())
        .map_err(|_| anyhow!("`{}` is not a valid TLS server name", mb.host))?;
    TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .with_context(|| format!("TLS handshake with {}:{} failed", mb.host, mb.port))
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
