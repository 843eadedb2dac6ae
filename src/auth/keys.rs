//! API keys: the token format, generation, hashing and the SQL that stores,
//! finds, lists and revokes them.
//!
//! A token reads `vk_<id>_<secret>`: `id` is 16 lowercase hex characters
//! (public; it finds the row), `secret` is 43 base64url characters (256
//! random bits). The database holds only SHA-256 of the secret, compared in
//! constant time.

use super::{Scope, ScopeSet};
use crate::db::Stmt;
use crate::error::{Error, Reason, Result};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

const PREFIX: &str = "vk_";
const ID_LEN: usize = 16;
const SECRET_BYTES: usize = 32;
/// base64url without padding of 32 bytes.
const SECRET_LEN: usize = 43;
/// `vk_` + id + `_` + secret.
pub const TOKEN_LEN: usize = PREFIX.len() + ID_LEN + 1 + SECRET_LEN;

/// The public id of a key: 16 lowercase hex characters, kept inline so a
/// call's context stays `Copy`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId([u8; ID_LEN]);

impl KeyId {
    /// Parses 16 lowercase hex characters.
    pub fn parse(s: &str) -> Option<Self> {
        Self::from_bytes(s.as_bytes())
    }

    fn from_bytes(s: &[u8]) -> Option<Self> {
        let bytes: [u8; ID_LEN] = s.try_into().ok()?;
        bytes
            .iter()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
            .then_some(KeyId(bytes))
    }

    pub fn as_str(&self) -> &str {
        // Only ASCII hex digits get in (parse and generate).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Debug for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyId({})", self.as_str())
    }
}

impl std::fmt::Display for KeyId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A well-formed token, split; says nothing yet about whether it is valid.
pub struct Presented<'a> {
    pub id: KeyId,
    /// 43 base64url characters.
    secret: &'a [u8],
}

/// Splits an `authorization` value (`Bearer vk_…`). Anything that is not
/// exactly a token of our format is `None`: it is refused without asking
/// the database.
pub fn parse_authorization(value: &[u8]) -> Option<Presented<'_>> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, token) = (&value[..space], &value[space + 1..]);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    parse_bytes(token.trim_ascii())
}

/// Splits a bare token.
pub fn parse_token(token: &str) -> Option<Presented<'_>> {
    parse_bytes(token.as_bytes())
}

/// Splits a token given as bytes: only ASCII of the exact format passes.
fn parse_bytes(token: &[u8]) -> Option<Presented<'_>> {
    let rest = token.strip_prefix(PREFIX.as_bytes())?;
    if token.len() != TOKEN_LEN {
        return None;
    }
    let (id, secret) = rest.split_at(ID_LEN);
    let secret = secret.strip_prefix(b"_")?;
    let id = KeyId::from_bytes(id)?;
    let base64url = |b: &u8| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_';
    if secret.len() != SECRET_LEN || !secret.iter().all(base64url) {
        return None;
    }
    Some(Presented { id, secret })
}

impl Presented<'_> {
    /// Whether the secret hashes to `stored`, in constant time.
    pub fn matches(&self, stored: &[u8]) -> bool {
        self.checker().matches(stored)
    }

    /// The secret's hash, owned, to check once the stored hash is read.
    pub fn checker(&self) -> SecretCheck {
        SecretCheck(hash_secret(self.secret))
    }
}

/// The hash of a presented secret.
pub struct SecretCheck([u8; 32]);

impl SecretCheck {
    /// Whether it equals `stored`, in constant time.
    pub fn matches(&self, stored: &[u8]) -> bool {
        self.0.ct_eq(stored).into()
    }
}

fn hash_secret(secret: &[u8]) -> [u8; 32] {
    Sha256::digest(secret).into()
}

/// Random bytes from the operating system's CSPRNG.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes)
        .map_err(|e| Error::Internal(format!("the system's random source failed: {e}")))?;
    Ok(bytes)
}

/// A fresh key: its id, the full token (shown once) and the hash to store.
pub struct NewKey {
    pub id: KeyId,
    pub token: String,
    pub secret_hash: Vec<u8>,
}

