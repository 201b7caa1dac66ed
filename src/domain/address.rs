//! A validated mailbox: optional display name plus an address whose domain is kept in ASCII
//! (IDNA) form, so the SMTP envelope never needs SMTPUTF8 for an internationalized domain.

use std::fmt;
use std::str::FromStr;

use lettre::message::Mailbox;
use serde::{Deserialize, Serialize};

/// A validated email address with an optional display name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct EmailAddress {
    name: Option<String>,
    /// `local@domain` with the domain in ASCII (punycode) form.
    addr: String,
}

impl EmailAddress {
    /// Parses `user@example.com` or `Display Name <user@example.com>`.
    ///
    /// ```
    /// use postbox::domain::EmailAddress;
    /// let a = EmailAddress::parse("Zoë <zoe@bücher.example>").unwrap();
    /// assert_eq!(a.address(), "zoe@xn--bcher-kva.example");
    /// assert_eq!(a.name(), Some("Zoë"));
    /// assert!(EmailAddress::parse("not an address").is_err());
    /// ```
    pub fn parse(input: &str) -> Result<Self, String> {
        let input = input.trim();
        if input.is_empty() {
            return Err("must not be empty".into());
        }
        if input.chars().any(char::is_control) {
            return Err("must not contain control characters (CR, LF, NUL, ...)".into());
        }
        if input.len() > 320 {
            return Err("is longer than 320 characters".into());
        }
        let mbox = Mailbox::from_str(input).map_err(|e| format!("is not a valid address ({e})"))?;
        let user = mbox.email.user();
        let domain = mbox.email.domain();
        let ascii_domain = idna::domain_to_ascii(domain)
            .map_err(|_| "has an invalid internationalized domain".to_string())?;
        if !ascii_domain.contains('.') && ascii_domain != "localhost" {
            return Err("domain must contain a dot".into());
        }
        let name = mbox
            .name
            .map(|n| n.trim().to_string())
            .filter(|n| !n.is_empty());
        Ok(Self {
            name,
            addr: format!("{user}@{ascii_domain}"),
        })
    }

    pub fn address(&self) -> &str {
        &self.addr
    }

    pub fn name(&self) -> Option<&str> {
        self.name.as_deref()
    }

    /// The address with the local part masked, for logs: `j***@example.com`.
    pub fn masked(&self) -> String {
        mask(&self.addr)
    }

    /// As a lettre mailbox (cannot fail: validated at construction).
    pub fn to_mailbox(&self) -> Mailbox {
        let (user, domain) = self.addr.rsplit_once('@').unwrap_or((&self.addr, ""));
        let email = lettre::Address::new(user, domain)
            .unwrap_or_else(|_| lettre::Address::new_dangerous(user, domain));
        Mailbox::new(self.name.clone(), email)
    }
}

/// Masks the local part of an address for logs.
pub fn mask(addr: &str) -> String {
    match addr.rsplit_once('@') {
        Some((user, domain)) => {
            let first: String = user.chars().take(1).collect();
            format!("{first}***@{domain}")
        }
        None => "***".into(),
    }
}

impl fmt::Display for EmailAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.name {
            Some(n) => write!(
                f,
                "{}",
                Mailbox::new(Some(n.clone()), self.to_mailbox().email)
            ),
            None => f.write_str(&self.addr),
        }
    }
}

impl TryFrom<String> for EmailAddress {
    type Error = String;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Self::parse(&s)
    }
}

impl From<EmailAddress> for String {
    fn from(a: EmailAddress) -> String {
        a.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_plain_named_and_international_addresses() {
        for ok in [
            "a@example.com",
            "Jane Doe <jane@example.com>",
            "\"Doe, Jane\" <jane@example.com>",
            "user@bücher.example",
            "root@localhost",
        ] {
            assert!(EmailAddress::parse(ok).is_ok(), "{ok} should parse");
        }
    }

    #[test]
    fn rejects_malformed_addresses_and_header_injection() {
        for bad in [
            "",
            "plain",
            "a@",
            "@example.com",
            "a@b@c.com",
            "a@example.com\r\nBcc: x@y.com",
            "Jane <jane@example.com",
            "a@nodot",
        ] {
            assert!(
                EmailAddress::parse(bad).is_err(),
                "{bad:?} should be rejected"
            );
        }
    }

    #[test]
    fn display_round_trips_through_parse() {
        let a = EmailAddress::parse("\"Doe, Jane\" <jane@example.com>").unwrap();
        let b = EmailAddress::parse(&a.to_string()).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn masking_hides_the_local_part() {
        assert_eq!(mask("jane@example.com"), "j***@example.com");
    }
}
