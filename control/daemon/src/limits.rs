//! Limits on work done for clients that have not proven who they are: concurrent connections and
//! unauthenticated handshakes per listener and per source, and login attempts per source and per
//! user. Pure bookkeeping in memory (no IO, no clock of its own), so the policy is unit-tested.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// `proxy_service.limits`: what one listener admits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConnectionLimits {
    /// Connections held by control at once (handshakes and sessions control relays itself;
    /// sessions handed to the data plane no longer count).
    pub max_connections: usize,
    /// Connections that have not yet presented a valid identity, from all sources.
    pub max_unauthenticated: usize,
    /// Connections that have not yet presented a valid identity, from one source address.
    pub max_unauthenticated_per_source: usize,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits { max_connections: 8192, max_unauthenticated: 512, max_unauthenticated_per_source: 32 }
    }
}

/// Which limit a refused connection hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitHit {
    Connections,
    Unauthenticated,
    UnauthenticatedPerSource,
}

impl LimitHit {
    /// The metric label and log reason.
    pub fn label(self) -> &'static str {
        match self {
            LimitHit::Connections => "too_many_connections",
            LimitHit::Unauthenticated => "too_many_handshakes",
            LimitHit::UnauthenticatedPerSource => "too_many_handshakes_from_source",
        }
    }

    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            LimitHit::Connections => "sorry, too many clients already",
            LimitHit::Unauthenticated => "sorry, too many connections are authenticating; try again",
            LimitHit::UnauthenticatedPerSource => "sorry, too many unauthenticated connections from your address",
        }
    }
}

#[derive(Debug, Default)]
struct Counts<K> {
    total: usize,
    unauthenticated: usize,
    unauthenticated_by_source: HashMap<K, usize>,
}

/// Admission control for one listener; `K` identifies a source (an IP, a uid).
#[derive(Debug)]
pub struct ConnLimiter<K: Hash + Eq + Clone> {
    limits: ConnectionLimits,
    counts: Mutex<Counts<K>>,
}

impl<K: Hash + Eq + Clone> ConnLimiter<K> {
    pub fn new(limits: ConnectionLimits) -> Arc<Self> {
        Arc::new(ConnLimiter {
            limits,
            counts: Mutex::new(Counts { total: 0, unauthenticated: 0, unauthenticated_by_source: HashMap::new() }),
        })
    }

    /// Admits a new connection from `source` as unauthenticated, or says which limit is full.
    pub fn admit(self: &Arc<Self>, source: K) -> Result<ConnPermit<K>, LimitHit> {
        let mut c = lock(&self.counts);
        if c.total >= self.limits.max_connections {
            return Err(LimitHit::Connections);
        }
        if c.unauthenticated >= self.limits.max_unauthenticated {
            return Err(LimitHit::Unauthenticated);
        }
        let from_source = c.unauthenticated_by_source.get(&source).copied().unwrap_or(0);
        if from_source >= self.limits.max_unauthenticated_per_source {
            return Err(LimitHit::UnauthenticatedPerSource);
        }
        c.total += 1;
        c.unauthenticated += 1;
        c.unauthenticated_by_source.insert(source.clone(), from_source + 1);
        Ok(ConnPermit { limiter: self.clone(), source, authenticated: false })
    }

    /// (connections, unauthenticated) now.
    pub fn counts(&self) -> (usize, usize) {
        let c = lock(&self.counts);
        (c.total, c.unauthenticated)
    }

    fn leave_unauthenticated(&self, c: &mut Counts<K>, source: &K) {
        c.unauthenticated = c.unauthenticated.saturating_sub(1);
        if let Some(n) = c.unauthenticated_by_source.get_mut(source) {
            *n -= 1;
            if *n == 0 {
                c.unauthenticated_by_source.remove(source);
            }
        }
    }
}

/// A connection's place under its listener's limits; released when dropped.
#[derive(Debug)]
pub struct ConnPermit<K: Hash + Eq + Clone> {
    limiter: Arc<ConnLimiter<K>>,
    source: K,
    authenticated: bool,
}

impl<K: Hash + Eq + Clone> ConnPermit<K> {
    /// The client proved its identity: it no longer counts against the handshake limits.
    pub fn authenticated(&mut self) {
        if !self.authenticated {
            self.authenticated = true;
            let mut c = lock(&self.limiter.counts);
            self.limiter.leave_unauthenticated(&mut c, &self.source);
        }
    }
}

impl<K: Hash + Eq + Clone> Drop for ConnPermit<K> {
    fn drop(&mut self) {
        let mut c = lock(&self.limiter.counts);
        c.total = c.total.saturating_sub(1);
        if !self.authenticated {
            self.limiter.leave_unauthenticated(&mut c, &self.source);
        }
    }
}

/// Password attempts allowed per source address within [`LOGIN_WINDOW`] (failed, or still being
/// checked).
pub const LOGIN_ATTEMPTS_PER_SOURCE: u32 = 10;
/// Failed password attempts allowed per user name within [`LOGIN_WINDOW`], from anywhere.
pub const LOGIN_ATTEMPTS_PER_USER: u32 = 5;
pub const LOGIN_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy)]
struct Window {
    start: Instant,
    count: u32,
}

impl Window {
    /// The count within the window that contains `now`.
    fn current(w: Option<&Window>, now: Instant) -> u32 {
        w.filter(|w| now.duration_since(w.start) < LOGIN_WINDOW).map_or(0, |w| w.count)
    }
}

/// Refused: too many attempts; `retry_after` is when the window frees up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Throttled {
    pub by_user: bool,
    pub retry_after: Duration,
}

