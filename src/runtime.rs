//! The composition root. [`Runtime::build`] resolves what the settings only name, once: secrets
//! from the environment (`password_env`, `token_env`), the API's tokens, each mailbox with its
//! compiled rules, the allowed senders. Every layer then gets its own section and these
//! resolved parts, nothing more: [`Postbox::start`] assembles the facade from them, and runs
//! the parts above the facade (the HTTP API, the mailbox watchers) for it, as its
//! [`Role`] says.

use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;

use crate::api::ResolvedToken;
use crate::config::Settings;
use crate::delivery::Mailer;
use crate::domain::Senders;
use crate::inbound::Mailbox;
use crate::postbox::{OpenError, Parts, Role, Roles, RunError};
use crate::settings::ConfigError;
use crate::store::Store;
use crate::worker::WorkerSettings;
use crate::{Postbox, Shutdown};

/// Settings with everything they name resolved.
#[derive(Debug, Clone)]
pub struct Runtime {
    pub settings: Settings,
    pub senders: Senders,
    /// The API's bearer tokens (none: the API is open, and loopback only).
    pub tokens: Vec<ResolvedToken>,
    pub mailboxes: Vec<Arc<Mailbox>>,
    /// The config's webhook endpoints, secrets resolved.
    pub webhooks: Vec<crate::webhooks::Endpoint>,
    /// The relays (passwords resolved), routes, domain limits and throttling.
    pub relays: crate::delivery::RelaySetup,
    /// DKIM keys by From domain.
    pub dkim: crate::delivery::DkimSigner,
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
        let webhooks = crate::webhooks::compile(&settings.webhooks, env)?;
        let mut relays = settings.relay_setup()?;
        let from_file = !settings.relays.is_empty();
        for (i, r) in relays.relays.iter_mut().enumerate() {
            if let Some(var) = &r.password_env {
                let key = if from_file {
                    format!("relays[{i}].password_env")
                } else {
                    "smtp.password_env".to_string()
                };
                let value = env(var).ok_or_else(|| {
                    ConfigError::new(key, format!("environment variable {var} is not set"))
                })?;
                r.password = Some(value.into());
            }
        }
        let dkim = crate::delivery::DkimSigner::load(&settings.dkim, env)?;
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
            webhooks,
            relays,
            dkim,
        })
    }
}

impl Postbox {
    /// Opens the database (creating and migrating it) and prepares the mailer.
    ///
    /// Secrets named by the settings are read from the environment now ([`Runtime::build`]); an
    /// embedder that resolves them itself calls [`Postbox::start`].
    pub async fn open(settings: Settings) -> Result<Postbox, OpenError> {
        Self::start(Runtime::build(settings)?).await
    }

    /// [`Postbox::open`] with settings already resolved.
    pub async fn start(rt: Runtime) -> Result<Postbox, OpenError> {
        crate::metrics::init();
        let s = &rt.settings;
        let store = Store::open(&s.database, &s.queue.name).await?;
        let mailer = Mailer::from_settings(&s.delivery, &rt.relays)?;
        let shared = (store.kind() == crate::store::Kind::Postgres).then(|| store.clone());
        let limiter = Arc::new(crate::delivery::Limiter::new(&rt.relays, shared));
        Ok(Postbox::assemble(Parts {
            relay_names: rt.relays.relays.iter().map(|r| r.name.clone()).collect(),
            limiter,
            dkim: rt.dkim.clone(),
            store,
            mailer,
            limits: s.limits.clone(),
            senders: rt.senders.clone(),
            retry: s.retry.clone(),
            workers: WorkerSettings {
                queue: s.queue.clone(),
                retention: s.retention.clone(),
                idempotency_ttl: Duration::from_secs(s.api.idempotency_ttl_hours * 3600),
                return_path: s.delivery.return_path.clone(),
                public_url: s.api.public_url.clone(),
            },
            roles: Arc::new(rt),
        }))
    }
}

