//! The verified-key cache: what a key check needs (secret hash, scopes,
//! revoked) per key id, so a call with a known key costs no database round
//! trip, while a revocation still holds on every replica within about a
//! second.
//!
//! How it stays right: a trigger on `api_keys` (migration V12) notifies
//! `verdict_keys_changed` with the key's id in the transaction that inserts,
//! revokes or deletes it, so every replica hears of a committed change
//! (`super::revocations`). While that listener is connected, entries live
//! [`TTL_LISTENING`] (a backstop only); while it is not, [`TTL_UNLISTENED`],
//! and every (re)connection empties the cache, because notifications may
//! have been missed. A lookup that raced a notification is used for its
//! call but not cached (an epoch counter tells).
//!
//! Cache misses read the row through a pool of their own (a few
//! connections, never the request pool) under a concurrency budget: when
//! the budget is spent, an id this replica has never seen valid is refused
//! at once (RESOURCE_EXHAUSTED) rather than queued, so well-formed tokens
//! with random ids cannot make legitimate calls wait. Unknown ids are
//! remembered in a bounded negative cache.
//!
//! Every key with a stream open has a `watch` channel: a revocation flips
//! it, which ends the key's open streams (see `super::stream`) and is what
//! streaming handlers read through [`Revocation`].

use super::ScopeSet;
use super::keys::{self, KeyId, SecretCheck};
use crate::call::Call;
use crate::db::{Db, PgConfig};
use crate::error::{Error, Reason, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, watch};

/// How long a cached key is trusted while the revocation listener is
/// connected (notifications keep it right; this is only a backstop).
pub const TTL_LISTENING: Duration = Duration::from_secs(60);
/// How long a cached key is trusted while the listener is not connected:
/// the bound on how long a revocation can go unnoticed then.
pub const TTL_UNLISTENED: Duration = Duration::from_secs(2);
/// Most unknown ids remembered; beyond it, expired ones are dropped, and
/// if none is expired the negative cache is emptied.
const NEGATIVE_CAPACITY: usize = 10_000;
/// Revocation channels are swept of unused ones past this many.
const SIGNAL_SWEEP_AT: usize = 1_024;
/// How long a lookup for a key this replica has seen valid may wait for
/// the budget (ids never seen valid do not wait at all).
const KNOWN_KEY_WAIT: Duration = Duration::from_secs(2);

/// Settings of the key checks.
#[derive(Debug, Clone)]
pub struct KeySettings {
    /// Connections of the lookup pool (`VERDICT_AUTH_LOOKUP_CONNECTIONS`).
    pub lookup_connections: usize,
    /// Streams end after this long (`VERDICT_MAX_STREAM_LIFETIME`).
    pub max_stream_lifetime: Duration,
    /// Failed lookups a peer may cause in a burst (`VERDICT_AUTH_FAILURE_BURST`).
    pub failure_burst: u32,
    /// Failed lookups a peer may cause per second, sustained
    /// (`VERDICT_AUTH_FAILURES_PER_SEC`).
    pub failures_per_sec: f64,
}

/// What a presented token turned out to be.
pub enum Verdict {
    /// Valid: the key's scopes and binding. A call that needs to hear
    /// of a later revocation (a stream) asks for its signal with
    /// [`KeyCache::subscribe`].
    Valid {
        scopes: ScopeSet,
        /// The project the key is bound to; `None`: every project.
        project: Option<uuid::Uuid>,
    },
    /// An unknown id or a wrong secret: callers get one answer for both.
    Invalid,
    /// The right secret of a revoked key.
    Revoked,
}

/// The revocation signal of the caller's key, in the request extensions of
/// every authenticated streaming call (`request.extensions().get::<Revocation>()`;
/// a unary call is judged once, when it is admitted).
/// A handler that commits per chunk of a long stream checks
/// [`Revocation::is_revoked`] before each commit, so nothing is committed
/// under a key revoked meanwhile. (The auth layer already ends the streams
/// of a revoked key; this closes the window between the revocation and the
/// next message the layer sees.)
#[derive(Debug, Clone)]
pub struct Revocation(watch::Receiver<bool>);

impl Revocation {
    /// A signal that never fires (authentication off).
    pub fn never() -> Self {
        Revocation(watch::channel(false).1)
    }

    /// Whether the key has been revoked (or deleted) since the call began.
    pub fn is_revoked(&self) -> bool {
        *self.0.borrow()
    }

