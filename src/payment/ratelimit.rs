//! Token-bucket rate limits per key and per client address (`rate_limit` on a route).
//!
//! A bucket holds up to `burst` tokens (default: the rate's count) and refills at
//! `count / period`. Time is `tokio::time::Instant`, so tests can pause it.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

const SHARDS: usize = 16;
/// Past this many tracked clients in a shard, full (idle) buckets are forgotten.
const SHARD_SOFT_CAP: usize = 8192;

#[derive(Debug)]
pub struct Limiter {
    capacity: f64,
    per_sec: f64,
    shards: Vec<Mutex<HashMap<u64, Bucket>>>,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Limiter {
    pub fn new(count: u32, period: Duration, burst: Option<u32>) -> Limiter {
        Limiter {
            capacity: f64::from(burst.unwrap_or(count).max(1)),
            per_sec: f64::from(count) / period.as_secs_f64(),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    /// Whether `key` has a token left, without taking it and without making a bucket
    /// for a key never seen (so unauthenticated callers cannot fill the table).
    pub fn peek(&self, key: impl Hash) -> Result<(), u64> {
        let k = hash(key);
        let now = Instant::now();
        let map = self.shards[(k as usize) % SHARDS].lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&k) {
            None => Ok(()),
            Some(b) => {
                let tokens = (b.tokens + now.duration_since(b.at).as_secs_f64() * self.per_sec).min(self.capacity);
                if tokens >= 1.0 {
                    Ok(())
                } else {
                    Err(((1.0 - tokens) / self.per_sec).ceil().max(1.0) as u64)
                }
            }
        }
    }

    /// Takes one token for `key`. `Err(secs)` says when to retry.
    pub fn check(&self, key: impl Hash) -> Result<(), u64> {
        let k = hash(key);
        let now = Instant::now();
        let shard = &self.shards[(k as usize) % SHARDS];
        let mut map = shard.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= SHARD_SOFT_CAP {
            let (cap, rate) = (self.capacity, self.per_sec);
            map.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < cap);
        }
        let b = map.entry(k).or_insert(Bucket { tokens: self.capacity, at: now });
        let refill = now.duration_since(b.at).as_secs_f64() * self.per_sec;
        b.tokens = (b.tokens + refill).min(self.capacity);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Ok(())
        } else {
            let wait = (1.0 - b.tokens) / self.per_sec;
            Err(wait.ceil().max(1.0) as u64)
        }
    }
}

fn hash(key: impl Hash) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn allows_the_burst_then_refills_at_the_rate() {
        let l = Limiter::new(2, Duration::from_secs(1), Some(3));
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_ok());
        assert_eq!(l.check("a"), Err(1));
        assert!(l.check("b").is_ok(), "buckets are per key");
        tokio::time::advance(Duration::from_millis(500)).await;
        assert!(l.check("a").is_ok());
        assert!(l.check("a").is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn peek_takes_nothing_and_makes_no_bucket() {
        let l = Limiter::new(1, Duration::from_secs(60), None);
        for _ in 0..10 {
            assert!(l.peek("stranger").is_ok());
        }
        assert!(l.shards.iter().all(|s| s.lock().unwrap().is_empty()), "peek made a bucket");
        assert!(l.check("a").is_ok());
        assert_eq!(l.peek("a"), Err(60));
        tokio::time::advance(Duration::from_secs(60)).await;
        assert!(l.peek("a").is_ok());
        assert!(l.check("a").is_ok(), "peek took no token");
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_reflects_slow_rates() {
        let l = Limiter::new(1, Duration::from_secs(60), None);
        assert!(l.check(1u8).is_ok());
        assert_eq!(l.check(1u8), Err(60));
    }
}
