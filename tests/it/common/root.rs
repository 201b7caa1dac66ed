//! Running a program as root, which a few test servers need (Postfix's master, a tmpfs mount).
//! CI runs the suite as root; elsewhere the program goes through `sudo -n`.

use std::process::Command;

/// True when the tests run as root.
pub fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// `program` run as root: directly when the tests run as root, else through `sudo -n`.
pub fn command(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.arg("-n").arg(program);
        c
    }
}
