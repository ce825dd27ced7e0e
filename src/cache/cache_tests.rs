//! The cache driven with the fake clock and source: pacing, refusals, known-down, panics.
use super::entry::MAX_REFUSALS;
use super::*;
use crate::testing::{FakeClock, FakeSource};

fn res(name: &str) -> Resource {
    Resource::for_test(name)
}

fn key(name: &str) -> Key {
    Key::new(IdentityId::DEFAULT, res(name))
}

fn setup(life: i64) -> (Arc<Cache>, Arc<FakeClock>, Arc<FakeSource>) {
    let clock = FakeClock::new(1_000_000);
    let source = FakeSource::new(clock.clone(), life);
    let policy = Policy {
        refresh_margin_ms: 300_000,
        ..Policy::default()
    };
    let cache = Cache::new(Identities::one(source.clone()), policy, &[], clock.clone());
    (cache, clock, source)
}

#[test]
fn serves_until_the_refresh_point_then_refreshes_in_the_background() {
    let (cache, clock, source) = setup(3_600_000);
    let first = cache.get_blocking(&res("r")).unwrap();
    clock.advance(3_300_000 - 1_000); // a second before the refresh point
    assert_eq!(cache.get_blocking(&res("r")).unwrap().id, first.id);
    assert_eq!(source.calls(), 1);
    clock.advance(1_000); // exactly at the refresh point
    let served = cache.get_blocking(&res("r")).unwrap();
    assert_eq!(
        served.id, first.id,
        "the held token, while a refresh starts"
    );
    assert!(source.wait_calls(2));
    let mut newer = cache.get_blocking(&res("r")).unwrap();
    for _ in 0..500 {
        if newer.id != first.id {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
        newer = cache.get_blocking(&res("r")).unwrap();
    }
    assert_ne!(newer.id, first.id);
}

struct PanickingSource;

impl Source for PanickingSource {
    fn fetch_once(&self, _r: &str, _t: Duration) -> Result<Token, SourceError> {
        panic!("a source bug");
    }
    fn endpoint(&self) -> String {
        "panics".into()
    }
    fn kind(&self) -> crate::source::Kind {
        crate::source::Kind::CloudShell
    }
}

#[test]
fn a_panicking_fetch_leaves_nobody_waiting() {
    let clock = FakeClock::new(0);
    let cache = Cache::new(
        Identities::one(Arc::new(PanickingSource)),
        Policy::default(),
        &[],
        clock,
    );
    let (tx, rx) = std::sync::mpsc::channel();
    let c = cache.clone();
    std::thread::spawn(move || drop(tx.send(c.get_blocking(&res("r")))));
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the reader is answered");
    assert!(matches!(got, Err(ReadError::Unavailable(_))));
    // And the resource is not stuck "fetching": the next reader starts a fetch again.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || drop(tx.send(cache.get_blocking(&res("r")))));
    assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok());
}

#[test]
fn a_clock_jump_past_expiry_never_serves_the_old_token() {
    let (cache, clock, source) = setup(3_600_000);
    let first = cache.get_blocking(&res("r")).unwrap();
    // A laptop suspended for two hours: the wall clock jumps.
    clock.advance(7_200_000);
    let after = cache.get_blocking(&res("r")).unwrap();
    assert_ne!(after.id, first.id, "the reader waited for a new token");
    assert_eq!(source.calls(), 2);
    assert!(cache.reopen(&first, Use::Read).is_err());
    assert!(cache.reopen(&after, Use::Read).is_ok());
}

#[test]
fn within_the_skew_before_expiry_a_token_is_not_served() {
    let (cache, clock, source) = setup(3_600_000);
    let first = cache.get_blocking(&res("r")).unwrap();
    clock.advance(3_600_000 - 5_000); // 5 s before expiry
    assert!(cache.reopen(&first, Use::Read).is_err());
    assert_ne!(cache.get_blocking(&res("r")).unwrap().id, first.id);
    assert_eq!(source.calls(), 2);
}

#[test]
fn refusals_never_evict_tokens_and_are_bounded() {
    let clock = FakeClock::new(1_000_000);
    let source = FakeSource::new(clock.clone(), 3_600_000);
    let policy = Policy {
        max_resources: 2,
        ..Policy::default()
    };
    let cache = Cache::new(Identities::one(source.clone()), policy, &[], clock.clone());
    cache.get_blocking(&res("a")).unwrap();
    cache.get_blocking(&res("b")).unwrap();
    for i in 0..50 {
        source.refuse(&format!("bad{i}"));
        let got = cache.get_blocking(&res(&format!("bad{i}")));
        assert!(matches!(got, Err(ReadError::Refused(_))));
    }
    let calls = source.calls();
    cache.get_blocking(&res("a")).unwrap();
    cache.get_blocking(&res("b")).unwrap();
    assert!(matches!(
        cache.get_blocking(&res("bad3")),
        Err(ReadError::Refused(_))
    ));
    assert_eq!(source.calls(), calls, "all from the caches");
    // A third token evicts the least recently read one.
    cache.get_blocking(&res("c")).unwrap();
    assert_eq!(cache.listed().len(), 2);

    let mut refusals = Refusals::default();
    for i in 0..MAX_REFUSALS + 10 {
        let refusal = Refusal {
            until: 10,
            error: ReadError::Refused(String::new()),
            at: i as i64,
        };
        refusals.insert(key(&format!("r{i}")), refusal);
    }
    assert_eq!(refusals.by_key.len(), MAX_REFUSALS);
    assert!(
        refusals.active(&key("r0"), 0).is_none(),
        "the oldest went first"
    );
    refusals.expire(10);
    assert!(refusals.by_key.is_empty() && refusals.order.is_empty());
}

