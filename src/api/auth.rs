//! Bearer tokens (compared in constant time), a per-token rate limit (governor), and a
//! limit on failed logins per client address (bearer and dashboard alike).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::ConnectInfo;
use axum::http::request::Parts;

use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use secrecy::ExposeSecret;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::ApiState;
use super::error::ApiError;
use super::settings::ResolvedToken;

/// Who is calling: the token's name (`anonymous` when no token is configured). Scopes
/// idempotency keys and appears in logs; never the secret.
#[derive(Debug, Clone)]
pub struct Principal(pub String);

struct Entry {
    name: String,
    digest: [u8; 32],
    limit: Option<RateLimit>,
}

/// The configured tokens. Empty: the API is open (only allowed on loopback; config enforces it).
pub struct Tokens {
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field(
                "names",
                &self.entries.iter().map(|e| &e.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn digest(s: &[u8]) -> [u8; 32] {
    Sha256::digest(s).into()
}

impl Tokens {
    pub fn new(tokens: &[ResolvedToken]) -> Tokens {
        Tokens {
            entries: tokens
                .iter()
                .map(|t| Entry {
                    name: t.name.clone(),
                    digest: digest(t.secret.expose_secret().as_bytes()),
                    limit: (t.rate_per_sec > 0.0).then(|| RateLimit::new(t.rate_per_sec, t.burst)),
                })
                .collect(),
        }
    }

    pub fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    /// The entry whose secret equals `given`. Every entry is compared, in constant time, over
    /// fixed-length digests: neither timing nor length tells a caller how close it came.
    fn find(&self, given: &str) -> Option<&Entry> {
        let d = digest(given.as_bytes());
        let mut found = None;
        for e in &self.entries {
            if bool::from(e.digest.ct_eq(&d)) {
                found = Some(e);
            }
        }
        found
    }

    /// The name of the token equal to `given` (dashboard login).
    pub fn name_of(&self, given: &str) -> Option<String> {
        self.find(given).map(|e| e.name.clone())
    }

    /// Checks the `Authorization` header value and the token's rate limit.
    fn authorize(&self, header: Option<&str>) -> Result<Principal, ApiError> {
        if self.is_open() {
            return Ok(Principal("anonymous".into()));
        }
        let Some(h) = header else {
            return Err(ApiError::unauthorized(
                "missing bearer token: send `Authorization: Bearer <token>`",
            ));
        };
        let given = h
            .strip_prefix("Bearer ")
            .or_else(|| h.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
            })?;
        let entry = self
            .find(given)
            .ok_or_else(|| ApiError::unauthorized("the bearer token is not valid"))?;
        if let Some(limit) = &entry.limit
            && let Err(wait) = limit.take()
        {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!("rate limit of token `{}` exceeded; retry later", entry.name),
            )
            .retry_after(wait.as_secs_f64().ceil() as u64));
        }
        Ok(Principal(entry.name.clone()))
    }
}

/// A token's rate limit: `rate` requests per second, at most `burst` at once after being idle
/// (governor's GCRA: lock-free, one atomic per check).
pub struct RateLimit<C: governor::clock::Clock = governor::clock::DefaultClock> {
    limiter: governor::RateLimiter<
        governor::state::NotKeyed,
        governor::state::InMemoryState,
        C,
        governor::middleware::NoOpMiddleware<C::Instant>,
    >,
}

impl RateLimit {
    pub fn new(rate: f64, burst: u32) -> RateLimit {
        RateLimit::with_clock(rate, burst, governor::clock::DefaultClock::default())
    }
}

impl<C: governor::clock::Clock> RateLimit<C> {
    fn with_clock(rate: f64, burst: u32, clock: C) -> RateLimit<C> {
        let period = std::time::Duration::from_secs_f64(1.0 / rate.max(1e-9));
        let quota = governor::Quota::with_period(period)
            .expect("a positive rate has a nonzero period")
            .allow_burst(std::num::NonZeroU32::new(burst.max(1)).expect("at least 1"));
        RateLimit {
            limiter: governor::RateLimiter::direct_with_clock(quota, clock),
        }
    }

    /// Takes one request's allowance, or says how long until one is there.
    pub fn take(&self) -> Result<(), std::time::Duration> {
        self.limiter
            .check()
            .map_err(|not_until| not_until.wait_time_from(self.limiter.clock().now()))
    }
}

/// The address a request came from (`0.0.0.0` when the router is called without a server, as
/// some tests do).
pub fn client_ip(parts: &Parts) -> IpAddr {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED), |c| c.0.ip())
}

