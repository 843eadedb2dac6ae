//! Per-peer budget of failed key lookups: a token bucket per client address
//! (IPv6 by /64, since one host holds a whole prefix): a lookup takes a
//! token first, and a lookup that finds a valid key gives it back, so only
//! lookups that end in a refusal spend the budget. A
//! peer past its budget hears RESOURCE_EXHAUSTED (`RATE_LIMITED`, with
//! RetryInfo) instead of costing a lookup; calls whose key is already in the
//! cache pass whatever the bucket says, so a flood from a shared address
//! (a NAT, loopback) cannot lock out a legitimate key.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most peers tracked; beyond it, full buckets are dropped first (they are
/// the same as no bucket), then everything.
const MAX_PEERS: usize = 10_000;

pub struct FailureLimiter {
    burst: f64,
    per_sec: f64,
    peers: Mutex<HashMap<IpAddr, Bucket>>,
}

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// The address a peer is counted under.
pub fn peer_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

impl FailureLimiter {
    pub fn new(burst: u32, per_sec: f64) -> Self {
        FailureLimiter {
            burst: f64::from(burst.max(1)),
            per_sec: if per_sec.is_finite() && per_sec > 0.0 {
                per_sec
            } else {
                1.0
            },
            peers: Mutex::new(HashMap::new()),
        }
    }

    fn refilled(&self, bucket: Bucket, now: Instant) -> Bucket {
        let gained = now.saturating_duration_since(bucket.at).as_secs_f64() * self.per_sec;
        Bucket {
            tokens: (bucket.tokens + gained).min(self.burst),
            at: now,
        }
    }

    /// Takes one token of `peer`'s budget before a lookup: `Ok` when it
    /// may look up (give the token back with [`Self::refund`] when the key
    /// turns out valid), otherwise how long until it may. Taking before
    /// the lookup (not after) keeps concurrent calls of one peer from all
    /// passing on the same last token.
    pub fn take(&self, peer: IpAddr) -> Result<(), Duration> {
        let now = Instant::now();
        let key = peer_key(peer);
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if !peers.contains_key(&key) && peers.len() >= MAX_PEERS {
            let burst = self.burst;
            peers.retain(|_, b| self.refilled(*b, now).tokens < burst);
            if peers.len() >= MAX_PEERS {
                peers.clear();
            }
        }
        let bucket = peers.get(&key).copied().unwrap_or(Bucket {
            tokens: self.burst,
            at: now,
        });
        let mut bucket = self.refilled(bucket, now);
        if bucket.tokens < 1.0 {
            let wait = Duration::from_secs_f64((1.0 - bucket.tokens) / self.per_sec);
            peers.insert(key, bucket);
            return Err(wait);
        }
        bucket.tokens -= 1.0;
        peers.insert(key, bucket);
        Ok(())
    }

    /// Gives back the token of a lookup that found a valid key.
    pub fn refund(&self, peer: IpAddr) {
        let mut peers = self.peers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(bucket) = peers.get_mut(&peer_key(peer)) {
            bucket.tokens = (bucket.tokens + 1.0).min(self.burst);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peer_gets_its_burst_then_waits() {
        let limiter = FailureLimiter::new(3, 0.5);
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..3 {
            assert_eq!(limiter.take(peer), Ok(()));
        }
        let wait = limiter.take(peer).expect_err("over budget");
        assert!(wait > Duration::from_secs(1) && wait <= Duration::from_secs(2));
        assert_eq!(limiter.take(other), Ok(()), "other peers are not affected");
        // A lookup that found a valid key costs nothing.
        limiter.refund(peer);
        assert_eq!(limiter.take(peer), Ok(()));
        assert!(limiter.take(peer).is_err());
    }

    #[test]
    fn ipv6_peers_count_by_prefix_and_mapped_ipv4_as_ipv4() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        assert_eq!(peer_key(a), peer_key(b));
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        assert_eq!(peer_key(mapped), "10.1.2.3".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn the_peer_map_stays_bounded() {
        let limiter = FailureLimiter::new(2, 1.0);
        for i in 0..(MAX_PEERS as u32 + 50) {
            let _ = limiter.take(IpAddr::V4(i.into()));
        }
        assert!(limiter.peers.lock().unwrap().len() <= MAX_PEERS);
    }
}
