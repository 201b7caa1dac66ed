//! The composition root. [`Runtime::build`] resolves what the settings only name, once: secrets
//! from the environment (`password_env`, `token_env`), the API's tokens, each mailbox with its
//! compiled rules, the allowed senders. Every layer then gets its own section and these
//! resolved parts, nothing more. [`Role`]s say which parts a process runs; [`crate::Postbox`]
//! runs them.

use std::sync::Arc;

use crate::api::ResolvedToken;
use crate::config::Settings;
use crate::domain::Senders;
use crate::inbound::Mailbox;
use crate::settings::ConfigError;

/// Settings with everything they name resolved.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub settings: Settings,
    pub senders: Senders,
    /// The API's bearer tokens (none: the API is open, and loopback only).
    pub tokens: Vec<ResolvedToken>,
    pub mailboxes: Vec<Arc<Mailbox>>,
}

/// What a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The HTTP API (unless `api.enabled = false`), the delivery workers and the watchers.
    Serve,
    /// The HTTP API only.
    Api,
    /// The delivery workers only.
    Worker,
}

impl Role {
    pub fn runs_api(self, settings: &Settings) -> bool {
        match self {
            Role::Api => true,
            Role::Worker => false,
            Role::Serve => settings.api.enabled,
        }
    }

    pub fn runs_workers(self) -> bool {
        !matches!(self, Role::Api)
    }

    pub fn runs_watchers(self) -> bool {
        matches!(self, Role::Serve)
    }
}

impl Runtime {
    /// The API's address; refused when it is not loopback and no token is configured (an
    /// open API beyond this host).
    pub fn api_addr(&self) -> Result<std::net::SocketAddr, ConfigError> {
        self.settings.api.exposed_addr(&self.tokens)
    }

    /// Resolves `settings` with the process environment.
    pub fn build(settings: Settings) -> Result<Runtime, ConfigError> {
        Self::build_with(settings, &|k| std::env::var(k).ok())
    }

    /// Resolves `settings`, reading secrets through `env`.
    pub fn build_with(
        settings: Settings,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Runtime, ConfigError> {
        settings.validate()?;
        let senders = settings.delivery.senders()?;
        let tokens = settings.api.resolve_tokens(env)?;
        let mailboxes = crate::inbound::compile(&settings.mailboxes, env)?;
        // An alert is an ordinary email: recipients past the limit would fail it at send time.
        let max = settings.limits.max_recipients;
        for (i, mb) in mailboxes.iter().enumerate() {
            if mb.alert_to.len() > max {
                return Err(ConfigError::new(
                    format!("mailboxes[{i}].alert_to"),
                    format!(
                        "(mailbox \"{}\") {} recipients; an email may have at most {max} \
                         (limits.max_recipients)",
                        mb.name,
                        mb.alert_to.len()
                    ),
                ));
            }
            for (j, r) in mb.rules.iter().enumerate() {
                if r.recipients.len() > max {
                    return Err(ConfigError::new(
                        format!("mailboxes[{i}].rules[{j}].alert_to"),
                        format!(
                            "(mailbox \"{}\", rule \"{}\") {} recipients; an email may have at \
                             most {max} (limits.max_recipients)",
                            mb.name,
                            r.name,
                            r.recipients.len()
                        ),
                    ));
                }
            }
        }
        Ok(Runtime {
            settings,
            senders,
            tokens,
            mailboxes,
        })
    }
}