/// Online password guessing throttle: fixed windows per source and per user. An attempt counts
/// against its source from the moment it starts (so a burst of parallel guesses is cut at the
/// limit, not after all of them were hashed), and against the user once it failed.
#[derive(Debug, Default)]
pub struct LoginThrottle {
    sources: Mutex<HashMap<IpAddr, Window>>,
    users: Mutex<HashMap<String, Window>>,
}

impl LoginThrottle {
    /// Starts an attempt, or refuses it.
    pub fn begin(&self, source: IpAddr, user: &str, now: Instant) -> Result<(), Throttled> {
        let retry =
            |w: Option<&Window>| w.map_or(LOGIN_WINDOW, |w| LOGIN_WINDOW.saturating_sub(now.duration_since(w.start)));
        let users = lock(&self.users);
        if Window::current(users.get(user), now) >= LOGIN_ATTEMPTS_PER_USER {
            return Err(Throttled { by_user: true, retry_after: retry(users.get(user)) });
        }
        drop(users);
        let mut sources = lock(&self.sources);
        let n = Window::current(sources.get(&source), now);
        if n >= LOGIN_ATTEMPTS_PER_SOURCE {
            return Err(Throttled { by_user: false, retry_after: retry(sources.get(&source)) });
        }
        let start = if n == 0 { now } else { sources.get(&source).map_or(now, |w| w.start) };
        sources.insert(source, Window { start, count: n + 1 });
        // Bound the table: forget sources whose windows are over.
        if sources.len() > 10_000 {
            sources.retain(|_, w| now.duration_since(w.start) < LOGIN_WINDOW);
        }
        Ok(())
    }

    /// Ends an attempt begun with [`LoginThrottle::begin`].
    pub fn finish(&self, source: IpAddr, user: &str, succeeded: bool, now: Instant) {
        if succeeded {
            // A correct password is not a guess: give the source its attempt back and clear
            // the user's failures.
            if let Some(w) = lock(&self.sources).get_mut(&source) {
                w.count = w.count.saturating_sub(1);
            }
            lock(&self.users).remove(user);
            return;
        }
        let mut users = lock(&self.users);
        let n = Window::current(users.get(user), now);
        let start = if n == 0 { now } else { users.get(user).map_or(now, |w| w.start) };
        users.insert(user.to_owned(), Window { start, count: n + 1 });
        if users.len() > 10_000 {
            users.retain(|_, w| now.duration_since(w.start) < LOGIN_WINDOW);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([127, 0, 0, last])
    }

    #[test]
    fn handshakes_are_limited_per_source_and_in_all() {
        let l = ConnLimiter::new(ConnectionLimits {
            max_connections: 5,
            max_unauthenticated: 3,
            max_unauthenticated_per_source: 2,
        });
        let a1 = l.admit(ip(1)).unwrap();
        let mut a2 = l.admit(ip(1)).unwrap();
        assert_eq!(l.admit(ip(1)).unwrap_err(), LimitHit::UnauthenticatedPerSource);
        let b1 = l.admit(ip(2)).unwrap();
        assert_eq!(l.admit(ip(3)).unwrap_err(), LimitHit::Unauthenticated);
        // An authenticated client frees its handshake slot but keeps its connection slot.
        a2.authenticated();
        a2.authenticated();
        assert_eq!(l.counts(), (3, 2));
        let a3 = l.admit(ip(1)).unwrap();
        assert_eq!(l.admit(ip(4)).unwrap_err(), LimitHit::Unauthenticated);
        drop(a1);
        let mut c = l.admit(ip(4)).unwrap();
        c.authenticated();
        let d = l.admit(ip(5)).unwrap();
        assert_eq!(l.counts(), (5, 3));
        assert_eq!(l.admit(ip(6)).unwrap_err(), LimitHit::Connections);
        drop((a2, a3, b1, c, d));
        assert_eq!(l.counts(), (0, 0));
        assert!(lock(&l.counts).unauthenticated_by_source.is_empty());
    }

    #[test]
    fn parallel_guesses_are_cut_at_the_source_limit() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        let admitted = (0..50).filter(|_| t.begin(ip(1), "alice", now).is_ok()).count();
        assert_eq!(admitted as u32, LOGIN_ATTEMPTS_PER_SOURCE);
        let e = t.begin(ip(1), "bob", now).unwrap_err();
        assert!(!e.by_user && e.retry_after <= LOGIN_WINDOW);
        // Another source is not affected; the window ends.
        assert!(t.begin(ip(2), "bob", now).is_ok());
        assert!(t.begin(ip(1), "bob", now + LOGIN_WINDOW).is_ok());
    }

    #[test]
    fn failures_per_user_are_counted_from_every_source() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for i in 0..LOGIN_ATTEMPTS_PER_USER {
            t.begin(ip(i as u8 + 1), "alice", now).unwrap();
            t.finish(ip(i as u8 + 1), "alice", false, now);
        }
        let e = t.begin(ip(99), "alice", now + Duration::from_secs(10)).unwrap_err();
        assert!(e.by_user);
        assert_eq!(e.retry_after, Duration::from_secs(50));
        assert!(t.begin(ip(99), "bob", now).is_ok());
    }

    #[test]
    fn success_returns_the_attempt_and_clears_the_user() {
        let t = LoginThrottle::default();
        let now = Instant::now();
        for _ in 0..LOGIN_ATTEMPTS_PER_SOURCE * 3 {
            t.begin(ip(1), "alice", now).unwrap();
            t.finish(ip(1), "alice", true, now);
        }
        for _ in 0..LOGIN_ATTEMPTS_PER_USER - 1 {
            t.begin(ip(1), "bob", now).unwrap();
            t.finish(ip(1), "bob", false, now);
        }
        t.begin(ip(1), "bob", now).unwrap();
        t.finish(ip(1), "bob", true, now);
        assert!(t.begin(ip(1), "bob", now).is_ok());
    }
}