    /// Resolves when the key is revoked; never, when it is not.
    pub async fn revoked(mut self) {
        if self.0.wait_for(|revoked| *revoked).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    pub(crate) fn receiver(&self) -> watch::Receiver<bool> {
        self.0.clone()
    }
}

/// The cache, shared by the auth layer and the revocation listener; cheap
/// to clone.
#[derive(Clone)]
pub struct KeyCache {
    inner: Arc<Inner>,
}

struct Inner {
    /// The lookup pool: cache misses never draw on the request pool.
    db: Db,
    /// Lookups running or waiting for a connection.
    budget: Semaphore,
    listening: AtomicBool,
    /// Bumped by every notification and flush; a lookup that saw it move
    /// does not cache its (possibly stale) row.
    epoch: AtomicU64,
    /// Keys with open streams must be re-read (a notification's re-read failed).
    recheck_due: AtomicBool,
    entries: Mutex<HashMap<KeyId, Entry>>,
    /// Ids that matched no row, with when that was read.
    unknown: Mutex<HashMap<KeyId, Instant>>,
    signals: Mutex<HashMap<KeyId, watch::Sender<bool>>>,
    /// One lookup at a time per key id: concurrent first calls of one key
    /// wait for the lookup under way and read its result from the cache,
    /// instead of each spending the budget (a client that opens with 100
    /// calls in flight is not refused). Entries live only while a lookup
    /// of their id is under way.
    in_flight: Mutex<HashMap<KeyId, Arc<tokio::sync::Mutex<()>>>>,
    lookups: AtomicU64,
    settings: KeySettings,
}

struct Entry {
    secret_hash: Vec<u8>,
    scopes: ScopeSet,
    project: Option<uuid::Uuid>,
    revoked: bool,
    /// When the row was read; `None` once a notification or a flush made
    /// it stale. Stale entries stay so the key counts as seen (its lookups
    /// may wait for the budget).
    fetched: Option<Instant>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Budget lookups: twice the pool, so a couple wait for a connection at most.
fn lookup_budget(connections: usize) -> usize {
    connections * 2
}

impl KeyCache {
    /// A cache whose misses read through a lookup pool of its own on `pg`.
    pub fn new(
        pg: PgConfig,
        settings: KeySettings,
        statement_timeout: Duration,
    ) -> anyhow::Result<Self> {
        let connections = settings.lookup_connections.max(1);
        // The budget bounds the waiters; the pool's own shedding never
        // has to.
        let db = Db::with_limits(
            pg,
            connections,
            lookup_budget(connections),
            KNOWN_KEY_WAIT,
            statement_timeout,
        )?;
        Ok(KeyCache {
            inner: Arc::new(Inner {
                db,
                budget: Semaphore::new(lookup_budget(connections)),
                listening: AtomicBool::new(false),
                epoch: AtomicU64::new(0),
                recheck_due: AtomicBool::new(false),
                entries: Mutex::new(HashMap::new()),
                unknown: Mutex::new(HashMap::new()),
                signals: Mutex::new(HashMap::new()),
                in_flight: Mutex::new(HashMap::new()),
                lookups: AtomicU64::new(0),
                settings,
            }),
        })
    }

    pub fn settings(&self) -> &KeySettings {
        &self.inner.settings
    }

    /// Opens the lookup pool once migrations are done.
    pub fn set_ready(&self) {
        self.inner.db.set_ready();
    }

    /// Closes the lookup pool (gateway shutdown).
    pub fn close(&self) {
        self.inner.db.close();
    }

    /// Rows of `api_keys` read so far (cache misses and re-checks).
    pub fn lookups(&self) -> u64 {
        self.inner.lookups.load(Ordering::Relaxed)
    }

    /// Whether the revocation listener is connected.
    pub fn is_listening(&self) -> bool {
        self.inner.listening.load(Ordering::Acquire)
    }

    fn ttl(&self) -> Duration {
        if self.is_listening() {
            TTL_LISTENING
        } else {
            TTL_UNLISTENED
        }
    }

    /// The verdict from the cache alone; `None` when only a lookup can tell.
    pub fn cached(&self, id: KeyId, check: &SecretCheck) -> Option<Verdict> {
        let ttl = self.ttl();
        let known = {
            let entries = lock(&self.inner.entries);
            entries
                .get(&id)
                .filter(|e| e.fetched.is_some_and(|at| at.elapsed() < ttl))
                .map(|e| {
                    (
                        check.matches(&e.secret_hash),
                        e.revoked,
                        e.scopes,
                        e.project,
                    )
                })
        };
        if let Some((matches, revoked, scopes, project)) = known {
            return Some(judge(matches, revoked, scopes, project));
        }
        let unknown = lock(&self.inner.unknown);
        unknown
            .get(&id)
            .is_some_and(|at| at.elapsed() < ttl)
            .then_some(Verdict::Invalid)
    }