impl Runtime {
    /// Records the config's webhook endpoints; then, when `dispatch`, sends webhooks.
    async fn webhooks_of(&self, pb: &Postbox, dispatch: bool, shutdown: Shutdown) {
        crate::webhooks::run(
            pb.store().clone(),
            pb.recorder().clone(),
            self.webhooks.clone(),
            self.settings.webhook.clone(),
            Duration::from_secs(self.settings.cluster.lease_secs),
            dispatch,
            shutdown,
        )
        .await;
    }
}

/// The API and the watchers, run with the settings and resolved parts they need.
impl Roles for Runtime {
    fn run<'a>(
        self: Arc<Self>,
        pb: &'a Postbox,
        role: Role,
        shutdown: Shutdown,
    ) -> BoxFuture<'a, Result<(), RunError>> {
        async move {
            let (api, workers, watchers) = (
                role.runs_api(self.settings.api.enabled),
                role.runs_workers(),
                role.runs_watchers(),
            );
            let listener = if api {
                let l = crate::api::bind(&self.settings.api, &self.tokens).await;
                Some(l.map_err(RunError::Bind)?)
            } else {
                None
            };
            tracing::info!(
                api,
                workers,
                watchers,
                "postbox serving; SIGINT or SIGTERM stops it gracefully"
            );
            // Each role is a task of its own, on the runtime's worker threads (not polled
            // inside the caller's future, which `block_on` polls on the main thread).
            let http = tokio::spawn({
                let (me, pb, sd) = (self.clone(), pb.clone(), shutdown.clone());
                async move {
                    match listener {
                        Some(l) => me.serve_api(&pb, l, workers, sd).await,
                        None => Ok(()),
                    }
                }
            });
            let work = tokio::spawn({
                let (pb, sd) = (pb.clone(), shutdown.clone());
                async move {
                    if workers {
                        pb.run_workers_with(sd).await;
                    }
                }
            });
            let stall = tokio::spawn({
                let (me, pb, sd) = (self.clone(), pb.clone(), shutdown.clone());
                async move {
                    if workers {
                        crate::stall::run(
                            pb,
                            me.settings.stall_alert.clone(),
                            Duration::from_secs(me.settings.cluster.lease_secs),
                            sd,
                        )
                        .await;
                    }
                }
            });
            // Every role records the config's endpoints (so an endpoint sees the events of
            // emails submitted from its first start on); they are sent where deliveries run.
            let hooks = tokio::spawn({
                let (me, pb, sd) = (self.clone(), pb.clone(), shutdown.clone());
                async move { me.webhooks_of(&pb, workers, sd).await }
            });
            let watch = tokio::spawn({
                let (me, pb, sd) = (self.clone(), pb.clone(), shutdown.clone());
                async move {
                    if watchers {
                        me.run_watchers(&pb, sd).await;
                    }
                }
            });
            let (http, work, watch, hooks, stall) = tokio::join!(http, work, watch, hooks, stall);
            for r in [work, watch, hooks, stall] {
                if let Err(e) = r {
                    tracing::error!(error = %e, "a role's task failed");
                }
            }
            match http {
                Ok(r) => r.map_err(RunError::Api),
                Err(e) => Err(RunError::Api(anyhow::anyhow!("the API task failed: {e}"))),
            }
        }
        .boxed()
    }

    fn run_watchers<'a>(self: Arc<Self>, pb: &'a Postbox, shutdown: Shutdown) -> BoxFuture<'a, ()> {
        let lease = Duration::from_secs(self.settings.cluster.lease_secs);
        crate::inbound::run(pb.clone(), self.mailboxes.clone(), lease, shutdown).boxed()
    }

    fn run_webhooks<'a>(self: Arc<Self>, pb: &'a Postbox, shutdown: Shutdown) -> BoxFuture<'a, ()> {
        async move { self.webhooks_of(pb, true, shutdown).await }.boxed()
    }

    fn serve_api<'a>(
        self: Arc<Self>,
        pb: &'a Postbox,
        listener: tokio::net::TcpListener,
        expect_workers: bool,
        shutdown: Shutdown,
    ) -> BoxFuture<'a, anyhow::Result<()>> {
        async move {
            crate::api::serve(
                pb.clone(),
                &self.settings.api,
                &self.tokens,
                listener,
                expect_workers,
                shutdown,
            )
            .await
        }
        .boxed()
    }
}
