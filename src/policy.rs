//! Freshness policy: pure functions of a clock and a token's times, unit-tested with a fake
//! clock. All times are wall-clock milliseconds since the epoch (`EpochMs`): monotonic
//! timers sleep through a suspend, the wall clock does not.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (wall clock).
pub type EpochMs = i64;

/// The wall clock every decision is judged against, and the monotonic time deadlines and
/// pauses are measured on (the pool's queued jobs, a fetch's `--timeout`); a fake one in
/// tests moves both.
pub trait Clock: Send + Sync {
    fn now(&self) -> EpochMs;

    /// Monotonic time: never goes back, unaffected by changes of the wall clock.
    fn instant(&self) -> Instant {
        Instant::now()
    }
}

/// The system's wall clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> EpochMs {
        now_ms()
    }
}

/// The system's wall clock, now.
pub fn now_ms() -> EpochMs {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as EpochMs)
}

/// Tokens living this long or longer are refreshed at half-life at the latest.
pub const HALF_LIFE_FROM_MS: i64 = 2 * 3600 * 1000;
/// A token counts as expired this long (or a tenth of its lifetime, if less) before expiry.
pub const MAX_SKEW_MS: i64 = 5_000;
/// Background work on one resource never calls the upstream more often than this.
pub const MIN_RETRY_MS: i64 = 2_000;
/// Backoff between failed background refreshes never grows past this.
pub const MAX_BACKOFF_MS: i64 = 60_000;
/// While a valid token is held, fetches of its resource start at most this often, whatever
/// an answer says (`refresh_in: 0`, a `not_before` at the epoch): readers keep the held token.
pub const MIN_FETCH_INTERVAL_MS: i64 = 2_000;
/// The latest expiry accepted, counted from the request: a week (real tokens live 1-24 h;
/// an expiry in milliseconds instead of seconds lands tens of thousands of years away).
pub const MAX_LIFETIME_MS: i64 = 7 * 24 * 3600 * 1000;
/// `--max-upstream-rate` lets this many requests go at once before the rate applies.
pub const UPSTREAM_BURST: u32 = 100;
/// A token read since it was fetched is refreshed this long (or a tenth of the time to its
/// refresh point, if less) before its refresh point.
pub const REFRESH_LEAD_MS: i64 = 1_000;

/// The knobs (from the command line).
#[derive(Debug, Clone)]
pub struct Policy {
    pub refresh_margin_ms: i64,
    pub negative_ttl_ms: i64,
    /// The most one fetch may take, retries included.
    pub timeout: Duration,
    pub max_resources: usize,
    /// Upstream requests per second for the whole mount (`--max-upstream-rate`; 0: no bound).
    pub max_upstream_rate: u32,
    /// Up to this percent (at most 100) of the time from a token's issue to its refresh
    /// point, drawn at random per token, is taken off its refresh point ([`spread`]), so
    /// tokens fetched in the same second are not refreshed in the same second (the CSI
    /// driver's volumes). 0: the exact schedule.
    pub refresh_spread_pct: u8,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            refresh_margin_ms: 300_000,
            negative_ttl_ms: 30_000,
            timeout: Duration::from_secs(10),
            max_resources: 1024,
            max_upstream_rate: 20,
            refresh_spread_pct: 0,
        }
    }
}

/// When a token must be refreshed and until when it may be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    pub refresh_at: EpochMs,
    /// When a token in use is refreshed in the background: shortly before `refresh_at`.
    pub refresh_ahead_at: EpochMs,
    pub valid_until: EpochMs,
}