    /// Reads the key's row through the lookup pool, caches it and judges;
    /// joins a lookup of the same id already under way. `admit` is asked
    /// only when this call itself is to read the row (the per-peer failure
    /// budget): a call that waited for another's lookup and finds its
    /// result cached spends nothing. `Err(refusal)` when `admit` refused.
    pub async fn fetch<R>(
        &self,
        id: KeyId,
        check: &SecretCheck,
        admit: impl FnOnce() -> std::result::Result<(), R>,
    ) -> std::result::Result<Result<Verdict>, R> {
        // Declared first, dropped last: after `slot` below is gone.
        let _forget = InFlight { cache: self, id };
        let slot = lock(&self.inner.in_flight).entry(id).or_default().clone();
        let _turn = match slot.try_lock() {
            Ok(turn) => turn,
            Err(_) => {
                let Ok(turn) = tokio::time::timeout(KNOWN_KEY_WAIT, slot.lock()).await else {
                    return Ok(Err(busy()));
                };
                // The lookup we waited for has (most likely) filled the cache.
                if let Some(verdict) = self.cached(id, check) {
                    return Ok(Ok(verdict));
                }
                turn
            }
        };
        admit()?;
        Ok(self.look_up(id, check).await)
    }

    async fn look_up(&self, id: KeyId, check: &SecretCheck) -> Result<Verdict> {
        let seen_before = lock(&self.inner.entries).contains_key(&id);
        let permit = match self.inner.budget.try_acquire() {
            Ok(permit) => permit,
            Err(_) if seen_before => {
                tokio::time::timeout(KNOWN_KEY_WAIT, self.inner.budget.acquire())
                    .await
                    .map_err(|_| busy())?
                    .map_err(|_| busy())?
            }
            Err(_) => return Err(busy()),
        };
        let epoch = self.inner.epoch.load(Ordering::Acquire);
        let state = {
            let mut conn = self.inner.db.conn(&Call::default()).await?;
            self.inner.lookups.fetch_add(1, Ordering::Relaxed);
            keys::lookup(conn.client().await?, id).await?
        };
        drop(permit);
        let cacheable = self.inner.epoch.load(Ordering::Acquire) == epoch;
        let Some(state) = state else {
            if let Some(e) = lock(&self.inner.entries).get_mut(&id) {
                e.fetched = None;
            }
            if cacheable {
                self.remember_unknown(id);
            }
            return Ok(Verdict::Invalid);
        };
        if state.revoked {
            self.fire(id);
        }
        let matches = check.matches(&state.secret_hash);
        let (revoked, scopes, project) = (state.revoked, state.scopes, state.project);
        if cacheable {
            lock(&self.inner.entries).insert(
                id,
                Entry {
                    secret_hash: state.secret_hash,
                    scopes,
                    project,
                    revoked,
                    fetched: Some(Instant::now()),
                },
            );
        }
        Ok(judge(matches, revoked, scopes, project))
    }

    fn remember_unknown(&self, id: KeyId) {
        let ttl = self.ttl();
        let mut unknown = lock(&self.inner.unknown);
        if unknown.len() >= NEGATIVE_CAPACITY {
            unknown.retain(|_, at| at.elapsed() < ttl);
            if unknown.len() >= NEGATIVE_CAPACITY {
                unknown.clear();
            }
        }
        unknown.insert(id, Instant::now());
    }

    /// The revocation signal of key `id`. Asked for after the key was
    /// judged: a revocation in between has fired the signal, and a fired
    /// signal is kept, so the subscriber still sees it.
    pub fn subscribe(&self, id: KeyId) -> Revocation {
        let mut signals = lock(&self.inner.signals);
        if signals.len() >= SIGNAL_SWEEP_AT && !signals.contains_key(&id) {
            // Keep fired signals: a call judged just before the revocation
            // subscribes after it and must still see it.
            signals.retain(|_, tx| tx.receiver_count() > 0 || *tx.borrow());
        }
        Revocation(
            signals
                .entry(id)
                .or_insert_with(|| watch::channel(false).0)
                .subscribe(),
        )
    }

    /// Tells every call and stream of `id` that the key is revoked.
    fn fire(&self, id: KeyId) {
        let mut signals = lock(&self.inner.signals);
        let tx = signals.entry(id).or_insert_with(|| watch::channel(false).0);
        if !*tx.borrow() {
            tracing::info!(key_id = %id, "API key revoked: ending its open streams");
            tx.send_replace(true);
        }
    }

    /// Keys with calls or streams open that are not known to be revoked.
    fn live_keys(&self) -> Vec<KeyId> {
        lock(&self.inner.signals)
            .iter()
            .filter(|(_, tx)| tx.receiver_count() > 0 && !*tx.borrow())
            .map(|(id, _)| *id)
            .collect()
    }

