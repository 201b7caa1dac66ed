//! What every settings section shares: the error that names a key, and the serializer that
//! masks a secret. A leaf module: each layer defines its own section (`delivery::SmtpSettings`,
//! `api::ApiSettings`, ...) and validates it with these, and `config` only assembles them.

use secrecy::SecretString;
use serde::Serializer;

/// A configuration problem, naming the key it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("config key `{key}`: {message}")]
pub struct ConfigError {
    pub key: String,
    pub message: String,
}

impl ConfigError {
    /// A problem with `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            key: key.into(),
            message: message.into(),
        }
    }
}

impl ConfigError {
    /// This error with its key moved under `prefix` (`0.name` -> `mailboxes[0].name`).
    pub fn at(mut self, prefix: &str) -> Self {
        self.key = format!("{prefix}{}", self.key);
        self
    }
}

/// Serializes a secret as `********` (for `config check`).
pub fn masked<S: Serializer>(v: &Option<SecretString>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("********"),
        None => s.serialize_none(),
    }
}

/// Fails on the first key whose value is 0.
pub fn nonzero(keys: &[(&str, u64)]) -> Result<(), ConfigError> {
    for (key, v) in keys {
        if *v == 0 {
            return Err(ConfigError::new(*key, "must be greater than 0"));
        }
    }
    Ok(())
}