/// The refresh point is the earlier of `expires_on - margin` and half-life (for lifetimes of
/// 2 h or more, or the upstream's `refresh_in`); a margin of more than half the lifetime
/// shrinks to half of it. A token is valid until `expires_on - skew`. The lifetime runs from
/// `issued_at` (when the token was issued, which an upstream that caches may have done long
/// before we fetched it). Saturating throughout: the inputs come from outside.
pub fn schedule(
    issued_at: EpochMs,
    expires_on: EpochMs,
    refresh_in_ms: Option<i64>,
    margin_ms: i64,
) -> Schedule {
    let lifetime = expires_on.saturating_sub(issued_at).max(0);
    let margin = if lifetime < margin_ms.saturating_mul(2) {
        lifetime / 2
    } else {
        margin_ms
    };
    let mut refresh_at = expires_on.saturating_sub(margin);
    if let Some(r) = refresh_in_ms {
        refresh_at = refresh_at.min(issued_at.saturating_add(r.clamp(0, lifetime)));
    } else if lifetime >= HALF_LIFE_FROM_MS {
        refresh_at = refresh_at.min(issued_at.saturating_add(lifetime / 2));
    }
    Schedule {
        refresh_at,
        refresh_ahead_at: refresh_ahead_at(issued_at, refresh_at),
        valid_until: valid_until(issued_at, expires_on),
    }
}

/// Shortly before `refresh_at`: a tenth of the time since `issued_at`, at most
/// `REFRESH_LEAD_MS`.
fn refresh_ahead_at(issued_at: EpochMs, refresh_at: EpochMs) -> EpochMs {
    let lead = REFRESH_LEAD_MS.min(refresh_at.saturating_sub(issued_at).max(0) / 10);
    refresh_at - lead
}

/// `s` with its refresh point moved earlier by `share` (a random fraction in [0, 1),
/// clamped to it) of `pct` percent (at most 100) of the time from `issued_at` to the
/// refresh point; the refresh-ahead point keeps its lead before the new refresh point, and
/// the token stays valid as long as before. Never earlier than `issued_at`. `pct` 0 or
/// `share` 0: `s` as it is. Pure: the caller draws `share` (the cache, with
/// `hardening::jitter`, when `Policy::refresh_spread_pct` is set).
pub fn spread(s: Schedule, issued_at: EpochMs, pct: u8, share: f64) -> Schedule {
    let interval = s.refresh_at.saturating_sub(issued_at).max(0);
    let fraction = f64::from(pct.min(100)) / 100.0 * share.clamp(0.0, 1.0);
    // `as` saturates; the product is at most `interval`.
    let early = ((interval as f64) * fraction) as i64;
    if early <= 0 {
        return s;
    }
    let refresh_at = s.refresh_at.saturating_sub(early.min(interval));
    Schedule {
        refresh_at,
        refresh_ahead_at: refresh_ahead_at(issued_at, refresh_at),
        valid_until: s.valid_until,
    }
}

/// Whether a version may be served: the one answer to "may this be read now?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The newest version of its resource, valid for that much longer.
    Current { valid_for_ms: i64 },
    /// Valid for that much longer, but a newer version exists: an open file keeps reading
    /// it, a new open must not.
    Superseded { valid_for_ms: i64 },
    /// Past `valid_until`: never served again.
    Expired,
}

/// The verdict on a version with schedule `s` at `now`, `current` when no newer version of
/// its resource exists. The only place a version's validity is compared with the clock.
pub fn verdict(now: EpochMs, s: &Schedule, current: bool) -> Verdict {
    if now >= s.valid_until {
        Verdict::Expired
    } else if current {
        Verdict::Current {
            valid_for_ms: s.valid_until - now,
        }
    } else {
        Verdict::Superseded {
            valid_for_ms: s.valid_until - now,
        }
    }
}

/// The last moment a token may be served: `expires_on` less the skew allowance.
pub fn valid_until(issued_at: EpochMs, expires_on: EpochMs) -> EpochMs {
    expires_on.saturating_sub(skew(expires_on.saturating_sub(issued_at)))
}

/// 5 s or a tenth of the lifetime, whichever is less.
pub fn skew(lifetime_ms: i64) -> i64 {
    MAX_SKEW_MS.min(lifetime_ms.max(0) / 10)
}

/// What a reader gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadDecision {
    /// The held token, nothing else to do.
    Serve,
    /// The held token, and start a refresh in the background.
    ServeAndRefresh,
    /// No valid token: wait for a fetch (joining the one under way, if any).
    Wait,
    /// Refused recently and nothing valid held: ENOENT without asking the upstream.
    Refused,
}

