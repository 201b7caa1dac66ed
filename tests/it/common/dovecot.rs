//! A real Dovecot (Debian's `dovecot-imapd`) for the watcher tests: its own config, users, mail
//! directory and TLS certificates (a throwaway CA signs a certificate for 127.0.0.1) in a temp
//! dir, listening on random loopback ports: plaintext IMAP (with STARTTLS) and IMAPS.

use super::ports::free_port;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_imap::Client;
use futures::TryStreamExt;
use tokio::net::TcpStream;

pub const USER: &str = "watch";
pub const PASSWORD: &str = "watch-password-123";

pub struct Dovecot {
    pub dir: PathBuf,
    /// Plaintext IMAP (STARTTLS offered).
    pub port: u16,
    /// IMAP over TLS.
    pub tls_port: u16,
    /// The CA that signed the server certificate (for `ca_file`).
    pub ca_file: PathBuf,
    child: Option<Child>,
    /// Dovecot's config for `(port, tls_port)`.
    conf_for: Box<dyn Fn(u16, u16) -> String + Send + Sync>,
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn dovecot_binary() -> &'static str {
    for p in ["/usr/sbin/dovecot", "/usr/local/sbin/dovecot"] {
        if Path::new(p).exists() {
            return p;
        }
    }
    panic!(
        "Dovecot is not installed. Run the tests with scripts/test.sh (it installs Debian's \
         dovecot-imapd), or: apt-get install dovecot-imapd"
    );
}

