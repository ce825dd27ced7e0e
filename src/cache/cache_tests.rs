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
            upstream_calls: 1,
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

/// A cache whose daemon has no identity of its own, and one identity added at run time.
fn csi_setup(policy: Policy) -> (Arc<Cache>, Arc<FakeClock>, Arc<FakeSource>, IdentityId) {
    let clock = FakeClock::new(1_000_000);
    let source = FakeSource::new(clock.clone(), 3_600_000);
    let cache = Cache::new(
        Identities::without_own("no own"),
        policy,
        &[],
        clock.clone(),
    );
    let ids = crate::source::Identity::default();
    let id = cache.identities().add("pod".into(), ids, source.clone());
    (cache, clock, source, id)
}

#[test]
fn declared_keys_of_an_added_identity_are_kept_and_never_evicted() {
    let policy = Policy {
        max_resources: 2,
        ..Policy::default()
    };
    let (cache, clock, source, id) = csi_setup(policy);
    let declared = Key::new(id, res("d"));
    cache.declare(&declared);
    assert_eq!(source.calls(), 0, "declaring fetches nothing");
    cache.read_blocking(&declared, Use::Read).unwrap();
    for name in ["a", "b", "c"] {
        cache
            .read_blocking(&Key::new(id, res(name)), Use::Read)
            .unwrap();
    }
    let listed: Vec<_> = cache.listed().into_iter().map(|(k, _)| k).collect();
    assert!(listed.contains(&declared), "never evicted: {listed:?}");
    assert_eq!(listed.len(), 2, "the least recently read others went");
    // Its token expires unread: the entry stays declared, and the next read fetches.
    clock.advance(2 * 3_600_000);
    cache.pass_now();
    assert!(cache.state.lock().entries.contains_key(&declared));
    cache.undeclare(&declared);
    cache.pass_now();
    assert!(!cache.state.lock().entries.contains_key(&declared));
    // The daemon's own identity fetches nothing.
    let calls = source.calls();
    let own = cache.read_blocking(&key("r"), Use::Read).err();
    assert_eq!(own, Some(ReadError::Unavailable("no own".into())));
    assert_eq!(source.calls(), calls);
}

#[test]
fn a_forgotten_identity_leaves_no_entry_refusal_or_source() {
    let (cache, _clock, source, id) = csi_setup(Policy::default());
    let other = cache.identities().add(
        "other".into(),
        crate::source::Identity::default(),
        source.clone(),
    );
    let held = Key::new(id, res("a"));
    cache.declare(&held);
    cache.read_blocking(&held, Use::Read).unwrap();
    source.refuse("bad");
    let refused = Key::new(id, res("bad"));
    assert!(matches!(
        cache.read_blocking(&refused, Use::Read),
        Err(ReadError::Refused(_))
    ));
    cache
        .read_blocking(&Key::new(other, res("a")), Use::Read)
        .unwrap();
    cache.forget_identity(id);
    {
        let state = cache.state.lock();
        assert!(state.entries.keys().all(|k| k.identity == other));
        assert!(state.refusals.by_key.is_empty() && state.refusals.order.is_empty());
    }
    assert!(cache.identities().source(id).is_none());
    assert!(
        cache.peek(&Key::new(other, res("a"))).is_some(),
        "others stay"
    );
    // A read of a forgotten identity's key fails without a request.
    let calls = source.calls();
    let got = cache.read_blocking(&held, Use::Read).err();
    assert!(matches!(got, Some(ReadError::Unavailable(ref m)) if m.contains("not an identity")));
    assert_eq!(source.calls(), calls);
}

/// A source whose fetches wait until released.
struct Gate {
    open: parking_lot::Mutex<bool>,
    opened: parking_lot::Condvar,
    started: std::sync::atomic::AtomicU64,
    inner: Arc<FakeSource>,
}