/// What the cache knows of one resource when a reader comes.
#[derive(Debug, Clone, Copy, Default)]
pub struct EntryView {
    pub schedule: Option<Schedule>,
    pub fetch_in_flight: bool,
    /// Background refreshes wait until then (backoff, or an upstream that cached).
    pub next_attempt_at: EpochMs,
    pub refused_until: EpochMs,
    /// When the last fetch of this resource started.
    pub last_fetch_at: Option<EpochMs>,
}

impl EntryView {
    /// A fetch started less than `MIN_FETCH_INTERVAL_MS` ago.
    fn paced(&self, now: EpochMs) -> bool {
        self.last_fetch_at
            .is_some_and(|at| now < at.saturating_add(MIN_FETCH_INTERVAL_MS))
    }
}

pub fn on_read(now: EpochMs, e: &EntryView) -> ReadDecision {
    match e.schedule {
        Some(s) if verdict(now, &s, true) != Verdict::Expired => {
            if now < s.refresh_at || e.fetch_in_flight || now < e.next_attempt_at || e.paced(now) {
                ReadDecision::Serve
            } else {
                ReadDecision::ServeAndRefresh
            }
        }
        _ if now < e.refused_until => ReadDecision::Refused,
        _ => ReadDecision::Wait,
    }
}

/// Whether the background worker should refresh a token that was read since it was fetched.
pub fn refresh_ahead_due(now: EpochMs, e: &EntryView) -> bool {
    match e.schedule {
        Some(s) => {
            verdict(now, &s, true) != Verdict::Expired
                && now >= s.refresh_ahead_at
                && !e.fetch_in_flight
                && now >= e.next_attempt_at
                && !e.paced(now)
        }
        None => false,
    }
}

/// The mount-wide bound on upstream requests: a token bucket of `UPSTREAM_BURST` requests
/// refilled at `rate` per second (0: unbounded). Pure: the caller passes the clock.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: u32,
    /// Thousandths of a request, so refills need no floating point.
    milli: i64,
    last: EpochMs,
}

impl Bucket {
    pub fn new(rate: u32, now: EpochMs) -> Bucket {
        Bucket {
            rate,
            milli: i64::from(UPSTREAM_BURST) * 1000,
            last: now,
        }
    }

    /// Takes one request: `Ok` to go now, `Err(ms)` to ask again that much later.
    pub fn take(&mut self, now: EpochMs) -> Result<(), i64> {
        if self.rate == 0 {
            return Ok(());
        }
        // A clock that went back refills nothing (and never drains).
        let elapsed = now.saturating_sub(self.last).max(0);
        self.last = self.last.max(now);
        let full = i64::from(UPSTREAM_BURST) * 1000;
        self.milli = self
            .milli
            .saturating_add(elapsed.saturating_mul(i64::from(self.rate)))
            .min(full);
        if self.milli >= 1000 {
            self.milli -= 1000;
            Ok(())
        } else {
            let rate = i64::from(self.rate);
            Err(((1000 - self.milli) + rate - 1) / rate)
        }
    }
}

/// Wait after `failures` consecutive failed background refreshes: exponential from
/// `MIN_RETRY_MS`, capped, at least the upstream's `Retry-After`, stretched by `jitter` in
/// [0, 1) by up to a quarter. Never below `MIN_RETRY_MS`.
pub fn backoff_ms(failures: u32, retry_after: Option<Duration>, jitter: f64) -> i64 {
    let exp = MIN_RETRY_MS.saturating_mul(1 << failures.saturating_sub(1).min(16));
    let base = exp.min(MAX_BACKOFF_MS);
    let with_jitter = base + (base as f64 * 0.25 * jitter.clamp(0.0, 1.0)) as i64;
    // An upstream's Retry-After is honoured up to an hour.
    let floor = retry_after.map_or(0, |d| d.as_millis().min(3_600_000) as i64);
    with_jitter.max(floor).max(MIN_RETRY_MS)
}

