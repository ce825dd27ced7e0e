//! The metrics handler driven without a socket: paths, methods, formats, readiness.

use super::*;
use crate::cache::{Identities, IdentityId, Key};
use crate::names::Resource;
use crate::policy::Policy;
use crate::testing::{FakeClock, FakeSource};

fn handler(declared: &[&str]) -> (MetricsHandler, Arc<FakeSource>) {
    let clock = FakeClock::new(1_000_000);
    let source = FakeSource::new(clock.clone(), 3_600_000);
    let keys: Vec<Key> = declared
        .iter()
        .map(|r| Key::new(IdentityId::DEFAULT, Resource::for_test(r)))
        .collect();
    let cache = Cache::new(
        Identities::one(source.clone()),
        Policy::default(),
        &keys,
        clock,
    );
    let h = MetricsHandler {
        registry: registry("mount", cache.clone(), Parts::default()),
        cache,
        serving: Arc::new(AtomicBool::new(false)),
        front_end: "mount",
    };
    (h, source)
}

fn get(path: &str, accept: Option<&str>) -> Request {
    let mut headers = vec![("host".to_string(), "127.0.0.1:9464".to_string())];
    if let Some(a) = accept {
        headers.push(("accept".into(), a.into()));
    }
    Request {
        method: "GET".into(),
        target: path.into(),
        authority: None,
        headers,
        body: Vec::new(),
        peer: None,
        local: "127.0.0.1:9464".parse().unwrap(),
    }
}

fn content_type(r: &Reply) -> &str {
    r.headers
        .iter()
        .find(|(k, _)| k == "Content-Type")
        .map_or("", |(_, v)| v)
}

#[test]
fn both_formats_by_accept() {
    let (h, _) = handler(&[]);
    let text = h.answer(&get("/metrics", None));
    assert_eq!(text.status, 200);
    assert_eq!(
        content_type(&text),
        "text/plain; version=0.0.4; charset=utf-8"
    );
    let body = String::from_utf8(text.body).unwrap();
    assert!(body.contains("# TYPE cstokenfs_upstream_retries_total counter"));
    assert!(body.contains("# TYPE process_open_fds gauge"));
    assert!(!body.contains("# EOF"));
    let accept = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
    let om = h.answer(&get("/metrics?x=1", Some(accept)));
    assert_eq!(
        content_type(&om),
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(String::from_utf8(om.body).unwrap().ends_with("# EOF\n"));
}

#[test]
fn other_paths_and_methods() {
    let (h, _) = handler(&[]);
    assert_eq!(h.answer(&get("/", None)).status, 404);
    assert_eq!(h.answer(&get("/metrics/x", None)).status, 404);
    let mut post = get("/metrics", None);
    post.method = "POST".into();
    let r = h.answer(&post);
    assert_eq!(r.status, 405);
    assert!(r.headers.contains(&("Allow".into(), "GET".into())));
    assert_eq!(h.answer(&get("/healthz", None)).status, 200);
}

#[test]
fn ready_once_serving_and_every_declared_token_is_held() {
    let (h, source) = handler(&["d"]);
    let r = h.answer(&get("/readyz", None));
    assert_eq!(r.status, 503);
    assert_eq!(
        String::from_utf8(r.body).unwrap(),
        "not ready: not mounted yet\n"
    );
    assert_eq!(source.calls(), 0, "nothing asked before the mount is live");
    h.serving.store(true, Ordering::SeqCst);
    let r = h.answer(&get("/readyz", None));
    assert_eq!(r.status, 503);
    assert!(String::from_utf8(r.body)
        .unwrap()
        .contains("d holds no valid token"));
    assert!(source.wait_calls(1));
    assert!(h.cache.wait_until_settled(Duration::from_secs(5)));
    assert_eq!(h.answer(&get("/readyz", None)).status, 200);
    assert_eq!(h.answer(&get("/healthz", None)).status, 200);
}

#[test]
fn any_address_may_be_listened_on() {
    assert!(parse_listen("0.0.0.0:9464").is_ok());
    assert!(parse_listen("[::]:9464").is_ok());
    assert!(parse_listen("127.0.0.1:0").is_ok());
    assert!(parse_listen("9464").unwrap_err().contains("IP:PORT"));
}