/// Generates a key from the system's CSPRNG.
pub fn generate() -> Result<NewKey> {
    let id_bytes: [u8; ID_LEN / 2] = random_bytes()?;
    let id: String = id_bytes.iter().map(|b| format!("{b:02x}")).collect();
    let id = KeyId::parse(&id).ok_or_else(|| Error::Internal("generated a bad key id".into()))?;
    let secret = URL_SAFE_NO_PAD.encode(random_bytes::<SECRET_BYTES>()?);
    Ok(NewKey {
        id,
        secret_hash: hash_secret(secret.as_bytes()).to_vec(),
        token: format!("{PREFIX}{id}_{secret}"),
    })
}

/// A stored key as `verdict keys list` shows it (never the secret).
#[derive(Debug, Clone)]
pub struct KeyInfo {
    pub id: String,
    pub name: String,
    pub scopes: ScopeSet,
    /// The slug of the project the key is bound to; `None`: every project.
    pub project: Option<String>,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// What a per-call lookup needs.
pub struct KeyState {
    pub secret_hash: Vec<u8>,
    pub scopes: ScopeSet,
    /// The project the key is bound to; `None`: every project.
    pub project: Option<uuid::Uuid>,
    pub revoked: bool,
}

const INSERT: Stmt = Stmt::new(
    "INSERT",
    "api_keys",
    "INSERT INTO api_keys (id, name, secret_hash, scopes, project_id) VALUES ($1, $2, $3, $4, $5)",
);

const LOOKUP: Stmt = Stmt::new(
    "SELECT",
    "api_keys",
    "SELECT secret_hash, scopes, revoked_at IS NOT NULL, project_id FROM api_keys WHERE id = $1",
);

const REVOKED_AMONG: Stmt = Stmt::new(
    "SELECT",
    "api_keys",
    "SELECT id, revoked_at IS NOT NULL FROM api_keys WHERE id = ANY($1)",
);

const LIST: Stmt = Stmt::new(
    "SELECT",
    "api_keys",
    "SELECT k.id, k.name, k.scopes, k.created_at, k.revoked_at, p.slug \
     FROM api_keys k LEFT JOIN projects p ON p.id = k.project_id \
     ORDER BY k.created_at, k.id",
);

const REVOKE: Stmt = Stmt::new(
    "UPDATE",
    "api_keys",
    "UPDATE api_keys SET revoked_at = now() WHERE id = $1 AND revoked_at IS NULL",
);

const EXISTS: Stmt = Stmt::new(
    "SELECT",
    "api_keys",
    "SELECT revoked_at IS NOT NULL FROM api_keys WHERE id = $1",
);

fn scope_names(scopes: ScopeSet) -> Vec<&'static str> {
    Scope::ALL
        .iter()
        .filter(|s| scopes.contains(**s))
        .map(|s| s.as_str())
        .collect()
}

fn scope_set(names: &[String]) -> Result<ScopeSet> {
    names.iter().try_fold(ScopeSet::EMPTY, |set, n| {
        Scope::parse(n)
            .map(|s| set.with(s))
            .ok_or_else(|| Error::Internal(format!("unknown scope {n:?} in api_keys")))
    })
}

/// Stores a new key.
pub async fn insert(
    c: &impl GenericClient,
    key: &NewKey,
    name: &str,
    scopes: ScopeSet,
    project: Option<uuid::Uuid>,
) -> Result<()> {
    INSERT
        .execute(
            c,
            &[
                &key.id.as_str(),
                &name,
                &key.secret_hash,
                &scope_names(scopes),
                &project,
            ],
        )
        .await?;
    Ok(())
}

/// The state of one key, read when the verified-key cache misses.
pub async fn lookup(c: &impl GenericClient, id: KeyId) -> Result<Option<KeyState>> {
    let Some(row) = LOOKUP.query_opt(c, &[&id.as_str()]).await? else {
        return Ok(None);
    };
    Ok(Some(KeyState {
        secret_hash: row.try_get(0)?,
        scopes: scope_set(&row.try_get::<_, Vec<String>>(1)?)?,
        revoked: row.try_get(2)?,
        project: row.try_get(3)?,
    }))
}