    pub(crate) fn set_listening(&self, on: bool) {
        self.inner.listening.store(on, Ordering::Release);
    }

    /// Forgets everything cached (the listener (re)connected: changes may
    /// have been missed). Entries turn stale rather than vanish.
    pub(crate) fn flush(&self) {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        for entry in lock(&self.inner.entries).values_mut() {
            entry.fetched = None;
        }
        lock(&self.inner.unknown).clear();
    }

    /// A notification: forget `id`; true when it has open calls to re-check.
    pub(crate) fn changed(&self, id: KeyId) -> bool {
        self.inner.epoch.fetch_add(1, Ordering::AcqRel);
        if let Some(e) = lock(&self.inner.entries).get_mut(&id) {
            e.fetched = None;
        }
        lock(&self.inner.unknown).remove(&id);
        lock(&self.inner.signals)
            .get(&id)
            .is_some_and(|tx| tx.receiver_count() > 0 && !*tx.borrow())
    }

    pub(crate) fn mark_recheck_due(&self) {
        self.inner.recheck_due.store(true, Ordering::Release);
    }

    pub(crate) fn take_recheck_due(&self) -> bool {
        self.inner.recheck_due.swap(false, Ordering::AcqRel)
    }

    /// Re-reads `ids` (all keys with open calls when `None`) and fires the
    /// signal of each that is revoked or gone. One statement, through the
    /// lookup pool (waiting for a connection: this is not caller-driven).
    pub(crate) async fn recheck(&self, ids: Option<Vec<KeyId>>) -> Result<()> {
        let ids = ids.unwrap_or_else(|| self.live_keys());
        if ids.is_empty() {
            return Ok(());
        }
        let unusable = {
            let mut conn = self.inner.db.conn(&Call::default()).await?;
            self.inner.lookups.fetch_add(1, Ordering::Relaxed);
            keys::unusable_among(conn.client().await?, &ids).await?
        };
        for id in unusable {
            if let Some(e) = lock(&self.inner.entries).get_mut(&id) {
                e.fetched = None;
            }
            self.fire(id);
        }
        Ok(())
    }
}

/// What a presented secret makes of a key's row.
fn judge(matches: bool, revoked: bool, scopes: ScopeSet, project: Option<uuid::Uuid>) -> Verdict {
    // The secret first: only its holder learns that a key was revoked.
    match (matches, revoked) {
        (false, _) => Verdict::Invalid,
        (true, true) => Verdict::Revoked,
        (true, false) => Verdict::Valid { scopes, project },
    }
}

/// Drops a key id's in-flight slot once no call holds it any more.
struct InFlight<'a> {
    cache: &'a KeyCache,
    id: KeyId,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut slots = lock(&self.cache.inner.in_flight);
        // Held by the map alone: no call looks this id up or waits for it.
        if slots
            .get(&self.id)
            .is_some_and(|s| Arc::strong_count(s) == 1)
        {
            slots.remove(&self.id);
        }
    }
}

fn busy() -> Error {
    Error::ResourceExhausted(
        Reason::RateLimited,
        "too many API key checks are in progress; retry shortly".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cache() -> KeyCache {
        // The pool is lazy: these tests never connect.
        let pg = PgConfig::from(
            "host=127.0.0.1 port=1 user=nobody"
                .parse::<tokio_postgres::Config>()
                .unwrap(),
        );
        KeyCache::new(
            pg,
            KeySettings {
                lookup_connections: 2,
                max_stream_lifetime: Duration::from_secs(3600),
                failure_burst: 20,
                failures_per_sec: 2.0,
            },
            Duration::from_secs(5),
        )
        .unwrap()
    }

    fn id(n: u64) -> KeyId {
        KeyId::parse(&format!("{n:016x}")).unwrap()
    }

    #[test]
    fn the_negative_cache_stays_bounded() {
        let cache = cache();
        for n in 0..(NEGATIVE_CAPACITY as u64 + 500) {
            cache.remember_unknown(id(n));
        }
        assert!(lock(&cache.inner.unknown).len() <= NEGATIVE_CAPACITY);
    }

    #[tokio::test]
    async fn a_revocation_reaches_calls_judged_just_before_it() {
        let cache = cache();
        let key = id(7);
        let early = cache.subscribe(key);
        cache.fire(key);
        // Subscribed after the signal fired: still sees it.
        let late = cache.subscribe(key);
        assert!(early.is_revoked() && late.is_revoked());
        tokio::time::timeout(Duration::from_secs(1), late.revoked())
            .await
            .expect("resolves at once");
        assert!(!Revocation::never().is_revoked());
    }
}
