//! The cache's notion of now: wall time, advanced by tokio's clock.
//!
//! Entries carry wall-clock times (milliseconds since the Unix epoch) because several app
//! instances share them and each computes their age. Reading `SystemTime::now()` on every
//! judgement would tie freshness to the OS clock, which tests cannot move; instead the wall
//! clock is read once, at first use, together with an `Instant`, and later times are that
//! wall time plus the time elapsed on tokio's clock (`tokio::time::Instant`). Under
//! `tokio::time::pause()` / `advance()` the cache's time then moves with the test's, so TTL,
//! age and stale behaviour can be tested without sleeping.
//!
//! The trade-off: after the anchor, the cache follows the monotonic clock, not the wall
//! clock. A step of the wall clock (an NTP correction, a manual change) is not seen until the
//! process restarts, and the two clocks drift apart slowly (NTP-disciplined clocks by well
//! under a second a day), so instances of a long uptime may disagree on an entry's age by
//! about that much. In exchange, time never runs backwards within a process.
//!
//! Stores expire keys on their own clocks (Redis on its own, moka on `std::time::Instant`):
//! paused time moves the cache's freshness judgements, not the stores' expiry.

use std::sync::OnceLock;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// The wall time and the monotonic instant read together at first use.
struct Anchor {
    wall: SystemTime,
    instant: Instant,
}

fn anchor() -> &'static Anchor {
    static ANCHOR: OnceLock<Anchor> = OnceLock::new();
    ANCHOR.get_or_init(|| Anchor {
        wall: SystemTime::now(),
        instant: Instant::now(),
    })
}

/// Now, as wall time: the anchor's wall time moved by tokio's clock since the anchor.
///
/// The anchor is a `std` instant, not a tokio one: tokio's clock is per runtime (a paused
/// runtime's clock starts frozen at its creation), and every runtime's instants are `std`
/// instants underneath, so one anchor serves them all. A paused runtime created before the
/// anchor reads times slightly before it: the mapping is linear, never clamped.
pub(crate) fn now() -> SystemTime {
    let anchor = anchor();
    let now = tokio::time::Instant::now().into_std();
    match now.checked_duration_since(anchor.instant) {
        Some(ahead) => anchor.wall + ahead,
        None => anchor.wall - anchor.instant.duration_since(now),
    }
}

/// Now, in milliseconds since the Unix epoch (0 before the epoch).
pub(crate) fn now_ms() -> u64 {
    now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn follows_the_wall_clock_outside_a_runtime() {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let ours = now_ms();
        assert!(ours.abs_diff(wall) < 1_000, "{ours} vs {wall}");
    }

    #[tokio::test(start_paused = true)]
    async fn moves_with_paused_time_and_only_with_it() {
        let before = now_ms();
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(now_ms(), before, "frozen while time is paused");
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(now_ms() - before, 90_000);
    }
}
