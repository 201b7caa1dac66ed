//! What a submission is checked against besides its own fields: the `[limits]` section, and
//! the allowed senders (`delivery.allowed_from`).

use serde::{Deserialize, Serialize};

use super::{EmailAddress, MAX_LIST, MAX_SMALL};

/// Size and count limits applied at submit (configurable under `[limits]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// to + cc + bcc.
    pub max_recipients: usize,
    pub max_subject_chars: usize,
    /// Each of the text and HTML bodies.
    pub max_body_bytes: usize,
    pub max_attachment_bytes: usize,
    /// All attachments of one email together.
    pub max_attachments_total_bytes: usize,
    pub max_tags: usize,
    pub max_metadata_entries: usize,
    /// Template variables of one email, as JSON.
    pub max_variables_bytes: usize,
}

impl Limits {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        use crate::settings::{ConfigError, nonzero};
        nonzero(&[("limits.max_recipients", self.max_recipients as u64)])?;
        for (key, v, max) in [
            ("limits.max_recipients", self.max_recipients, MAX_LIST),
            ("limits.max_tags", self.max_tags, MAX_SMALL),
            (
                "limits.max_metadata_entries",
                self.max_metadata_entries,
                MAX_SMALL,
            ),
        ] {
            if v > max {
                return Err(ConfigError::new(key, format!("must be at most {max}")));
            }
        }
        Ok(())
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_recipients: 50,
            max_subject_chars: 998,
            max_body_bytes: 2 * 1024 * 1024,
            max_attachment_bytes: 10 * 1024 * 1024,
            max_attachments_total_bytes: 20 * 1024 * 1024,
            max_tags: 20,
            max_metadata_entries: 50,
            max_variables_bytes: 64 * 1024,
        }
    }
}

/// Who an email may be from: the address used when an email names none, and, when `allowed`
/// is not empty, the only senders accepted (`delivery.allowed_from`).
#[derive(Debug, Clone)]
pub struct Senders {
    default_from: EmailAddress,
    /// Lower-cased; `@domain` for a whole domain, `user@domain` for one address.
    allowed: Vec<String>,
}

impl Senders {
    /// `allowed` entries are domains (`example.com` or `@example.com`) or addresses
    /// (`ops@example.com`); an error names the bad entry's index. The default sender must be
    /// allowed itself.
    pub fn new(default_from: EmailAddress, allowed: &[String]) -> Result<Senders, (usize, String)> {
        let mut list = Vec::with_capacity(allowed.len());
        for (i, a) in allowed.iter().enumerate() {
            let a = a.trim();
            let domain = a.strip_prefix('@').unwrap_or(a);
            let entry = if domain.contains('@') {
                let addr = EmailAddress::parse(a).map_err(|m| (i, format!("`{a}` {m}")))?;
                addr.address().to_ascii_lowercase()
            } else {
                let ascii = idna::domain_to_ascii(domain)
                    .ok()
                    .filter(|d| !d.is_empty() && (d.contains('.') || d == "localhost"))
                    .ok_or_else(|| (i, format!("`{a}` is not a domain or an address")))?;
                format!("@{ascii}")
            };
            list.push(entry);
        }
        let s = Senders {
            default_from,
            allowed: list,
        };
        if !s.allows(&s.default_from) {
            return Err((
                usize::MAX,
                format!(
                    "does not allow delivery.default_from ({})",
                    s.default_from.address()
                ),
            ));
        }
        Ok(s)
    }

    pub fn default_from(&self) -> &EmailAddress {
        &self.default_from
    }

    /// Is `a` an allowed sender?
    pub fn allows(&self, a: &EmailAddress) -> bool {
        if self.allowed.is_empty() {
            return true;
        }
        let addr = a.address().to_ascii_lowercase();
        let domain = addr.rsplit_once('@').map_or("", |(_, d)| d);
        self.allowed
            .iter()
            .any(|e| e.strip_prefix('@').map_or(*e == addr, |d| d == domain))
    }
}