/// When to ask again after an upstream that caches returned the token we already hold:
/// half the time left before it stops being valid, never sooner than `MIN_RETRY_MS`, so the
/// retries tighten toward expiry without spinning.
pub fn unchanged_retry_at(now: EpochMs, s: &Schedule) -> EpochMs {
    now.saturating_add((s.valid_until.saturating_sub(now) / 2).max(MIN_RETRY_MS))
}

/// Pause between attempts inside one fetch (a reader is waiting): short and growing.
pub fn in_fetch_pause(attempt: u32) -> Duration {
    Duration::from_millis((100u64 << attempt.min(4)).min(1_000))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    #[test]
    fn a_spread_moves_the_refresh_point_earlier_by_a_share_of_its_interval() {
        let s = schedule(0, H, None, 300_000); // refresh at 55 min
        let lead = s.refresh_at - s.refresh_ahead_at;
        assert_eq!(spread(s, 0, 0, 0.9), s, "0 %: the exact schedule");
        assert_eq!(spread(s, 0, 20, 0.0), s, "a draw of 0: the exact schedule");
        let half = spread(s, 0, 20, 0.5); // 10 % of 55 min earlier
        assert_eq!(half.refresh_at, H - 300_000 - 330_000);
        assert_eq!(
            half.refresh_ahead_at,
            half.refresh_at - lead,
            "the same lead"
        );
        assert_eq!(half.valid_until, s.valid_until, "validity is unchanged");
        // The most it moves: `pct` of the interval, whatever the draw says.
        let most = spread(s, 0, 20, 7.0);
        assert_eq!(most.refresh_at, H - 300_000 - 660_000);
        let all = spread(s, 0, 255, 1.0);
        assert_eq!(all.refresh_at, 0, "never before the token was issued");
        assert_eq!(all.refresh_ahead_at, 0);
        // A token issued later: the interval counts from its issue.
        let later = spread(schedule(H, 2 * H, None, 300_000), H, 10, 1.0);
        assert_eq!(later.refresh_at, 2 * H - 300_000 - 330_000);
        // Different draws: different points (volumes of one second spread out).
        let points: std::collections::BTreeSet<_> = [0.1, 0.2, 0.3, 0.4]
            .iter()
            .map(|&d| spread(s, 0, 10, d).refresh_at)
            .collect();
        assert_eq!(points.len(), 4);
        assert_eq!(spread(s, 0, 10, f64::NAN), s, "a NaN draw moves nothing");
        // Outside inputs never overflow.
        let wild = schedule(i64::MIN, i64::MAX, Some(i64::MAX), i64::MAX);
        let _ = spread(wild, i64::MIN, 100, 0.99);
    }

    #[test]
    fn refresh_point_is_margin_before_expiry_for_an_hour_token() {
        let s = schedule(0, H, None, 300_000);
        assert_eq!(s.refresh_at, H - 300_000);
        assert_eq!(s.valid_until, H - 5_000);
    }

    #[test]
    fn long_tokens_refresh_at_half_life_or_when_told() {
        assert_eq!(schedule(0, 24 * H, None, 300_000).refresh_at, 12 * H);
        assert_eq!(schedule(0, 2 * H, None, 300_000).refresh_at, H);
        assert_eq!(
            schedule(0, 2 * H - 1, None, 300_000).refresh_at,
            2 * H - 1 - 300_000
        );
        assert_eq!(schedule(0, H, Some(600_000), 300_000).refresh_at, 600_000);
    }

    #[test]
    fn margin_shrinks_to_half_a_short_lifetime() {
        let s = schedule(1_000, 11_000, None, 300_000);
        assert_eq!(s.refresh_at, 6_000);
        assert_eq!(s.valid_until, 10_000);
    }

    #[test]
    fn an_old_token_from_a_caching_upstream_keeps_its_full_skew() {
        // Issued an hour ago, fetched now with 4 s left: valid until 5 s before expiry,
        // that is never.
        let s = schedule(0, H, None, 300_000);
        assert_eq!(s.valid_until, H - 5_000);
        assert_eq!(valid_until(0, H), H - 5_000);
        // Judged from the fetch instead, the skew would shrink to 400 ms.
        assert_eq!(valid_until(H - 4_000, H), H - 400);
    }

    #[test]
    fn outside_values_never_overflow() {
        // No panic (debug builds check overflow) and nothing wraps below the issue time.
        let s = schedule(i64::MIN, i64::MAX, Some(i64::MAX), i64::MAX);
        assert!(s.refresh_at > i64::MIN && s.valid_until > 0);
        let s = schedule(0, H, Some(i64::MAX), 300_000);
        assert_eq!(
            s.refresh_at,
            H - 300_000,
            "refresh_in is clamped to the lifetime"
        );
        assert_eq!(
            backoff_ms(1, Some(Duration::from_secs(u64::MAX)), 0.0),
            3_600_000
        );
        let _ = unchanged_retry_at(i64::MAX, &s);
    }

    #[test]
    fn skew_is_five_seconds_or_a_tenth() {
        assert_eq!(skew(H), 5_000);
        assert_eq!(skew(20_000), 2_000);
        assert_eq!(skew(-5), 0);
    }

    fn entry(now_token: Schedule) -> EntryView {
        EntryView {
            schedule: Some(now_token),
            ..EntryView::default()
        }
    }

    #[test]
    fn read_decisions_at_the_boundaries() {
        let s = schedule(0, H, None, 300_000);
        let e = entry(s);
        assert_eq!(on_read(s.refresh_at - 1, &e), ReadDecision::Serve);
        assert_eq!(on_read(s.refresh_at, &e), ReadDecision::ServeAndRefresh);
        assert_eq!(on_read(s.refresh_at + 1, &e), ReadDecision::ServeAndRefresh);
        assert_eq!(
            on_read(s.valid_until - 1, &e),
            ReadDecision::ServeAndRefresh
        );
        assert_eq!(on_read(s.valid_until, &e), ReadDecision::Wait);
        assert_eq!(on_read(H - 1, &e), ReadDecision::Wait);
        assert_eq!(on_read(H, &e), ReadDecision::Wait);
        assert_eq!(on_read(H + 1, &e), ReadDecision::Wait);
        // One second either side of each boundary.
        assert_eq!(on_read(s.refresh_at - 1_000, &e), ReadDecision::Serve);
        assert_eq!(
            on_read(s.refresh_at + 1_000, &e),
            ReadDecision::ServeAndRefresh
        );
        assert_eq!(
            on_read(s.valid_until - 1_000, &e),
            ReadDecision::ServeAndRefresh
        );
        assert_eq!(on_read(s.valid_until + 1_000, &e), ReadDecision::Wait);
        assert_eq!(on_read(H - 1_000, &e), ReadDecision::Wait);
        assert_eq!(on_read(H + 1_000, &e), ReadDecision::Wait);
    }

    #[test]
    fn a_refresh_under_way_or_in_backoff_serves_the_valid_token() {
        let s = schedule(0, H, None, 300_000);
        let busy = EntryView {
            fetch_in_flight: true,
            ..entry(s)
        };
        assert_eq!(on_read(s.refresh_at, &busy), ReadDecision::Serve);
        let backing_off = EntryView {
            next_attempt_at: s.refresh_at + 10,
            ..entry(s)
        };
        assert_eq!(on_read(s.refresh_at + 9, &backing_off), ReadDecision::Serve);
        assert_eq!(
            on_read(s.refresh_at + 10, &backing_off),
            ReadDecision::ServeAndRefresh
        );
        // Backoff never makes a reader without a valid token wait for it.
        assert_eq!(on_read(s.valid_until, &backing_off), ReadDecision::Wait);
    }

    #[test]
    fn refusals_are_remembered_only_without_a_valid_token() {
        let refused = EntryView {
            refused_until: 30_000,
            ..EntryView::default()
        };
        assert_eq!(on_read(29_999, &refused), ReadDecision::Refused);
        assert_eq!(on_read(30_000, &refused), ReadDecision::Wait);
        let s = schedule(0, H, None, 300_000);
        let held = EntryView {
            refused_until: 30_000,
            ..entry(s)
        };
        assert_eq!(on_read(10, &held), ReadDecision::Serve);
    }

    #[test]
    fn refresh_ahead_starts_shortly_before_the_refresh_point() {
        let s = schedule(0, H, None, 300_000);
        let e = entry(s);
        assert_eq!(s.refresh_ahead_at, s.refresh_at - REFRESH_LEAD_MS);
        assert!(!refresh_ahead_due(s.refresh_ahead_at - 1, &e));
        assert!(refresh_ahead_due(s.refresh_ahead_at, &e));
        // Short tokens: the lead is a tenth of the time to the refresh point.
        let short = schedule(0, 4_000, None, 300_000);
        assert_eq!(short.refresh_ahead_at, 2_000 - 200);
        assert!(!refresh_ahead_due(s.valid_until, &e));
        assert!(!refresh_ahead_due(
            s.refresh_at,
            &EntryView {
                fetch_in_flight: true,
                ..e
            }
        ));
    }

    #[test]
    fn fetches_of_a_held_token_start_at_most_every_two_seconds() {
        // `refresh_in: 0`: the refresh point is the moment of issue.
        let s = schedule(0, H, Some(0), 300_000);
        let e = EntryView {
            last_fetch_at: Some(0),
            ..entry(s)
        };
        assert_eq!(on_read(1, &e), ReadDecision::Serve);
        assert_eq!(on_read(MIN_FETCH_INTERVAL_MS - 1, &e), ReadDecision::Serve);
        assert_eq!(
            on_read(MIN_FETCH_INTERVAL_MS, &e),
            ReadDecision::ServeAndRefresh
        );
        assert!(!refresh_ahead_due(MIN_FETCH_INTERVAL_MS - 1, &e));
        assert!(refresh_ahead_due(MIN_FETCH_INTERVAL_MS, &e));
        // Without a valid token, pacing never makes a reader wait longer.
        assert_eq!(on_read(s.valid_until, &e), ReadDecision::Wait);
    }

    #[test]
    fn the_bucket_lets_a_burst_through_then_the_rate() {
        let mut b = Bucket::new(20, 0);
        for _ in 0..UPSTREAM_BURST {
            assert_eq!(b.take(0), Ok(()));
        }
        assert_eq!(b.take(0), Err(50));
        assert_eq!(b.take(49), Err(1));
        assert_eq!(b.take(50), Ok(()));
        assert_eq!(b.take(50), Err(50));
        // A clock that goes back neither refills nor panics.
        assert_eq!(b.take(-1_000_000), Err(50));
        // A long pause refills up to the burst only.
        let later = 3_600_000;
        for _ in 0..UPSTREAM_BURST {
            assert_eq!(b.take(later), Ok(()));
        }
        assert!(b.take(later).is_err());
        let mut free = Bucket::new(0, 0);
        for _ in 0..10_000 {
            assert_eq!(free.take(0), Ok(()));
        }
    }

    #[test]
    fn backoff_grows_caps_and_honours_retry_after() {
        assert_eq!(backoff_ms(1, None, 0.0), 2_000);
        assert_eq!(backoff_ms(2, None, 0.0), 4_000);
        assert_eq!(backoff_ms(3, None, 0.0), 8_000);
        assert_eq!(backoff_ms(30, None, 0.0), MAX_BACKOFF_MS);
        assert_eq!(backoff_ms(30, None, 0.999), MAX_BACKOFF_MS + 14_985);
        assert_eq!(backoff_ms(1, Some(Duration::from_secs(120)), 0.0), 120_000);
        assert_eq!(backoff_ms(0, None, 0.0), MIN_RETRY_MS);
    }

    #[test]
    fn unchanged_tokens_are_retried_on_a_tightening_schedule() {
        let s = schedule(0, H, None, 300_000);
        let first = unchanged_retry_at(s.refresh_at, &s);
        assert_eq!(first, s.refresh_at + (s.valid_until - s.refresh_at) / 2);
        let later = unchanged_retry_at(first, &s);
        assert!(later - first < first - s.refresh_at);
        assert_eq!(
            unchanged_retry_at(s.valid_until - 100, &s),
            s.valid_until - 100 + MIN_RETRY_MS
        );
    }
}
