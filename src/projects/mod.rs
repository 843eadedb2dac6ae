//! Projects: every record belongs to exactly one, and every call works in
//! exactly one.
//!
//! **How a call names its project** (one rule for every RPC): the
//! `x-verdict-project` metadata header carries the project's slug. Without
//! it, a call works in its key's project when the key is bound to one, else
//! in the project `default`. A key bound to one project that names another
//! gets PERMISSION_DENIED (reason `PROJECT_NOT_ALLOWED`) whether or not the
//! other exists; an unknown slug is NOT_FOUND for a key bound to no project.
//! The auth layer resolves the project before any handler runs and puts it
//! in the call's [`crate::auth::Caller`]; handlers read it with
//! [`crate::call::Call::project`] and pass it to every statement, so an id
//! from another project is simply not found.
//!
//! The slug → id map is cached for [`TTL`]: slugs never change, and a
//! project deleted through another replica is forgotten here within that
//! time (meanwhile its calls read nothing and their writes fail NOT_FOUND,
//! because its rows and its foreign-key target are gone).

mod service;
pub mod sql;

pub use service::ProjectApi;

use crate::call::Call;
use crate::db::Db;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// The metadata header naming a call's project.
pub const HEADER: &str = "x-verdict-project";
/// The project of calls that name none (with a key bound to none), and of
/// everything stored before projects existed.
pub const DEFAULT_SLUG: &str = "default";
/// How long a resolved slug is trusted.
pub const TTL: Duration = Duration::from_secs(5);
/// Most slugs remembered at once (a bound on what callers can make it hold).
const MAX_CACHED: usize = 10_000;

/// Whether `slug` is a well-formed project slug: 1–63 lowercase letters,
/// digits and inner hyphens (a DNS label).
pub fn valid_slug(slug: &str) -> bool {
    let bytes = slug.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[0] != b'-'
        && bytes[bytes.len() - 1] != b'-'
}

/// The one answer a key bound to another project gets about `name` (a
/// slug or id), whether or not such a project exists.
pub fn not_allowed(name: &str) -> Error {
    Error::ProjectNotAllowed(format!(
        "this API key is bound to another project than {name:?}"
    ))
}

/// The slug a raw `x-verdict-project` value names.
fn slug_of(raw: &[u8]) -> Result<&str> {
    std::str::from_utf8(raw)
        .ok()
        .filter(|s| valid_slug(s))
        .ok_or_else(|| {
            Error::invalid(
                HEADER,
                "must be a project slug: 1 to 63 lowercase letters, digits and inner hyphens",
            )
        })
}

/// The project a call naming `slug` works in, given what the slug was found
/// to be (`found`) and its key's binding.
fn judge(slug: &str, found: Option<Uuid>, bound: Option<Uuid>) -> Result<Uuid> {
    match (found, bound) {
        (Some(id), None) => Ok(id),
        (Some(id), Some(b)) if id == b => Ok(id),
        // Bound keys learn nothing about other projects, not even
        // whether they exist.
        (_, Some(_)) => Err(not_allowed(slug)),
        (None, None) => Err(Error::NotFound(format!("no project has slug {slug:?}"))),
    }
}

/// The slug → id map of projects, shared by every call of a gateway.
#[derive(Clone)]
pub struct Directory {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    default: OnceLock<Uuid>,
    cache: Mutex<HashMap<Box<str>, (Uuid, Instant)>>,
}

impl Directory {
    pub fn new(db: Db) -> Self {
        Directory {
            inner: Arc::new(Inner {
                db,
                default: OnceLock::new(),
                cache: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The project a call works in, from its `x-verdict-project` value (raw
    /// bytes, `None` when absent) and its key's binding (`None`: every
    /// project, or authentication off).
    pub async fn resolve(&self, header: Option<&[u8]>, bound: Option<Uuid>) -> Result<Uuid> {
        match (header, bound) {
            (None, Some(id)) => Ok(id),
            (None, None) => self.default_id().await,
            (Some(raw), _) => {
                let slug = slug_of(raw)?;
                judge(slug, self.id_of(slug).await?, bound)
            }
        }
    }

    /// What [`Self::resolve`] answers when it needs no database read (the
    /// slug is cached, or there is none to look up); `None` when it does.
    pub fn resolve_known(
        &self,
        header: Option<&[u8]>,
        bound: Option<Uuid>,
    ) -> Option<Result<Uuid>> {
        let Some(raw) = header else {
            return match bound {
                Some(id) => Some(Ok(id)),
                None => self.inner.default.get().map(|id| Ok(*id)),
            };
        };
        let slug = match slug_of(raw) {
            Ok(slug) => slug,
            Err(e) => return Some(Err(e)),
        };
        let found = self.cached(slug)?;
        Some(judge(slug, Some(found), bound))
    }

    /// The id of the project `default` (read once; it cannot be deleted).
    pub async fn default_id(&self) -> Result<Uuid> {
        if let Some(id) = self.inner.default.get() {
            return Ok(*id);
        }
        let id = self.id_of(DEFAULT_SLUG).await?.ok_or_else(|| {
            Error::Internal("the project `default` is missing from the database".into())
        })?;
        Ok(*self.inner.default.get_or_init(|| id))
    }

    /// Learns the id of the project `default` at start-up (on the
    /// migrating connection), so calls that name no project never read it.
    pub async fn load_default(
        &self,
        client: &tokio_postgres::Client,
    ) -> std::result::Result<(), tokio_postgres::Error> {
        let row = client
            .query_one("SELECT id FROM projects WHERE slug = 'default'", &[])
            .await?;
        let _ = self.inner.default.set(row.try_get(0)?);
        Ok(())
    }

    /// The id of `slug`, from the cache or the database.
    pub async fn id_of(&self, slug: &str) -> Result<Option<Uuid>> {
        if let Some(id) = self.cached(slug) {
            return Ok(Some(id));
        }
        let mut conn = self.inner.db.conn(&Call::default()).await?;
        let found = sql::id_of(conn.client().await?, slug).await?;
        let mut cache = self.lock();
        match found {
            Some(id) => {
                if cache.len() >= MAX_CACHED {
                    cache.clear();
                }
                cache.insert(slug.into(), (id, Instant::now()));
            }
            None => {
                cache.remove(slug);
            }
        }
        Ok(found)
    }

    /// The id of `slug` while its cached entry is fresh.
    fn cached(&self, slug: &str) -> Option<Uuid> {
        self.lock()
            .get(slug)
            .filter(|(_, at)| at.elapsed() < TTL)
            .map(|(id, _)| *id)
    }

    /// Forgets `slug` (after this gateway deleted it).
    pub fn forget(&self, slug: &str) {
        self.lock().remove(slug);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Box<str>, (Uuid, Instant)>> {
        self.inner.cache.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::valid_slug;

    #[test]
    fn slugs_are_dns_labels() {
        for good in ["default", "a", "team-1", "0", &"a".repeat(63)] {
            assert!(valid_slug(good), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a_b",
            "a b",
            "é",
            &"a".repeat(64),
            "a.b",
        ] {
            assert!(!valid_slug(bad), "{bad}");
        }
    }
}
