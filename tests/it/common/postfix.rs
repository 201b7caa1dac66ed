//! A real Postfix (Debian's `postfix`, which scripts/test.sh installs for `smtp-sink`) as the
//! relay postbox sends through: its own `main.cf`, `master.cf`, queue and data directories in a
//! temp dir, SMTP on a random loopback port, and everything it delivers (mail, and the bounces
//! it writes itself) relayed to one loopback SMTP server. The system's own Postfix config is
//! neither read nor touched.
//!
//! Postfix's `master` starts as root and drops to the `postfix` user: as another user, the
//! commands run through `sudo -n`.

use super::ports::free_port;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Postfix {
    /// Where postbox sends: Postfix's smtpd.
    pub port: u16,
    etc: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

fn postfix_command() -> Command {
    super::root::command("/usr/sbin/postfix")
}

impl Postfix {
    /// Starts Postfix in `dir` (created), relaying everything to `127.0.0.1:relay_port`.
    pub fn start(dir: &Path, relay_port: u16) -> Postfix {
        assert!(
            Path::new("/usr/sbin/postfix").exists(),
            "Postfix is not installed. Run the tests with scripts/test.sh (it installs Debian's \
             postfix), or: apt-get install postfix"
        );
        let (etc, queue, data) = (dir.join("etc"), dir.join("queue"), dir.join("data"));
        for d in [&etc, &queue, &data] {
            std::fs::create_dir_all(d).unwrap();
        }
        // The postfix user walks down to its queue: every directory on the way (below the
        // system's temp dir) is searchable.
        let tmp = std::env::temp_dir();
        let mut p = Some(dir);
        while let Some(d) = p.filter(|d| d.starts_with(&tmp) && *d != tmp) {
            let mut perm = std::fs::metadata(d).unwrap().permissions();
            perm.set_mode(perm.mode() | 0o755);
            std::fs::set_permissions(d, perm).unwrap();
            p = d.parent();
        }
        let chown = super::root::command("chown")
            .arg("postfix")
            .arg(&data)
            .status()
            .unwrap();
        assert!(chown.success(), "cannot give {data:?} to the postfix user");
        let port = free_port();
        std::fs::write(
            etc.join("main.cf"),
            format!(
                "compatibility_level = 3.6\n\
                 queue_directory = {queue}\n\
                 data_directory = {data}\n\
                 mail_owner = postfix\n\
                 inet_interfaces = 127.0.0.1\n\
                 inet_protocols = ipv4\n\
                 myhostname = mx.postfix.test\n\
                 mydomain = postfix.test\n\
                 mydestination =\n\
                 mynetworks = 127.0.0.0/8\n\
                 relayhost = [127.0.0.1]:{relay_port}\n\
                 alias_maps =\n\
                 alias_database =\n\
                 local_recipient_maps =\n\
                 smtp_tls_security_level = none\n\
                 smtpd_tls_security_level = none\n\
                 biff = no\n\
                 maillog_file = /dev/stdout\n",
                queue = queue.display(),
                data = data.display(),
            ),
        )
        .unwrap();
        // Only what relaying and bouncing need; nothing chrooted.
        std::fs::write(
            etc.join("master.cf"),
            format!(
                "127.0.0.1:{port} inet n - n - - smtpd\n\
                 pickup unix n - n 60 1 pickup\n\
                 cleanup unix n - n - 0 cleanup\n\
                 qmgr unix n - n 300 1 qmgr\n\
                 rewrite unix - - n - - trivial-rewrite\n\
                 bounce unix - - n - 0 bounce\n\
                 defer unix - - n - 0 bounce\n\
                 trace unix - - n - 0 bounce\n\
                 verify unix - - n - 1 verify\n\
                 flush unix n - n 1000? 0 flush\n\
                 proxymap unix - - n - - proxymap\n\
                 smtp unix - - n - - smtp\n\
                 relay unix - - n - - smtp\n\
                 showq unix n - n - - showq\n\
                 error unix - - n - - error\n\
                 retry unix - - n - - error\n\
                 discard unix - - n - - discard\n\
                 anvil unix - - n - 1 anvil\n\
                 scache unix - - n - 1 scache\n\
                 postlog unix-dgram n - n - 1 postlogd\n"
            ),
        )
        .unwrap();
        let log = dir.join("postfix.log");
        let out = std::fs::File::create(&log).unwrap();
        let child = postfix_command()
            .arg("-c")
            .arg(&etc)
            .arg("start-fg")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("cannot run postfix");
        let mut pf = Postfix {
            port,
            etc,
            log,
            child: Some(child),
        };
        let t0 = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(Some(status)) = pf.child.as_mut().map(|c| c.try_wait().unwrap()) {
                panic!(
                    "Postfix exited ({status}) before it listened; its log:\n{}",
                    pf.log()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(20),
                "Postfix did not listen within 20 s; its log:\n{}",
                pf.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        pf
    }

    /// What Postfix logged so far (each delivery, with its status and DSN code).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Postfix {
    fn drop(&mut self) {
        let _ = postfix_command()
            .arg("-c")
            .arg(&self.etc)
            .arg("abort")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