#[test]
fn a_down_upstream_gets_one_attempt_per_fetch_until_it_answers() {
    let clock = FakeClock::new(1_000_000);
    let source = FakeSource::new(clock.clone(), 3_600_000);
    source.set_down(true);
    let policy = Policy {
        timeout: Duration::from_millis(800),
        ..Policy::default()
    };
    let cache = Cache::new(Identities::one(source.clone()), policy, &[], clock.clone());
    assert!(cache.get_blocking(&res("a")).is_err());
    let first = source.calls();
    assert!(first > 1, "the first fetch retries ({first} calls)");
    assert!(cache.get_blocking(&res("b")).is_err());
    assert_eq!(source.calls(), first + 1, "then one attempt");
    source.set_down(false);
    assert!(
        cache.get_blocking(&res("b")).is_ok(),
        "a read finds it up again"
    );
    assert!(!cache.upstream.known_down());
}

#[test]
fn fetches_of_a_held_token_are_paced() {
    let clock = FakeClock::new(1_000_000);
    let source = FakeSource::new(clock.clone(), 3_600_000);
    source.set_refresh_in(Some(0));
    let cache = Cache::new(
        Identities::one(source.clone()),
        Policy::default(),
        &[],
        clock.clone(),
    );
    let first = cache.get_blocking(&res("r")).unwrap();
    for _ in 0..100 {
        assert!(cache.reopen(&first, Use::Read).is_ok());
    }
    assert_eq!(source.calls(), 1, "paced: nothing within 2 s");
    clock.advance(policy::MIN_FETCH_INTERVAL_MS);
    assert!(cache.reopen(&first, Use::Read).is_ok());
    assert!(source.wait_calls(2));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(source.calls(), 2, "one refresh after 2 s");
}

#[test]
fn one_read_gives_a_lease_and_marks_use_as_told() {
    let (cache, clock, _source) = setup(3_600_000);
    let in_use = |c: &Cache| {
        c.state
            .lock()
            .entries
            .get(&key("r"))
            .unwrap()
            .reads
            .since_fetch
    };
    let first = cache
        .read_blocking(&key("r"), Use::ReadUnlessFetched)
        .unwrap();
    assert!(first.fetched && first.current);
    assert!(
        !in_use(&cache),
        "the read that waited for the fetch is not a use"
    );
    clock.advance(1_000);
    let again = cache.read_blocking(&key("r"), Use::Look).unwrap();
    assert!(!again.fetched && again.current);
    assert_eq!(again.version.id, first.version.id);
    assert_eq!(
        again.valid_for,
        Duration::from_millis(3_600_000 - 5_000 - 1_000)
    );
    assert!(!in_use(&cache), "a lookup is not a use");
    cache
        .read_blocking(&key("r"), Use::ReadUnlessFetched)
        .unwrap();
    assert!(in_use(&cache), "a later read is");
    // An endpoint read that waited for its fetch is a use.
    let other = cache.read_blocking(&key("o"), Use::Read).unwrap();
    assert!(other.fetched);
    assert!(
        cache
            .state
            .lock()
            .entries
            .get(&key("o"))
            .unwrap()
            .reads
            .since_fetch
    );
}

#[test]
fn resource_states_are_spelled_as_status_shows_them() {
    use super::status::ResourceState;
    let spelled = |s: ResourceState| serde_json::to_value(s).unwrap();
    assert_eq!(spelled(ResourceState::StaleButValid), "stale-but-valid");
    assert_eq!(spelled(ResourceState::Fresh), "fresh");
    assert_eq!(spelled(ResourceState::Denied), "denied");
}

#[test]
fn advancing_the_fake_clock_brings_a_fetchs_deadline_closer() {
    let clock = FakeClock::new(1_000_000);
    let source = FakeSource::new(clock.clone(), 3_600_000);
    source.set_down(true);
    let policy = Policy {
        timeout: Duration::from_secs(600),
        ..Policy::default()
    };
    let cache = Cache::new(Identities::one(source.clone()), policy, &[], clock.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    let c = cache.clone();
    std::thread::spawn(move || drop(tx.send(c.get_blocking(&res("r")))));
    assert!(source.wait_calls(1), "the fetch is under way");
    // Ten minutes of --timeout pass at once: the retrying fetch gives up.
    clock.advance(600_000);
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("answered long before ten real minutes");
    assert!(matches!(got, Err(ReadError::Unavailable(_))));
}