impl Source for Gate {
    fn fetch_once(&self, r: &str, t: Duration) -> Result<Token, SourceError> {
        self.started.fetch_add(1, Ordering::SeqCst);
        let mut open = self.open.lock();
        while !*open {
            self.opened.wait(&mut open);
        }
        drop(open);
        self.inner.fetch_once(r, t)
    }
    fn endpoint(&self) -> String {
        "gate".into()
    }
    fn kind(&self) -> crate::source::Kind {
        crate::source::Kind::WorkloadIdentity
    }
}

#[test]
fn forgetting_an_identity_answers_its_waiters_and_a_late_fetch_records_nothing() {
    let (cache, clock, _source, _id) = csi_setup(Policy::default());
    let gate = Arc::new(Gate {
        open: parking_lot::Mutex::new(false),
        opened: parking_lot::Condvar::new(),
        started: std::sync::atomic::AtomicU64::new(0),
        inner: FakeSource::new(clock.clone(), 3_600_000),
    });
    let ids = crate::source::Identity::default();
    let id = cache.identities().add("gated".into(), ids, gate.clone());
    let k = Key::new(id, res("a"));
    cache.declare(&k);
    let (tx, rx) = std::sync::mpsc::channel();
    let (c, k2) = (cache.clone(), k.clone());
    std::thread::spawn(move || drop(tx.send(c.read_blocking(&k2, Use::Read))));
    for _ in 0..1000 {
        if gate.started.load(Ordering::SeqCst) > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(
        gate.started.load(Ordering::SeqCst),
        1,
        "the fetch is under way"
    );
    cache.forget_identity(id);
    let got = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("answered at once");
    assert!(matches!(got, Err(ReadError::Unavailable(ref m)) if m.contains("forgotten")));
    *gate.open.lock() = true;
    gate.opened.notify_all();
    assert!(gate.inner.wait_calls(1));
    assert!(cache.wait_until_settled(Duration::from_secs(10)));
    std::thread::sleep(Duration::from_millis(20));
    assert!(
        !cache.state.lock().entries.contains_key(&k),
        "the late fetch made no entry"
    );
}

#[test]
fn a_refresh_spread_moves_each_tokens_refresh_point_earlier_at_random() {
    let policy = Policy {
        refresh_spread_pct: 50,
        ..Policy::default()
    };
    let (cache, _clock, _source, id) = csi_setup(policy);
    let exact = 1_000_000 + 3_600_000 - 300_000;
    let points: std::collections::BTreeSet<i64> = (0..8)
        .map(|i| {
            let lease = cache
                .read_blocking(&Key::new(id, res(&format!("r{i}"))), Use::Read)
                .unwrap();
            let s = lease.version.schedule;
            assert!(s.refresh_at <= exact && s.refresh_at >= exact - (exact - 1_000_000) / 2);
            assert_eq!(s.valid_until, 1_000_000 + 3_600_000 - policy::MAX_SKEW_MS);
            s.refresh_at
        })
        .collect();
    assert!(points.len() > 1, "fetched in one instant, refreshed apart");
    // Without a spread: the exact point.
    let (plain, _clock, _source) = setup(3_600_000);
    let v = plain.get_blocking(&res("r")).unwrap();
    assert_eq!(v.schedule.refresh_at, exact);
}

#[test]
fn a_refused_name_counts_its_upstream_calls_across_refusals() {
    let (cache, clock, source) = setup(3_600_000);
    source.refuse("bad");
    let calls_of = |cache: &Cache| {
        let status = cache.status();
        let bad = status
            .resources
            .iter()
            .find(|r| r.resource == "bad")
            .expect("the refused name in .status");
        assert_eq!(bad.state, super::status::ResourceState::Refused);
        bad.upstream_calls
    };
    assert!(matches!(
        cache.get_blocking(&res("bad")),
        Err(ReadError::Refused(_))
    ));
    assert_eq!(calls_of(&cache), Some(1));
    // From the negative cache: no call.
    assert!(cache.get_blocking(&res("bad")).is_err());
    assert_eq!(calls_of(&cache), Some(1));
    // Its refusal expired: asked again, refused again, counted on.
    clock.advance(Policy::default().negative_ttl_ms + 1);
    assert!(cache.get_blocking(&res("bad")).is_err());
    assert_eq!(calls_of(&cache), Some(2));
    assert_eq!(source.calls(), 2);
}

#[test]
fn meters_count_requests_refusals_waits_and_evictions() {
    let clock = FakeClock::new(1_000_000);
    let source = FakeSource::new(clock.clone(), 3_600_000);
    let policy = Policy {
        max_resources: 1,
        ..Policy::default()
    };
    let cache = Cache::new(Identities::one(source.clone()), policy, &[], clock.clone());
    source.refuse("nope");
    cache.get_blocking(&res("a")).unwrap();
    assert!(cache.get_blocking(&res("nope")).is_err());
    assert!(cache.get_blocking(&res("nope")).is_err(), "negative cache");
    cache.get_blocking(&res("b")).unwrap(); // evicts a
    let m = cache.meters();
    assert_eq!(m.negative_answers.get(), 1);
    assert_eq!(m.evictions.get(), 1);
    assert_eq!(m.read_wait.count(), 3, "three reads waited for a fetch");
    assert_eq!(m.upstream_latency.count(), 3);
    let requests = m.requests();
    assert_eq!(requests.len(), 1);
    let (id, counts) = &requests[0];
    assert_eq!(*id, IdentityId::DEFAULT);
    let ok = counts[&(meters::Outcome::Ok, Some(200))];
    let refused = counts[&(meters::Outcome::Refused, Some(400))];
    assert_eq!((ok, refused), (2, 1));
    // Held and refused names: only the held one has a series; the refusal is counted.
    let g = cache.gauges();
    assert_eq!(g.refusals, 1);
    let names: Vec<&str> = g.keys.iter().map(|k| k.resource.as_str()).collect();
    assert_eq!(names, ["b"]);
    assert_eq!(g.keys[0].expires_on, Some((1_000_000 + 3_600_000) / 1000));
}

#[test]
fn readiness_waits_for_declared_keys_and_fetches_them() {
    let clock = FakeClock::new(1_000_000);
    let source = FakeSource::new(clock.clone(), 3_600_000);
    let declared = [key("d")];
    let policy = Policy {
        timeout: Duration::from_millis(300),
        ..Policy::default()
    };
    let cache = Cache::new(
        Identities::one(source.clone()),
        policy,
        &declared,
        clock.clone(),
    );
    let why = cache.unready().expect("nothing held yet");
    assert!(why.contains("d holds no valid token"), "{why}");
    assert!(source.wait_calls(1), "the probe asked for it");
    assert!(cache.wait_until_settled(Duration::from_secs(5)));
    assert_eq!(cache.unready(), None);
    // Expired and its fetch failed: not ready, and the probe waits for the backoff.
    source.set_down(true);
    clock.advance(3_600_000);
    assert!(cache.get_blocking(&res("d")).is_err());
    let calls = source.calls();
    assert!(cache.unready().is_some());
    assert!(cache.wait_until_settled(Duration::from_secs(5)));
    assert_eq!(source.calls(), calls, "within its backoff, no new fetch");
    source.set_down(false);
    clock.advance(600_000);
    assert!(cache.unready().is_some());
    assert!(source.wait_calls(calls + 1), "past it, the probe fetches");
    assert!(cache.wait_until_settled(Duration::from_secs(5)));
    assert_eq!(cache.unready(), None);
}

#[test]
fn a_forgotten_identity_takes_its_request_series() {
    let (cache, _clock, source) = setup(3_600_000);
    let id = cache.identities().add(
        "pod".into(),
        crate::source::Identity::default(),
        source.clone(),
    );
    cache
        .read_blocking(&Key::new(id, res("r")), Use::Read)
        .unwrap();
    assert!(cache.meters().requests().iter().any(|(i, _)| *i == id));
    cache.forget_identity(id);
    assert!(cache.meters().requests().iter().all(|(i, _)| *i != id));
}