/// Failed logins per client address: after `max` in one `window`, every login from that
/// address (right token or not) is refused until the window ends, so guessing a token costs
/// `window / max` per try. A success clears the count.
pub struct FailedLogins {
    max: u32,
    window: Duration,
    map: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

/// Addresses tracked at most (oldest windows are dropped first).
const MAX_TRACKED: usize = 100_000;

impl FailedLogins {
    pub fn new(max: u32, window: Duration) -> FailedLogins {
        FailedLogins {
            max: max.max(1),
            window,
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, (u32, Instant)>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// How long `ip` must still wait, if it is locked out.
    pub fn blocked(&self, ip: IpAddr) -> Option<Duration> {
        let (n, since) = *self.lock().get(&ip)?;
        let left = self.window.checked_sub(since.elapsed())?;
        (n >= self.max).then_some(left)
    }

    pub fn fail(&self, ip: IpAddr) {
        let mut map = self.lock();
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            let window = self.window;
            map.retain(|_, (_, since)| since.elapsed() < window);
            if map.len() >= MAX_TRACKED {
                return;
            }
        }
        let e = map.entry(ip).or_insert((0, Instant::now()));
        if e.1.elapsed() >= self.window {
            *e = (0, Instant::now());
        }
        e.0 += 1;
    }

    pub fn clear(&self, ip: IpAddr) {
        self.lock().remove(&ip);
    }
}

/// 429 for a client locked out by [`FailedLogins`].
pub fn locked_out(wait: Duration) -> ApiError {
    ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        "too_many_failed_logins",
        "too many requests with a wrong token from this address; try again later",
    )
    .retry_after(wait.as_secs().max(1))
}

/// Middleware on every authenticated route.
pub async fn require_token(
    State(state): State<ApiState>,
    mut req: Request,
    next: Next,
) -> Response {
    if state.tokens.is_open() {
        req.extensions_mut().insert(Principal("anonymous".into()));
        return next.run(req).await;
    }
    let (parts, body) = req.into_parts();
    let ip = client_ip(&parts);
    if let Some(wait) = state.logins.blocked(ip) {
        return locked_out(wait).into_response();
    }
    let header = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match state.tokens.authorize(header) {
        Ok(p) => {
            tracing::Span::current().record("token", p.0.as_str());
            let mut req = Request::from_parts(parts, body);
            req.extensions_mut().insert(p);
            next.run(req).await
        }
        Err(e) => {
            // A wrong token counts (a missing one is no guess; a rate-limited right one is no
            // failure).
            if e.status == StatusCode::UNAUTHORIZED && header.is_some() {
                state.logins.fail(ip);
                tracing::warn!(client = %ip, "request with a wrong bearer token");
            }
            e.into_response()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_token_gets_its_burst_then_its_rate() {
        let clock = governor::clock::FakeRelativeClock::default();
        let limit = RateLimit::with_clock(10.0, 3, clock.clone());
        for _ in 0..3 {
            assert!(limit.take().is_ok());
        }
        let wait = limit.take().unwrap_err();
        assert_eq!(wait, Duration::from_millis(100));
        clock.advance(Duration::from_millis(100));
        assert!(limit.take().is_ok());
        assert!(limit.take().is_err());
        // A long idle period refills only up to the burst.
        clock.advance(Duration::from_secs(60));
        for _ in 0..3 {
            assert!(limit.take().is_ok());
        }
        assert!(limit.take().is_err());
    }

    #[test]
    fn failed_logins_lock_an_address_out_for_the_rest_of_the_window() {
        let f = FailedLogins::new(3, Duration::from_secs(60));
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        for _ in 0..2 {
            f.fail(a);
        }
        assert!(f.blocked(a).is_none());
        f.fail(a);
        let wait = f.blocked(a).expect("locked out after 3");
        assert!(wait <= Duration::from_secs(60) && wait > Duration::from_secs(50));
        assert!(f.blocked(b).is_none(), "other addresses are not affected");
        f.clear(a);
        assert!(f.blocked(a).is_none());
        // A window that ran out starts counting again.
        let f = FailedLogins::new(1, Duration::from_millis(1));
        f.fail(a);
        std::thread::sleep(Duration::from_millis(5));
        assert!(f.blocked(a).is_none());
    }

    #[test]
    fn tokens_match_exactly() {
        let t = Tokens::new(&[ResolvedToken {
            name: "app".into(),
            secret: "s3cret-token-0123456789".to_string().into(),
            rate_per_sec: 0.0,
            burst: 1,
        }]);
        assert_eq!(
            t.authorize(Some("Bearer s3cret-token-0123456789"))
                .unwrap()
                .0,
            "app"
        );
        for bad in [
            None,
            Some("Bearer s3cret-token-012345678"),
            Some("Bearer s3cret-token-01234567890"),
            Some("Basic s3cret-token-0123456789"),
            Some("s3cret-token-0123456789"),
            Some("Bearer "),
        ] {
            let e = t.authorize(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::UNAUTHORIZED, "{bad:?}");
        }
        assert!(Tokens::new(&[]).authorize(None).is_ok());
    }
}
