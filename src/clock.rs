//! The cache's notion of now: the wall clock, moved between checks by tokio's clock.
//!
//! Entries carry wall-clock times (milliseconds since the Unix epoch) because several app
//! instances share them and each computes their age, so every instance must judge them on one
//! time base that follows the wall clock. Reading `SystemTime::now()` on every judgement would
//! tie freshness to the OS clock, which tests cannot move; instead the cache's now is tokio's
//! clock (`tokio::time::Instant`) plus an offset to wall time. Under `tokio::time::pause()` /
//! `advance()` the cache's time moves with the test's, so TTL, age and stale behaviour can be
//! tested without sleeping.
//!
//! The offset is measured on the real clocks (the wall clock against `std`'s monotonic clock,
//! never tokio's) at first use, and again by the first read that finds the last check
//! [`RECHECK`] or more away on tokio's clock; every other read is one clock read and a few
//! atomic loads, as cheap as before. A check that finds the wall clock moved against the
//! monotonic one:
//!
//! - by less than [`TOLERANCE`]: changes nothing (that much is the error of the measurement);
//! - forward: follows at once, time jumps ahead;
//! - backward by at most [`STEP`]: slews, the cache's time running at half speed until it has
//!   caught up, so a small correction never makes time run backwards;
//! - backward by more than [`STEP`]: follows at once, a real step (time runs backwards once).
//!
//! So a step of the wall clock (an NTP correction, a manual change) is seen within about a
//! second of it, and instances sharing a store agree on an entry's age as far as their wall
//! clocks agree. Paused time moves tokio's clock, not the real ones: a check under it finds
//! the offset unchanged unless the wall clock itself moved, and `advance()` still moves the
//! cache's time by exactly the amount advanced.
//!
//! Stores expire keys on their own clocks (Redis on its own, moka on `std::time::Instant`):
//! paused time moves the cache's freshness judgements, not the stores' expiry.

use std::sync::atomic::Ordering::{Acquire, Relaxed, Release};
use std::sync::atomic::{fence, AtomicI64, AtomicU64};
use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How far tokio's clock moves between two measurements of the wall clock.
const RECHECK: Duration = Duration::from_secs(1);

/// Differences smaller than this are measurement error, not a move of the wall clock: a
/// measurement whose monotonic reads are more than half of it apart is discarded.
const TOLERANCE: Duration = Duration::from_millis(10);

/// The largest backward correction that is slewed rather than followed at once.
const STEP: Duration = Duration::from_secs(1);

/// A wall clock followed on a monotonic time base; `W` reads the wall clock (`SystemTime::now`
/// outside tests).
pub(crate) struct Clock<W> {
    wall: W,
    /// The zero of the monotonic nanoseconds below.
    base: Instant,
    /// A sequence lock over `offset_ns` and `slew_end_ns` (odd while a check writes them), so
    /// that a read never pairs one check's offset with another's slew.
    seq: AtomicU64,
    /// Wall time minus monotonic time, in nanoseconds, once any slew has ended.
    offset_ns: AtomicI64,
    /// Monotonic time at which a slew ends; until then the cache's time is ahead of
    /// `offset_ns` by half the time left.
    slew_end_ns: AtomicI64,
    /// Monotonic time (tokio's clock) of the last check; `i64::MIN` before the first read,
    /// which checks, since tokio's clock may be a paused runtime's, far from `base`.
    checked_ns: AtomicI64,
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

/// Nanoseconds since the Unix epoch (negative before it, saturating).
fn epoch_ns(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(after) => nanos(after),
        Err(before) => -nanos(before.duration()),
    }
}

/// How far a slew ending at `slew_end` still holds the time ahead at `mono`.
fn ahead(slew_end: i64, mono: i64) -> i64 {
    slew_end.saturating_sub(mono).max(0) / 2
}

impl<W: Fn() -> SystemTime> Clock<W> {
    /// A clock reading the wall clock through `wall`, measured once now.
    pub(crate) fn new(wall: W) -> Self {
        let clock = Self {
            wall,
            base: Instant::now(),
            seq: AtomicU64::new(0),
            offset_ns: AtomicI64::new(0),
            slew_end_ns: AtomicI64::new(i64::MIN),
            checked_ns: AtomicI64::new(i64::MIN),
        };
        let (offset, _) = clock.measure();
        clock.offset_ns.store(offset, Relaxed);
        clock
    }

    /// Monotonic nanoseconds since `base` (negative before it: a paused runtime created
    /// earlier reads such instants; the mapping is linear, never clamped).
    fn mono_ns(&self, at: Instant) -> i64 {
        match at.checked_duration_since(self.base) {
            Some(after) => nanos(after),
            None => -nanos(self.base.duration_since(at)),
        }
    }

    /// Wall time minus monotonic time, with the monotonic clock read on both sides of the wall
    /// clock, and how far apart those two reads were (the bound on the error).
    fn measure(&self) -> (i64, Duration) {
        let before = Instant::now();
        let wall = epoch_ns((self.wall)());
        let after = Instant::now();
        let width = after.duration_since(before);
        let middle = self.mono_ns(before).saturating_add(nanos(width) / 2);
        (wall.saturating_sub(middle), width)
    }

    /// The offset and the end of the slew, as one check wrote them.
    fn state(&self) -> (i64, i64) {
        loop {
            let seq = self.seq.load(Acquire);
            let offset = self.offset_ns.load(Relaxed);
            let slew_end = self.slew_end_ns.load(Relaxed);
            fence(Acquire);
            if seq % 2 == 0 && self.seq.load(Relaxed) == seq {
                return (offset, slew_end);
            }
            std::hint::spin_loop();
        }
    }

