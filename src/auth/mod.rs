//! Authentication and authorisation: bearer API keys with scopes, checked
//! by a tower layer in front of every service (health and reflection stay
//! open), and the rule that decides whether authentication is on.

pub mod cache;
pub mod keys;
mod layer;
mod limiter;
pub mod revocations;
pub mod scopes;
mod stream;

pub use cache::{KeyCache, KeySettings, Revocation};
pub use keys::KeyId;
pub use layer::AuthLayer;

use std::net::SocketAddr;

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Get/List/Watch/Query/Summarize/Statistics/Export.
    Read,
    /// Record/Create/Update/Resolve/Ingest/Delete/Append.
    Write,
    /// AdminService, Cleanup, ComputeRollups, key management.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::Read, Scope::Write, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Scope> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// The scopes of a key. They are independent: `admin` does not imply
/// `read` or `write` (a key gets exactly what it was created with).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ScopeSet(u8);

impl ScopeSet {
    pub const EMPTY: ScopeSet = ScopeSet(0);

    pub fn with(self, scope: Scope) -> ScopeSet {
        ScopeSet(self.0 | scope.bit())
    }

    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// Parses `read,write,admin` (any non-empty subset, any order).
    pub fn parse_list(list: &str) -> Result<ScopeSet, String> {
        let mut set = ScopeSet::EMPTY;
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            let scope = Scope::parse(name).ok_or_else(|| {
                format!("unknown scope {name:?}; scopes are read, write and admin")
            })?;
            set = set.with(scope);
        }
        if set == ScopeSet::EMPTY {
            return Err("give at least one scope: read, write or admin".into());
        }
        Ok(set)
    }

    /// `read,write` style.
    pub fn to_list(self) -> String {
        Scope::ALL
            .iter()
            .filter(|s| self.contains(**s))
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// Who is calling which RPC; set by the auth layer in the request's
/// extensions, read by handlers through [`crate::call::Call`].
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    /// The caller's key; `None` when authentication is off.
    pub key_id: Option<KeyId>,
    /// The full gRPC path, as declared in the scope table.
    pub rpc: &'static str,
    /// The project the call works in (see [`crate::projects`]); `None`
    /// outside a call (command-line operations name theirs themselves).
    pub project: Option<uuid::Uuid>,
    /// The project the caller's key is bound to; `None`: every project (or
    /// authentication off).
    pub bound: Option<uuid::Uuid>,
}

/// Whether calls need a key, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// Every call but health and reflection needs a valid key.
    Required,
    /// Off because the gateway listens on loopback only (developer default).
    OffOnLoopback,
    /// Off because `--insecure-no-auth` said so.
    OffByFlag,
}

impl AuthMode {
    /// The secure default: on, unless the listen address is loopback (and
    /// `--require-auth` is not given) or `--insecure-no-auth` is given.
    pub fn decide(listen: SocketAddr, require: bool, insecure: bool) -> anyhow::Result<AuthMode> {
        match (require, insecure) {
            (true, true) => anyhow::bail!(
                "--require-auth and --insecure-no-auth contradict each other; give one"
            ),
            (true, false) => Ok(AuthMode::Required),
            (false, true) => Ok(AuthMode::OffByFlag),
            (false, false) if listen.ip().is_loopback() => Ok(AuthMode::OffOnLoopback),
            (false, false) => Ok(AuthMode::Required),
        }
    }

    pub fn is_required(self) -> bool {
        self == AuthMode::Required
    }

    /// Says at start, at a level matching the risk, what the mode is.
    pub fn log(self, listen: SocketAddr) {
        match self {
            AuthMode::Required => tracing::info!(%listen, "authentication required (API keys)"),
            AuthMode::OffOnLoopback => tracing::warn!(
                %listen,
                "authentication is OFF because the gateway listens on loopback only; \
                 give --require-auth to turn it on"
            ),
            AuthMode::OffByFlag => tracing::error!(
                %listen,
                "!!! AUTHENTICATION IS DISABLED by --insecure-no-auth / VERDICT_INSECURE_NO_AUTH: \
                 ANYONE WHO CAN REACH {listen} CAN READ, WRITE AND DELETE ALL DATA !!!"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn auth_is_on_for_any_address_but_loopback() {
        for a in [
            "0.0.0.0:50051",
            "[::]:50051",
            "10.1.2.3:50051",
            "192.168.0.1:1",
        ] {
            assert_eq!(
                AuthMode::decide(addr(a), false, false).unwrap(),
                AuthMode::Required,
                "{a}"
            );
        }
        for a in ["127.0.0.1:50051", "[::1]:50051", "127.8.9.10:0"] {
            assert_eq!(
                AuthMode::decide(addr(a), false, false).unwrap(),
                AuthMode::OffOnLoopback,
                "{a}"
            );
        }
    }

    #[test]
    fn the_flags_force_auth_on_or_off_and_contradict_each_other() {
        let any = addr("0.0.0.0:1");
        let lo = addr("127.0.0.1:1");
        assert_eq!(
            AuthMode::decide(lo, true, false).unwrap(),
            AuthMode::Required
        );
        assert_eq!(
            AuthMode::decide(any, false, true).unwrap(),
            AuthMode::OffByFlag
        );
        assert!(AuthMode::decide(any, true, true).is_err());
    }

    #[test]
    fn scope_lists_parse() {
        let set = ScopeSet::parse_list("read, admin").unwrap();
        assert!(set.contains(Scope::Read) && set.contains(Scope::Admin));
        assert!(!set.contains(Scope::Write));
        assert_eq!(set.to_list(), "read,admin");
        assert!(ScopeSet::parse_list("").is_err());
        assert!(ScopeSet::parse_list("read,root").is_err());
    }
}