/// Which of `ids` are no longer usable: revoked, or gone from the table.
/// One statement for every key with open streams (the revocation backstop).
pub async fn unusable_among(c: &impl GenericClient, ids: &[KeyId]) -> Result<Vec<KeyId>> {
    let names: Vec<&str> = ids.iter().map(KeyId::as_str).collect();
    let rows = REVOKED_AMONG.query(c, &[&names]).await?;
    let mut usable = std::collections::HashSet::new();
    for row in rows {
        let id: String = row.try_get(0)?;
        let revoked: bool = row.try_get(1)?;
        if !revoked && let Some(id) = KeyId::parse(&id) {
            usable.insert(id);
        }
    }
    Ok(ids
        .iter()
        .copied()
        .filter(|id| !usable.contains(id))
        .collect())
}

/// Every key, oldest first.
pub async fn list(c: &impl GenericClient) -> Result<Vec<KeyInfo>> {
    LIST.query(c, &[])
        .await?
        .iter()
        .map(|row| {
            Ok(KeyInfo {
                id: row.try_get(0)?,
                name: row.try_get(1)?,
                scopes: scope_set(&row.try_get::<_, Vec<String>>(2)?)?,
                created_at: row.try_get(3)?,
                revoked_at: row.try_get(4)?,
                project: row.try_get(5)?,
            })
        })
        .collect()
}

/// Revokes a key; NOT_FOUND when there is none, FAILED_PRECONDITION when it
/// was already revoked.
pub async fn revoke(c: &impl GenericClient, id: &str) -> Result<()> {
    if REVOKE.execute(c, &[&id]).await? == 1 {
        return Ok(());
    }
    match EXISTS.query_opt(c, &[&id]).await? {
        Some(_) => Err(Error::FailedPrecondition(
            Reason::KeyAlreadyRevoked,
            format!("key {id} is already revoked"),
        )),
        None => Err(Error::NotFound(format!("no key has id {id:?}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_token_parses_and_matches_only_its_own_hash() {
        let key = generate().unwrap();
        assert_eq!(key.token.len(), TOKEN_LEN);
        let header = format!("Bearer {}", key.token);
        let presented = parse_authorization(header.as_bytes()).unwrap();
        assert_eq!(presented.id, key.id);
        assert!(presented.matches(&key.secret_hash));
        let other = generate().unwrap();
        assert!(!presented.matches(&other.secret_hash));
    }

    #[test]
    fn malformed_authorization_values_are_refused_without_a_lookup() {
        let key = generate().unwrap();
        let good = format!("Bearer {}", key.token);
        let mut bad = vec![
            String::new(),
            key.token.clone(),
            format!("Basic {}", key.token),
            format!("Bearer {}x", key.token),
            format!("Bearer {}", &key.token[..key.token.len() - 1]),
            good.replace("vk_", "vx_"),
            good.to_uppercase(),
            format!("Bearer vk_{}_{}", "g".repeat(16), "a".repeat(43)),
            format!("Bearer vk_{}_{}", "a".repeat(16), "!".repeat(43)),
            format!("Bearer vk_{}-{}", "a".repeat(16), "a".repeat(43)),
        ];
        bad.push("Bearer ".to_string() + &"é".repeat(31));
        for value in &bad {
            assert!(parse_authorization(value.as_bytes()).is_none(), "{value}");
        }
        assert!(parse_authorization(&[0xff, 0xfe, b' ', b'v']).is_none());
        assert!(parse_authorization(b"bearer ").is_none());
        assert!(parse_authorization(format!("bearer {}", key.token).as_bytes()).is_some());
        // Surrounding ASCII whitespace is allowed; any byte outside the
        // token's alphabet is not, whatever its encoding.
        assert!(parse_authorization(format!("Bearer  {} \t", key.token).as_bytes()).is_some());
        let mut raw = good.clone().into_bytes();
        *raw.last_mut().unwrap() = 0xff;
        assert!(parse_authorization(&raw).is_none());
        assert!(parse_authorization(format!("{good}\u{a0}").as_bytes()).is_none());
        assert!(parse_authorization(format!("Bearer\u{a0}{}", key.token).as_bytes()).is_none());
    }
}