    /// Measures the wall clock again at monotonic time `mono` and follows it (see the module
    /// docs). Only one thread at a time gets here (the compare-exchange on `checked_ns`).
    fn recheck(&self, mono: i64) {
        // A measurement whose reads were far apart (the thread was preempted between them) is
        // taken again rather than trusted.
        let Some(target) = (0..3)
            .map(|_| self.measure())
            .find_map(|(offset, width)| (width <= TOLERANCE / 2).then_some(offset))
        else {
            return;
        };
        let (offset, slew_end) = self.state();
        let current = offset.saturating_add(ahead(slew_end, mono));
        let behind = current.saturating_sub(target);
        if behind.unsigned_abs() < TOLERANCE.as_nanos() as u64 {
            return;
        }
        let slew_end = if behind > 0 && behind <= nanos(STEP) {
            mono.saturating_add(behind.saturating_mul(2))
        } else {
            i64::MIN
        };
        self.seq.fetch_add(1, Relaxed);
        fence(Release);
        self.offset_ns.store(target, Relaxed);
        self.slew_end_ns.store(slew_end, Relaxed);
        self.seq.fetch_add(1, Release);
    }

    /// Now, in nanoseconds since the Unix epoch.
    fn now_ns(&self) -> i64 {
        let mono = self.mono_ns(tokio::time::Instant::now().into_std());
        let checked = self.checked_ns.load(Relaxed);
        if mono.abs_diff(checked) >= RECHECK.as_nanos() as u64
            && self
                .checked_ns
                .compare_exchange(checked, mono, Relaxed, Relaxed)
                .is_ok()
        {
            self.recheck(mono);
        }
        let (offset, slew_end) = self.state();
        mono.saturating_add(offset)
            .saturating_add(ahead(slew_end, mono))
    }

    /// Now, as wall time.
    pub(crate) fn now(&self) -> SystemTime {
        let ns = self.now_ns();
        if ns >= 0 {
            UNIX_EPOCH + Duration::from_nanos(ns.unsigned_abs())
        } else {
            UNIX_EPOCH - Duration::from_nanos(ns.unsigned_abs())
        }
    }

    /// Now, in milliseconds since the Unix epoch (0 before the epoch).
    pub(crate) fn now_ms(&self) -> u64 {
        self.now_ns().max(0).unsigned_abs() / 1_000_000
    }
}

/// The process's clock, on the system's wall clock.
fn system() -> &'static Clock<fn() -> SystemTime> {
    static CLOCK: OnceLock<Clock<fn() -> SystemTime>> = OnceLock::new();
    CLOCK.get_or_init(|| Clock::new(SystemTime::now))
}

/// Now, as wall time (see the module docs).
pub(crate) fn now() -> SystemTime {
    system().now()
}

/// Now, in milliseconds since the Unix epoch (0 before the epoch).
pub(crate) fn now_ms() -> u64 {
    system().now_ms()
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;

    /// A wall clock that is the system's moved by `step` milliseconds (the test's hand on the
    /// clock: a test stores into `step` to set the clock forward or back).
    pub(crate) fn stepped(step: &Arc<AtomicI64>) -> impl Fn() -> SystemTime {
        let step = Arc::clone(step);
        move || {
            let by = step.load(Ordering::Relaxed);
            let now = SystemTime::now();
            if by >= 0 {
                now + Duration::from_millis(by.unsigned_abs())
            } else {
                now - Duration::from_millis(by.unsigned_abs())
            }
        }
    }

    const HOUR: i64 = 3_600_000;

    fn assert_near(got: u64, want: u64) {
        // The measurement error of a check (a few microseconds, at most TOLERANCE / 4) and the
        // real time the test takes to run; far below the steps the tests make.
        assert!(got.abs_diff(want) <= 20, "{got} vs {want}");
    }

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

    #[tokio::test(start_paused = true)]
    async fn follows_a_step_of_the_wall_clock_within_the_recheck_period() {
        let step = Arc::new(AtomicI64::new(0));
        let clock = Clock::new(stepped(&step));
        let start = clock.now_ms();

        step.store(HOUR, Ordering::Relaxed);
        tokio::time::advance(RECHECK / 2).await;
        assert_eq!(clock.now_ms(), start + 500, "not measured again yet");
        tokio::time::advance(RECHECK / 2).await;
        assert_near(clock.now_ms(), start + 1_000 + HOUR as u64);

        step.store(0, Ordering::Relaxed);
        tokio::time::advance(RECHECK).await;
        assert_near(clock.now_ms(), start + 2_000);

        // Paused time still moves the cache's time by exactly what was advanced.
        let before = clock.now_ms();
        tokio::time::advance(Duration::from_secs(90)).await;
        assert_eq!(clock.now_ms() - before, 90_000);
    }

    #[tokio::test(start_paused = true)]
    async fn a_small_backward_correction_slows_time_and_never_reverses_it() {
        let step = Arc::new(AtomicI64::new(0));
        let clock = Clock::new(stepped(&step));
        let start = clock.now_ms();

        step.store(-500, Ordering::Relaxed);
        tokio::time::advance(RECHECK).await;
        let seen = clock.now_ms();
        assert_near(seen, start + 1_000);
        tokio::time::advance(Duration::from_millis(200)).await;
        assert_near(clock.now_ms(), seen + 100);

        let mut last = seen;
        for _ in 0..30 {
            tokio::time::advance(Duration::from_millis(100)).await;
            let now = clock.now_ms();
            assert!(now >= last, "time ran backwards: {now} after {last}");
            last = now;
        }
        // 4.2 s on the monotonic clock, 0.5 s of it taken back by the slew.
        assert_near(last, start + 4_200 - 500);
    }
}
