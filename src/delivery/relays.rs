//! Several relays: which ones take an email (routing), in which order (failover), and which
//! are cooling down after they could not be reached.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use lettre::Message;
use serde::Serialize;

use super::MailerError;
use super::pool::{Sent, SmtpPool};
use super::settings::{RelaySetup, RouteSettings};
use crate::domain::Email;

/// One relay and its health.
pub struct Relay {
    pub name: String,
    address: String,
    pool: SmtpPool,
    /// Cap on one whole transaction (connecting included), beyond the per-command timeout.
    deadline: Duration,
    cooldown: Duration,
    /// `max_connections`: shared by the live worker processes.
    max_connections: Option<u32>,
    /// Until when it is skipped, why, and since when (wall clock, for people).
    cooling: Mutex<Option<(Instant, String, SystemTime)>>,
}

/// The relays and the routes between them.
pub struct Relays {
    list: Vec<Relay>,
    default_order: Vec<usize>,
    routes: Vec<(RouteSettings, Vec<usize>)>,
    pub failover_on_temporary: bool,
}

impl std::fmt::Debug for Relays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.list.iter().map(|r| &r.name))
            .finish()
    }
}

/// The next relay to try for an email.
#[derive(Debug, Clone, PartialEq)]
pub enum Pick {
    Use(usize),
    /// Every relay of the route was tried (or is paused).
    Exhausted,
}

/// One relay's state for `GET /v1/relays` and the dashboard.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RelayView {
    pub name: String,
    /// host:port
    pub address: String,
    /// Skipped until then (a failed connection, a 421 greeting), with the reason.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub cooling_until: Option<time::OffsetDateTime>,
    pub cooling_reason: Option<String>,
    /// Its place in the default failover order (`delivery.relays`), if it has one.
    pub default_position: Option<usize>,
}

impl Relays {
    pub fn new(setup: &RelaySetup) -> Result<Relays, MailerError> {
        let mut list = Vec::with_capacity(setup.relays.len());
        for s in &setup.relays {
            list.push(Relay {
                name: s.name.clone(),
                address: format!("{}:{}", s.host, s.port),
                pool: SmtpPool::new(s)?,
                deadline: Duration::from_secs(s.connect_timeout_secs + 3 * s.command_timeout_secs),
                cooldown: Duration::from_secs(s.cooldown_secs),
                max_connections: s.max_connections,
                cooling: Mutex::new(None),
            });
        }
        for r in &list {
            if let Some(max) = r.max_connections {
                r.pool.set_cap(max as usize);
            }
        }
        Ok(Relays {
            list,
            default_order: setup.default_order.clone(),
            routes: setup.routes.clone(),
            failover_on_temporary: setup.failover_on_temporary,
        })
    }

    pub fn name(&self, i: usize) -> &str {
        &self.list[i].name
    }

    pub fn position(&self, name: &str) -> Option<usize> {
        self.list.iter().position(|r| r.name == name)
    }

    /// The relays that may take `email`, in failover order: its `relay` field (that relay
    /// alone), else the first matching route, else the default order.
    pub fn route(&self, email: &Email) -> Vec<usize> {
        if let Some(name) = &email.relay {
            return self.position(name).into_iter().collect();
        }
        let domain = |a: &str| a.rsplit_once('@').map(|(_, d)| d.to_ascii_lowercase());
        let from = domain(email.from.address());
        for (r, order) in &self.routes {
            let hit = match (&r.tag, &r.from_domain, &r.rcpt_domain) {
                (Some(t), _, _) => email.tags.contains(t),
                (_, Some(d), _) => from.as_deref() == Some(d.as_str()),
                (_, _, Some(d)) => email
                    .recipients()
                    .any(|a| domain(a.address()).as_deref() == Some(d.as_str())),
                _ => false,
            };
            if hit {
                return order.clone();
            }
        }
        self.default_order.clone()
    }

    /// The first relay of `route` not in `tried` and not cooling down. When every one left
    /// is cooling down, the one back soonest: cool-downs order the relays, they never hold
    /// mail back (with one relay, a relay that is down costs attempts and ends in the dead
    /// letters after `[retry]`'s budget, as it always did).
    pub fn pick(&self, route: &[usize], tried: &[usize]) -> Pick {
        let now = Instant::now();
        let mut soonest: Option<(Instant, usize)> = None;
        for &i in route.iter().filter(|i| !tried.contains(i)) {
            let mut c = self.list[i]
                .cooling
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            match &*c {
                Some((until, _, _)) if *until > now => {
                    if soonest.is_none_or(|(s, _)| *until < s) {
                        soonest = Some((*until, i));
                    }
                }
                Some(_) => {
                    *c = None;
                    metrics::gauge!("postbox_relay_cooling", "relay" => self.list[i].name.clone())
                        .set(0.0);
                    return Pick::Use(i);
                }
                None => return Pick::Use(i),
            }
        }
        match soonest {
            Some((_, i)) => Pick::Use(i),
            None => Pick::Exhausted,
        }
    }

    /// Skips relay `i` for its cool-down: it could not be reached (`why`).
    pub fn cool(&self, i: usize, why: &str) {
        let r = &self.list[i];
        *r.cooling.lock().unwrap_or_else(|p| p.into_inner()) = Some((
            Instant::now() + r.cooldown,
            why.chars().filter(|c| !c.is_control()).take(300).collect(),
            SystemTime::now(),
        ));
        metrics::gauge!("postbox_relay_cooling", "relay" => r.name.clone()).set(1.0);
        tracing::warn!(relay = %r.name, reason = %why, cooldown_secs = r.cooldown.as_secs(),
            "relay unreachable; skipped for its cool-down");
    }

    /// Whether a relay has a `max_connections` to share.
    pub fn shares_connections(&self) -> bool {
        self.list.iter().any(|r| r.max_connections.is_some())
    }

    /// `live` worker processes share each relay's `max_connections`: this one takes an equal
    /// share (at least one).
    pub fn share_connections(&self, live: usize) {
        for r in &self.list {
            if let Some(max) = r.max_connections {
                r.pool.set_cap((max as usize) / live.max(1));
            }
        }
    }

    /// Sends one message through relay `i`.
    pub async fn send(&self, i: usize, message: &Message) -> Sent {
        let r = &self.list[i];
        r.pool.send(message, r.deadline).await
    }

    pub fn views(&self) -> Vec<RelayView> {
        let now = Instant::now();
        self.list
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let c = r.cooling.lock().unwrap_or_else(|p| p.into_inner()).clone();
                let c = c.filter(|(until, _, _)| *until > now);
                RelayView {
                    name: r.name.clone(),
                    address: r.address.clone(),
                    cooling_until: c
                        .as_ref()
                        .map(|(until, _, _)| time::OffsetDateTime::now_utc() + (*until - now)),
                    cooling_reason: c.map(|(_, why, _)| why),
                    default_position: self.default_order.iter().position(|&d| d == i),
                }
            })
            .collect()
    }
}