impl Dovecot {
    /// Starts a Dovecot in `dir` (created). Panics with a how-to if Dovecot is missing.
    pub fn start(dir: &Path) -> Dovecot {
        let bin = dovecot_binary();
        std::fs::create_dir_all(dir.join("mail")).unwrap();
        std::fs::create_dir_all(dir.join("run")).unwrap();
        std::fs::create_dir_all(dir.join("state")).unwrap();
        // Certificates: a CA, and a server certificate it signs for 127.0.0.1 / localhost.
        super::tls::TestCa::create(dir);
        std::fs::write(dir.join("users"), format!("{USER}:{{PLAIN}}{PASSWORD}\n")).unwrap();
        // As root, Dovecot drops to its own users; mail is owned by `dovecot`.
        let (internal, login, mail_uid) = if super::root::is_root() {
            run(Command::new("chown")
                .args(["-R", "dovecot:dovecot"])
                .arg(dir.join("mail")));
            run(Command::new("chmod").args(["755"]).arg(dir));
            (
                "dovecot".to_string(),
                "dovenull".to_string(),
                "dovecot".to_string(),
            )
        } else {
            let me = String::from_utf8(Command::new("id").arg("-un").output().unwrap().stdout)
                .unwrap()
                .trim()
                .to_string();
            (me.clone(), me.clone(), me)
        };
        let d = dir.display().to_string();
        let conf_for = move |port: u16, tls_port: u16| {
            format!(
                r#"base_dir = {d}/run
state_dir = {d}/state
log_path = {d}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = yes
ssl_cert = <{d}/server.pem
ssl_key = <{d}/server.key
disable_plaintext_auth = no
auth_mechanisms = plain login
mail_fsync = never
first_valid_uid = 1
default_internal_user = {internal}
default_login_user = {login}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {d}/users
}}
userdb {{
  driver = static
  args = uid={mail_uid} gid={mail_uid} home={d}/mail/%u
}}
mail_location = maildir:~/Maildir
namespace inbox {{
  inbox = yes
  separator = /
  mailbox Processed {{
    auto = create
  }}
}}
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {port}
  }}
  inet_listener imaps {{
    address = 127.0.0.1
    port = {tls_port}
    ssl = yes
  }}
}}
service auth {{
  unix_listener auth-userdb {{
    mode = 0666
  }}
}}
"#
            )
        };
        let _ = bin;
        let mut d = Dovecot {
            dir: dir.to_path_buf(),
            port: 0,
            tls_port: 0,
            ca_file: dir.join("ca.pem"),
            child: None,
            conf_for: Box::new(conf_for),
        };
        // The ports are picked free, but another process (a parallel test's server) may bind
        // one before Dovecot does: Dovecot then exits at once ("Address already in use"), and
        // it is started again on other ports.
        for attempt in 1.. {
            let port = free_port();
            let tls_port = loop {
                let p = free_port();
                if p != port {
                    break p;
                }
            };
            (d.port, d.tls_port) = (port, tls_port);
            std::fs::write(d.conf(), (d.conf_for)(port, tls_port)).unwrap();
            match d.try_start() {
                Ok(()) => break,
                Err(why) if why.contains("in use") && attempt < 5 => continue,
                Err(why) => panic!("{why}"),
            }
        }
        d
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("dovecot.conf")
    }

    /// Starts Dovecot (again) on the same ports and mail, in a process group of its own so
    /// that [`Dovecot::stop`] can stop every process it forks.
    pub fn restart(&mut self) {
        if let Err(why) = self.try_start() {
            panic!("{why}");
        }
    }

    /// Starts Dovecot and waits until it listens on both ports; if it exits first, says why
    /// (its errors before the log file is open, a failed bind among them, go to stderr).
    fn try_start(&mut self) -> Result<(), String> {
        use std::os::unix::process::CommandExt;
        assert!(self.child.is_none(), "Dovecot is running");
        let stderr_path = self.dir.join("dovecot.stderr");
        let child = Command::new(dovecot_binary())
            .arg("-c")
            .arg(self.conf())
            .arg("-F")
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr_path).unwrap())
            .spawn()
            .expect("start dovecot");
        self.child = Some(child);
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err()
            || std::net::TcpStream::connect(("127.0.0.1", self.tls_port)).is_err()
        {
            let stderr = || std::fs::read_to_string(&stderr_path).unwrap_or_default();
            if let Ok(Some(status)) = self.child.as_mut().unwrap().try_wait() {
                self.child = None;
                return Err(format!(
                    "Dovecot exited ({status}) before it listened on {} and {}: {}{}",
                    self.port,
                    self.tls_port,
                    stderr(),
                    self.log()
                ));
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(format!(
                    "Dovecot did not listen within 10 s; its stderr:\n{}\nits log:\n{}",
                    stderr(),
                    self.log()
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// Stops Dovecot: SIGTERM to its whole process group, then waits until no process of the
    /// group is left (SIGKILL after 10 s), so every client connection is closed when this
    /// returns.
    ///
    /// Signalling only the master is not enough: the master exits at once, but its `imap` and
    /// `imap-login` processes keep serving open sessions for several seconds more (measured:
    /// an IDLE client got Dovecot's "BYE Server shutting down" 9.4 s after the master's SIGTERM).
    /// A test that stops "the server" and then expects clients to notice within seconds raced
    /// that linger.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let pgid = c.id();
            let signal = |sig: &str| {
                let _ = Command::new("kill")
                    .args([sig, "--", &format!("-{pgid}")])
                    .stderr(Stdio::null())
                    .status();
            };
            signal("-TERM");
            let t0 = Instant::now();
            loop {
                let _ = c.try_wait();
                if live_in_group(pgid) == 0 {
                    break;
                }
                if t0.elapsed() > Duration::from_secs(10) {
                    signal("-KILL");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dovecot.log")).unwrap_or_default()
    }

    /// Gives INBOX a new UIDVALIDITY (as a restored or rebuilt mailbox would have).
    pub fn change_uidvalidity(&self, to: u32) {
        run(Command::new("doveadm").arg("-c").arg(self.conf()).args([
            "mailbox",
            "update",
            "-u",
            USER,
            "--uid-validity",
            &to.to_string(),
            "INBOX",
        ]));
    }

    /// Deletes the user's UID list and indexes (Dovecot stopped): the next start numbers every
    /// message again from UID 1.
    pub fn forget_uids(&self) {
        assert!(self.child.is_none(), "stop Dovecot first");
        let maildir = self.dir.join(format!("mail/{USER}/Maildir"));
        for e in std::fs::read_dir(&maildir).unwrap() {
            let e = e.unwrap();
            let name = e.file_name().to_string_lossy().to_string();
            if name.starts_with("dovecot-uidlist") || name.starts_with("dovecot.index") {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }

    /// Settings for a watcher of this server's mailbox: `mode` is `tls` (the IMAPS port),
    /// `starttls` or `none` (the plain port); `more` is further TOML (keys, then `[[rules]]`).
    pub fn mailbox(&self, name: &str, mode: &str, more: &str) -> postbox::inbound::MailboxSettings {
        let text = self.mailbox_toml(name, mode, more);
        toml::from_str(&text).unwrap_or_else(|e| panic!("test mailbox TOML: {e}\n{text}"))
    }

    /// The same mailbox as TOML (the body of a `[[mailboxes]]` table), for child processes.
    pub fn mailbox_toml(&self, name: &str, mode: &str, more: &str) -> String {
        let port = if mode == "tls" {
            self.tls_port
        } else {
            self.port
        };
        format!(
            r#"
name = "{name}"
host = "127.0.0.1"
port = {port}
tls = "{mode}"
ca_file = "{ca}"
username = "{USER}"
password = "{PASSWORD}"
alert_to = ["oncall@example.com"]
{more}
"#,
            ca = self.ca_file.display(),
        )
    }

    /// A logged-in test client (plaintext, loopback).
    pub async fn client(&self) -> Appender {
        let tcp = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect to Dovecot");
        let mut c = Client::new(tcp);
        c.read_response()
            .await
            .expect("greeting")
            .expect("greeting");
        let session = c
            .login(USER, PASSWORD)
            .await
            .map_err(|(e, _)| e)
            .expect("login");
        Appender { session }
    }
}

/// Processes of process group `pgid` that are still running (zombies are not: their sockets
/// are closed already, and this machine's init may never reap them).
fn live_in_group(pgid: u32) -> usize {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter(|stat| {
            // pid (comm) state ppid pgrp ...: comm may hold spaces, so split after its ')'.
            let Some((_, rest)) = stat.rsplit_once(')') else {
                return false;
            };
            let mut f = rest.split_whitespace();
            let state = f.next().unwrap_or("Z");
            let pgrp = f.nth(1).and_then(|p| p.parse::<u32>().ok());
            state != "Z" && pgrp == Some(pgid)
        })
        .count()
}

impl Drop for Dovecot {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Waits until `pb`'s watcher (the first mailbox) reports `state` (connected / down).
pub async fn wait_watcher(
    pb: &postbox::Postbox,
    state: &str,
    limit: Duration,
) -> postbox::store::MailboxStatus {
    let t0 = Instant::now();
    loop {
        if let Ok(all) = pb.mailboxes().await
            && let Some(s) = all.into_iter().next()
            && s.state == state
        {
            return s;
        }
        assert!(
            t0.elapsed() < limit,
            "the watcher did not become {state} within {limit:?}: {:?}",
            pb.mailboxes().await
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A test client that puts messages into the mailbox with IMAP APPEND.
pub struct Appender {
    pub session: async_imap::Session<TcpStream>,
}

impl Appender {
    pub async fn append(&mut self, folder: &str, raw: &[u8]) {
        self.session
            .append(folder, None, None, raw)
            .await
            .expect("APPEND");
    }

    /// Deletes (flags \\Deleted and expunges) one message.
    pub async fn delete(&mut self, folder: &str, uid: u32) {
        self.session.select(folder).await.expect("SELECT");
        let _: Vec<_> = self
            .session
            .uid_store(uid.to_string(), "+FLAGS.SILENT (\\Deleted)")
            .await
            .expect("STORE")
            .try_collect()
            .await
            .expect("STORE");
        let _: Vec<_> = self
            .session
            .expunge()
            .await
            .expect("EXPUNGE")
            .try_collect()
            .await
            .expect("EXPUNGE");
    }

    /// UIDs in `folder` and whether each is \Seen.
    pub async fn flags(&mut self, folder: &str) -> Vec<(u32, bool)> {
        self.session.select(folder).await.expect("SELECT");
        let fetched: Vec<_> = self
            .session
            .uid_fetch("1:*", "(UID FLAGS)")
            .await
            .expect("FETCH")
            .try_collect()
            .await
            .unwrap_or_default();
        fetched
            .iter()
            .filter_map(|f| {
                Some((
                    f.uid?,
                    f.flags()
                        .any(|x| matches!(x, async_imap::types::Flag::Seen)),
                ))
            })
            .collect()
    }
}

/// A simple RFC 5322 message.
pub fn message(from: &str, subject: &str, body: &str) -> Vec<u8> {
    format!(
        "From: {from}\r\nTo: alerts@example.com\r\nSubject: {subject}\r\nDate: Sun, 22 Nov 2026 10:00:00 +0000\r\nMessage-ID: <{}@test>\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n{body}\r\n",
        ulid::Ulid::generate()
    )
    .into_bytes()
}
