//! Property tests of the pure parts: file names <-> resources (`names`) and the parsing of
//! upstream answers (`source::parse`). No FUSE, no network.
//!
//! Failure persistence is off so that a failing run writes no regression file; a failure
//! prints its minimal input, to be turned into a unit test by hand.

use cstokenfs::rules::{canonical_name, is_guid, resolve, well_known, NAME_MAX};
use cstokenfs::rules::{days_from_civil, error_message, legacy_date, token};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;
use serde_json::{json, Map, Number, Value};
use std::fmt::Write as _;

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------------------
// Strategies: names and resources
// ---------------------------------------------------------------------------------------

/// Any Unicode scalar values, control characters and NUL included.
fn unicode_string(max: usize) -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..max).prop_map(String::from_iter)
}

/// Arbitrary bytes made into a string the way a lossy caller would.
fn lossy_string(max: usize) -> impl Strategy<Value = String> {
    vec(any::<u8>(), 0..max).prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

/// Pieces that exercise every branch of `resolve`: percent escapes (valid, truncated, of
/// control characters, of bad UTF-8), separators, scope suffixes, known hosts, GUIDs.
const FRAGMENTS: &[&str] = &[
    "%",
    "%2",
    "%2F",
    "%2f",
    "%3A",
    "%3a",
    "%2E",
    "%2e",
    "%25",
    "%00",
    "%0A",
    "%1F",
    "%7F",
    "%C2%85",
    "%C2%A0",
    "%C3%A9",
    "%C3",
    "%FF",
    "%E2%80%8B",
    "/",
    "//",
    ".",
    "..",
    ":",
    "://",
    "-",
    "a",
    "Z",
    "0",
    "9",
    "f",
    "F",
    "e",
    "https",
    "https%3A%2F%2F",
    "api://",
    "/.default",
    "%2F.default",
    "%2F%2Edefault",
    "\0",
    "\n",
    "\t",
    "\u{7f}",
    "\u{85}",
    "\u{9f}",
    "é",
    "日本",
    " ",
    "\u{a0}",
    "\u{200b}",
    "?",
    "#",
    "@",
    "~",
    "_",
    "management.azure.com",
    "vault.azure.net",
    "499b84ac-1321-427f-aa17-267ca6975798",
    "x.y",
];

fn fragment_string(max_pieces: usize) -> impl Strategy<Value = String> {
    vec(select(FRAGMENTS), 0..max_pieces).prop_map(|v| v.concat())
}

fn dns_label() -> impl Strategy<Value = String> {
    prop_oneof![
        8 => "[a-zA-Z0-9]([a-zA-Z0-9-]{0,10}[a-zA-Z0-9])?",
        1 => "[a-z0-9]{60,66}",
        1 => select(&["", "-", "-a", "a-", "a_b", "xn--bcher-kva", "é", "A"][..])
            .prop_map(str::to_string),
    ]
}

fn dns_host() -> impl Strategy<Value = String> {
    vec(dns_label(), 1..6).prop_map(|labels| labels.join("."))
}

fn guid() -> impl Strategy<Value = String> {
    "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
}

fn well_known_short() -> impl Strategy<Value = String> {
    select(well_known()).prop_map(|(short, _)| short.to_string())
}

fn well_known_resource() -> impl Strategy<Value = String> {
    (
        select(well_known()),
        select(&["", "/", "/.default", "//", "x"][..]),
    )
        .prop_map(|((_, resource), suffix)| {
            let base = resource.trim_end_matches('/');
            if suffix.is_empty() {
                resource.to_string()
            } else {
                format!("{base}{suffix}")
            }
        })
}

/// Pieces of URI tails: unreserved, reserved, `%`, escapes, Unicode, scope suffixes.
const URI_CLEAN: &[&str] = &[
    "a",
    "b",
    "Z",
    "0",
    "7",
    "-",
    ".",
    "_",
    "~",
    "/",
    "?",
    "=",
    "&",
    "#",
    ":",
    "@",
    "+",
    "!",
    "$",
    "'",
    "(",
    "*",
    ",",
    ";",
    "[",
    "]",
    "%",
    "%41",
    "%2F",
    "é",
    "日",
    "😀",
    "\u{200b}",
    "/.default",
    "management.azure.com",
];

/// What a URI must not contain: whitespace and control characters.
const URI_BAD: &[&str] = &[" ", "\u{a0}", "\u{85}", "\n", "\0", "\u{2028}"];

fn uri_rest(pieces: std::ops::Range<usize>) -> impl Strategy<Value = String> {
    vec(
        prop_oneof![40 => select(URI_CLEAN), 1 => select(URI_BAD)],
        pieces,
    )
    .prop_map(|v| v.concat())
}

fn uri() -> impl Strategy<Value = String> {
    (
        prop_oneof![
            4 => Just("https".to_string()),
            1 => Just("api".to_string()),
            2 => "[a-zA-Z][a-zA-Z0-9+.-]{0,6}",
            1 => "[a-zA-Z0-9+.:-]{0,4}",
        ],
        prop_oneof![3 => uri_rest(0..30), 1 => uri_rest(60..140)],
        select(&["", "", "/", "/.default", "/.default/.default"][..]),
    )
        .prop_map(|(scheme, rest, suffix)| format!("{scheme}://{rest}{suffix}"))
}

/// Pieces of percent-names: raw characters a file name may hold, and escapes.
const NAME_PIECES: &[&str] = &[
    "a",
    "B",
    "0",
    "-",
    ".",
    "_",
    "~",
    ":",
    "@",
    "?",
    "=",
    "&",
    "+",
    "!",
    "é",
    "日",
    "😀",
    "%2F",
    "%2f",
    "%3A",
    "%25",
    "%2F.default",
    "%C3%A9",
];

/// Percent-names of a URI whose length is close to `NAME_MAX`.
fn near_limit_name() -> impl Strategy<Value = String> {
    (
        select(
            &[
                "https%3A%2F%2F",
                "api%3A%2F%2F",
                "https:%2F%2F",
                "x%3a%2f%2f",
            ][..],
        ),
        vec(select(NAME_PIECES), 200),
        200usize..=NAME_MAX,
    )
        .prop_map(|(prefix, pieces, target)| {
            let mut s = prefix.to_string();
            for p in pieces {
                if s.len() + p.len() > target {
                    break;
                }
                s.push_str(p);
            }
            s
        })
}

/// Resources as the cache may hold them.
fn resource() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => well_known_resource(),
        3 => (dns_host(), select(&["", "/", "/x", "/.default", ":443"][..]))
            .prop_map(|(h, s)| format!("https://{h}{s}")),
        2 => guid(),
        1 => (guid(), select(&["/.default", " ", "-0", "x"][..]))
            .prop_map(|(g, s)| format!("{g}{s}")),
        4 => uri(),
        2 => unicode_string(80),
        1 => fragment_string(30),
    ]
}

/// Percent-encodes the chosen characters of `s`, in upper or lower case hex; `%` is always
/// encoded, `/` too when `fuse_safe` (a FUSE lookup never carries one). At least one escape.
fn encode_randomly(s: &str, mask: &[u8], fuse_safe: bool) -> String {
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        let mode = if mask.is_empty() {
            1
        } else {
            mask[i % mask.len()] % 3
        };
        let must = c == '%' || (fuse_safe && c == '/') || (i == 0 && !s.contains('%'));
        if mode == 0 && !must {
            out.push(c);
            continue;
        }
        let mut buf = [0; 4];
        for b in c.encode_utf8(&mut buf).bytes() {
            if mode == 2 {
                write!(out, "%{b:02x}").unwrap();
            } else {
                write!(out, "%{b:02X}").unwrap();
            }
        }
    }
    out
}

/// File names a user or a program might look up.
fn name() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => well_known_short(),
        3 => dns_host(),
        2 => guid(),
        4 => (resource(), vec(any::<u8>(), 1..16), any::<bool>())
            .prop_map(|(r, mask, fuse_safe)| encode_randomly(&r, &mask, fuse_safe)),
        2 => resource().prop_filter_map("not listable", |r| canonical_name(&r)),
        2 => near_limit_name(),
        3 => fragment_string(40),
        1 => fragment_string(120),
        1 => unicode_string(40),
    ]
}

/// A name as FUSE can hand it over: one path component, no NUL.
fn fuse_name() -> impl Strategy<Value = String> {
    name().prop_filter("FUSE never passes '/' or NUL", |n| {
        !n.contains('/') && !n.contains('\0')
    })
}

fn has_control(s: &str) -> bool {
    s.chars().any(char::is_control)
}

/// One percent-decoding pass, lossy, as a reference independent of the crate's.
fn percent_decode_lossy(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = |b: u8| (b as char).to_digit(16);
            if let (Some(h), Some(l)) = (
                bytes.get(i + 1).copied().and_then(hex),
                bytes.get(i + 2).copied().and_then(hex),
            ) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Checks everything a listed name must satisfy for `resource`.
fn check_listing(resource: &str, n: &str) -> Result<(), TestCaseError> {
    prop_assert!(!n.is_empty(), "empty name for {resource:?}");
    prop_assert!(n.len() <= NAME_MAX, "{} bytes: {n:?}", n.len());
    prop_assert!(!n.contains('/'), "'/' in {n:?}");
    prop_assert!(!n.contains('\0'), "NUL in {n:?}");
    prop_assert!(n != "." && n != "..", "{n:?}");
    prop_assert!(!n.starts_with('.'), "hidden name {n:?}");
    prop_assert!(!has_control(n), "control character in {n:?}");
    prop_assert_eq!(
        resolve(n).map(String::from),
        Ok(resource.to_string()),
        "name {:?}",
        n
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// 1-4: names
// ---------------------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(2000))]

    /// 1. `resolve` and `canonical_name` never panic, and what `resolve` returns is a
    /// non-empty resource without control characters.
    #[test]
    fn resolve_never_panics(
        s in prop_oneof![
            unicode_string(300),
            lossy_string(300),
            fragment_string(60),
            fragment_string(150),
            name(),
        ]
    ) {
        if let Ok(r) = resolve(&s) {
            prop_assert!(!r.is_empty());
            prop_assert!(!has_control(&r), "{s:?} -> {r:?}");
            prop_assert_eq!(resolve(&s), Ok(r), "not deterministic");
        }
        let _ = canonical_name(&s);
        let _ = is_guid(&s);
    }

    /// 2. A listed name is one safe path component that resolves back to its resource.
    #[test]
    fn listed_names_are_safe_and_round_trip(r in resource()) {
        if let Some(n) = canonical_name(&r) {
            check_listing(&r, &n)?;
        }
    }

    /// 2, for the resources that must be listed: well-known ones, https + DNS names, GUIDs.
    #[test]
    fn plain_resources_are_always_listed(
        r in prop_oneof![
            select(well_known()).prop_map(|(_, r)| r.to_string()),
            "[a-z0-9]{1,20}(\\.[a-z0-9]{1,20}){1,4}".prop_map(|h| format!("https://{h}")),
            guid(),
        ]
    ) {
        let n = canonical_name(&r);
        prop_assert!(n.is_some(), "{r:?} is not listed");
        check_listing(&r, &n.unwrap())?;
    }

    /// 3. Whatever FUSE can read, it can list: the listing name of a readable name's
    /// resource resolves to the same resource.
    #[test]
    fn readable_names_are_listable(n in fuse_name()) {
        if let Ok(r) = resolve(&n) {
            let listed = canonical_name(&r);
            prop_assert!(listed.is_some(), "{n:?} reads {r:?}, which has no listing name");
            check_listing(&r, &listed.unwrap())?;
        }
    }

    /// 3, for names that are not path components (`--resource` arguments may contain '/').
    #[test]
    fn resolvable_arguments_are_listable(n in name()) {
        // Genuinely unlistable: a raw '/' costs 3 bytes ("%2F") in any one-component name,
        // so an argument with raw '/' may be too long to list. Only those are skipped.
        if n.len() + 2 * n.matches('/').count() > NAME_MAX {
            return Ok(());
        }
        if let Ok(r) = resolve(&n) {
            let listed = canonical_name(&r);
            prop_assert!(listed.is_some(), "{n:?} reads {r:?}, which has no listing name");
            check_listing(&r, &listed.unwrap())?;
        }
    }

    /// 4. Reserved, empty, overlong and control-character names never resolve.
    #[test]
    fn invalid_names_are_rejected(s in prop_oneof![unicode_string(300), fragment_string(150), name()]) {
        let must_fail = s.is_empty()
            || s.starts_with('.')
            || s.len() > NAME_MAX
            || has_control(&s)
            || (s.contains('%') && has_control(&percent_decode_lossy(&s)));
        if must_fail {
            prop_assert!(resolve(&s).is_err(), "{s:?} -> {:?}", resolve(&s));
        }
    }
}

proptest! {
    #![proptest_config(config(1000))]

    /// 4, constructed: a valid name made invalid in each way.
    #[test]
    fn spoiled_names_are_rejected(
        n in prop_oneof![well_known_short(), dns_host(), guid(), resource().prop_filter_map("", |r| canonical_name(&r))],
        how in 0..5u8,
        at in any::<prop::sample::Index>(),
        control in prop_oneof![0u32..0x20, Just(0x7f), 0x80u32..0xa0].prop_map(|c| char::from_u32(c).unwrap()),
        percent_upper in any::<bool>(),
        tail in "[a-zA-Z0-9.%-]{0,40}",
    ) {
        let cut = |s: &str| {
            let i = at.index(s.len() + 1);
            (0..=i).rev().find(|&i| s.is_char_boundary(i)).unwrap_or(0)
        };
        let spoiled = match how {
            0 => format!(".{n}"),
            1 => String::new(),
            2 => {
                let mut s = n.clone();
                while s.len() <= NAME_MAX {
                    s.push_str(&tail);
                    s.push_str(&n);
                    s.push('a');
                }
                s
            }
            3 => {
                let i = cut(&n);
                format!("{}{control}{}", &n[..i], &n[i..])
            }
            _ => {
                let mut buf = [0; 4];
                let esc: String = control
                    .encode_utf8(&mut buf)
                    .bytes()
                    .map(|b| if percent_upper { format!("%{b:02X}") } else { format!("%{b:02x}") })
                    .collect();
                let i = cut(&n);
                format!("{}{esc}{}", &n[..i], &n[i..])
            }
        };
        prop_assert!(resolve(&spoiled).is_err(), "{spoiled:?} -> {:?}", resolve(&spoiled));
    }
}

// ---------------------------------------------------------------------------------------
// 5: the token parser
// ---------------------------------------------------------------------------------------

fn json_string() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => unicode_string(12),
        1 => select(&[
            "", "access_token", "accessToken", "expires_on", "expires_in", "refresh_in",
            "token_type", "tokenType", "error", "message", "Bearer", "60", " 60 ", "-1",
            "1/16/2020 5:24:12 AM +00:00", "06/20/2019 02:57:58 +00:00",
        ][..])
            .prop_map(str::to_string),
    ]
}

/// Numbers around every boundary `seconds` and the expiry arithmetic care about.
fn interesting_i64() -> impl Strategy<Value = i64> {
    const K: i64 = i64::MAX / 1000;
    prop_oneof![
        -10i64..100_000,
        1_500_000_000i64..4_000_000_000,
        (K - 10_000_000_000)..=(K + 10),
        select(&[0, 1, -1, K, K + 1, i64::MAX, i64::MIN, i64::MIN + 1][..]),
        any::<i64>(),
    ]
}

fn json_number() -> impl Strategy<Value = Value> {
    prop_oneof![
        interesting_i64().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        select(
            &[
                0.0,
                -0.0,
                0.5,
                59.9,
                -1.5,
                1e15,
                9.3e15,
                1e300,
                -1e300,
                f64::MAX
            ][..]
        )
        .prop_map(|f| Value::Number(Number::from_f64(f).unwrap())),
        any::<f64>().prop_filter_map("not finite", |f| Number::from_f64(f).map(Value::Number)),
    ]
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        json_number(),
        json_string().prop_map(Value::String),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    json_leaf().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            vec(inner.clone(), 0..4).prop_map(Value::Array),
            vec((json_string(), inner), 0..5)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Values for the token's own fields: everything `seconds` and `legacy_date` might see.
fn field_value() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => json_number(),
        2 => interesting_i64().prop_map(|n| Value::String(n.to_string())),
        1 => (interesting_i64(), select(&[" ", "\t", "\n", ""][..]))
            .prop_map(|(n, w)| Value::String(format!("{w}{n}{w}"))),
        2 => legacy_date_like().prop_map(Value::String),
        1 => valid_legacy_date().prop_map(|(s, _)| Value::String(s)),
        1 => local_datetime_like().prop_map(Value::String),
        2 => json_value(),
    ]
}

/// The Azure CLI's `expiresOn` shape (`YYYY-MM-DD HH:MM:SS.ffffff`), numbers from anywhere.
fn local_datetime_like() -> impl Strategy<Value = String> {
    (
        vec(legacy_number(), 6),
        select(&["", ".000000", ".5", "."][..]),
        select(&[" ", "  ", "T"][..]),
    )
        .prop_map(|(n, frac, sep)| {
            format!(
                "{}-{}-{}{sep}{}:{}:{}{frac}",
                n[0], n[1], n[2], n[3], n[4], n[5]
            )
        })
}

/// What `access_token` holds in a generated answer.
#[derive(Debug, Clone)]
enum Tok {
    /// The distinctive secret of the case.
    Secret,
    Empty,
    Other(Value),
    Absent,
}

fn tok_choice() -> impl Strategy<Value = Tok> {
    prop_oneof![
        6 => Just(Tok::Secret),
        1 => Just(Tok::Empty),
        2 => json_value().prop_map(Tok::Other),
        1 => Just(Tok::Absent),
    ]
}

fn secret() -> impl Strategy<Value = String> {
    "[a-zA-Z0-9]{20}".prop_map(|s| format!("tok{s}"))
}

fn tok_value(t: &Tok, secret: &str) -> Option<Value> {
    match t {
        Tok::Secret => Some(Value::String(secret.to_string())),
        Tok::Empty => Some(Value::String(String::new())),
        Tok::Other(v) => Some(v.clone()),
        Tok::Absent => None,
    }
}

fn requested_at() -> impl Strategy<Value = i64> {
    prop_oneof![
        Just(0i64),
        1_600_000_000_000i64..4_102_444_800_000,
        0i64..1_000_000,
    ]
}

/// Checks the parser's promises on one body whose only secret is `secret`.
fn check_token(body: &[u8], at: i64, secret: &str) -> Result<Option<String>, TestCaseError> {
    match token(body, at) {
        Ok(t) => {
            prop_assert!(!t.access_token.is_empty());
            prop_assert!(!format!("{t:?}").contains(secret), "Debug shows the token");
            Ok(Some(t.access_token.to_string()))
        }
        Err(e) => {
            let e = e.to_string();
            prop_assert!(!e.is_empty());
            prop_assert!(
                !e.contains(secret),
                "the error ({} chars) shows the token (not shown)",
                e.len()
            );
            Ok(None)
        }
    }
}

proptest! {
    #![proptest_config(config(1500))]

    /// 5. Arbitrary bytes: never a panic; an Ok always carries a token.
    #[test]
    fn token_never_panics_on_bytes(body in vec(any::<u8>(), 0..400), at in requested_at()) {
        if let Ok(t) = token(&body, at) {
            prop_assert!(!t.access_token.is_empty());
        }
    }

    /// 5. Arbitrary JSON documents, objects or not.
    #[test]
    fn token_never_panics_on_json(v in json_value(), at in requested_at()) {
        let body = serde_json::to_vec(&v).unwrap();
        if let Ok(t) = token(&body, at) {
            prop_assert!(!t.access_token.is_empty());
        }
    }

    /// 5. Token-shaped objects with every field of a random type: no panic; an Ok carries
    /// exactly the token of the answer (`access_token` before `accessToken`); no error
    /// string quotes it.
    #[test]
    fn token_fields_of_any_type(
        secret in secret(),
        access in tok_choice(),
        camel in prop::option::weighted(0.2, tok_choice()),
        expires_on in prop::option::weighted(0.6, field_value()),
        expires_in in prop::option::weighted(0.6, field_value()),
        refresh_in in prop::option::weighted(0.4, field_value()),
        token_type in prop::option::weighted(0.4, field_value()),
        camel_fields in (
            prop::option::weighted(0.3, field_value()),
            prop::option::weighted(0.2, field_value()),
        ),
        extra in prop::option::weighted(0.3, (json_string(), json_value())),
        at in requested_at(),
    ) {
        let mut obj = Map::new();
        if let Some((k, v)) = extra {
            obj.insert(k, v);
        }
        if let Some(v) = tok_value(&access, &secret) {
            obj.insert("access_token".into(), v);
        }
        if let Some(v) = camel.as_ref().and_then(|c| tok_value(c, &secret)) {
            obj.insert("accessToken".into(), v);
        }
        for (k, v) in [
            ("expires_on", expires_on),
            ("expires_in", expires_in),
            ("refresh_in", refresh_in),
            ("token_type", token_type),
            ("expiresOn", camel_fields.0),
            ("tokenType", camel_fields.1),
        ] {
            if let Some(v) = v {
                obj.insert(k.into(), v);
            }
        }
        let first = obj.get("access_token").or_else(|| obj.get("accessToken")).cloned();
        let body = serde_json::to_vec(&Value::Object(obj)).unwrap();
        if let Some(got) = check_token(&body, at, &secret)? {
            prop_assert_eq!(Some(Value::String(got)), first);
        }
    }

    /// 5. A valid token next to a broken field: an error that never names the token.
    #[test]
    fn broken_answers_never_leak_the_token(
        secret in secret(),
        camel in any::<bool>(),
        broken in 0..8u8,
        junk in prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            Just(json!([])),
            Just(json!({})),
            Just(json!(-5)),
            Just(json!(-1.5)),
            Just(json!(1e300)),
            "[a-zA-Z ]{1,12}".prop_map(Value::String),
            Just(json!("1/16/2020 25:00:00 +00:00")),
            Just(json!("13/16/2020 5:00:00 AM +00:00")),
        ],
        cut in any::<prop::sample::Index>(),
        at in requested_at(),
    ) {
        let key = if camel { "accessToken" } else { "access_token" };
        let secret_v = json!(secret);
        let body = match broken {
            // expires_on unreadable and no expires_in
            0 => json!({ key: secret_v, "expires_on": junk }),
            // expires_in unreadable (expires_on absent or unreadable too)
            1 => json!({ key: secret_v, "expires_in": junk }),
            2 => json!({ key: secret_v, "expires_on": junk, "expires_in": "never" }),
            // neither expiry; the secret also in fields that are not the token
            3 => json!({ key: secret_v, "token_type": secret_v, "refresh_in": secret_v }),
            // expiry fields holding the secret itself
            4 => json!({ key: secret_v, "expires_on": secret_v }),
            5 => json!({ key: secret_v, "expires_in": secret_v }),
            // not an object
            6 => json!([{ key: secret_v, "expires_in": 60 }]),
            // truncated: not JSON
            _ => {
                let full = serde_json::to_vec(&json!({ key: secret_v, "expires_in": 60 })).unwrap();
                let n = cut.index(full.len() - 1);
                prop_assert!(check_token(&full[..n], at, &secret)?.is_none(), "{:?}", &full[..n]);
                return Ok(());
            }
        };
        let body = serde_json::to_vec(&body).unwrap();
        let got = check_token(&body, at, &secret)?;
        prop_assert!(got.is_none(), "accepted {}", String::from_utf8_lossy(&body));
    }
}

// ---------------------------------------------------------------------------------------
// 6: App Service's legacy dates
// ---------------------------------------------------------------------------------------

fn is_leap(y: i64) -> bool {
    (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
}

fn days_in_month(y: i64, m: i64) -> i64 {
    match m {
        2 if is_leap(y) => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 by counting: whole years, then whole months (not Hinnant's).
fn reference_days(y: i64, m: i64, d: i64) -> i64 {
    // Leap years in 1..=n.
    let leaps = |n: i64| n / 4 - n / 100 + n / 400;
    let years = 365 * (y - 1970) + leaps(y - 1) - leaps(1969);
    let months: i64 = (1..m).map(|mm| days_in_month(y, mm)).sum();
    years + months + d - 1
}

fn next_day(y: i64, m: i64, d: i64) -> (i64, i64, i64) {
    if d < days_in_month(y, m) {
        (y, m, d + 1)
    } else if m < 12 {
        (y, m + 1, 1)
    } else {
        (y + 1, 1, 1)
    }
}

fn civil_date() -> impl Strategy<Value = (i64, i64, i64)> {
    (1970i64..=9999, 1i64..=12).prop_flat_map(|(y, m)| (Just(y), Just(m), 1..=days_in_month(y, m)))
}

/// A valid legacy date string and its instant in ms, computed independently of the crate.
fn valid_legacy_date() -> impl Strategy<Value = (String, i64)> {
    (
        civil_date(),
        (0i64..24, 0i64..60, 0i64..=60),
        (0u8..4, select(&["AM", "am", "Am", "aM"][..]), any::<bool>()),
        (any::<bool>(), 0i64..=14, 0i64..60),
        (any::<[bool; 6]>(), select(&[" ", "  ", "\t", " \t "][..])),
    )
        .prop_map(
            |((y, mo, d), (h, mi, s), (clock, am, pad_offset), (east, oh, om), (pad, sep))| {
                let p = |on: bool, v: i64| if on { format!("{v:02}") } else { v.to_string() };
                let date = format!("{}/{}/{y}", p(pad[0], mo), p(pad[1], d));
                // clock 0: 24-hour; else 12-hour with AM/PM.
                let (time, ampm) = if clock == 0 {
                    (
                        format!("{}:{}:{}", p(pad[2], h), p(pad[3], mi), p(pad[4], s)),
                        None,
                    )
                } else {
                    let h12 = if h % 12 == 0 { 12 } else { h % 12 };
                    let ap = if h < 12 {
                        am.to_string()
                    } else {
                        am.replace('A', "P").replace('a', "p")
                    };
                    (
                        format!("{}:{}:{}", p(pad[2], h12), p(pad[3], mi), p(pad[4], s)),
                        Some(ap),
                    )
                };
                let offset = format!(
                    "{}{}:{}",
                    if east { '+' } else { '-' },
                    p(pad_offset || pad[5], oh),
                    p(true, om)
                );
                let text = match ampm {
                    Some(ap) => format!("{date}{sep}{time}{sep}{ap}{sep}{offset}"),
                    None => format!("{date}{sep}{time}{sep}{offset}"),
                };
                let offset_secs = (oh * 3600 + om * 60) * if east { 1 } else { -1 };
                let secs = reference_days(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s - offset_secs;
                (text, secs * 1000)
            },
        )
}

fn legacy_number() -> impl Strategy<Value = String> {
    prop_oneof![
        0i64..100,
        1960i64..10_010,
        any::<i64>(),
        select(
            &[
                i64::MAX,
                i64::MIN,
                -1,
                0,
                12,
                13,
                14,
                15,
                24,
                31,
                32,
                60,
                61
            ][..]
        ),
    ]
    .prop_map(|n| n.to_string())
}

/// The legacy shape with numbers from anywhere (negative, huge, signed) and stray words.
fn legacy_date_like() -> impl Strategy<Value = String> {
    prop_oneof![
        (
            vec(legacy_number(), 8),
            select(&["", "", "AM", "PM", "pm", "XM"][..]),
            select(&["+", "-", "", "+-"][..]),
        )
            .prop_map(|(n, ap, sign)| {
                format!(
                    "{}/{}/{} {}:{}:{} {ap} {sign}{}:{}",
                    n[0], n[1], n[2], n[3], n[4], n[5], n[6], n[7]
                )
            }),
        (
            vec(legacy_number(), 9),
            vec(select(&["/", ":", " ", "", "+", "-", "/+", "::"][..]), 2),
            select(&["", "AM", "PM", "+00:00", "-14:59", "+15:00", "+1:2:3", "Z"][..]),
        )
            .prop_map(|(n, sep, w)| {
                format!(
                    "{}/{}/{} {}:{}:{} {w} {}{}:{}{}{}",
                    n[0], n[1], n[2], n[3], n[4], n[5], sep[0], n[6], n[7], sep[1], n[8]
                )
            }),
    ]
}

proptest! {
    #![proptest_config(config(2000))]

    /// 6. Never a panic, whatever the text.
    #[test]
    fn legacy_date_never_panics(
        s in prop_oneof![unicode_string(60), lossy_string(60), legacy_date_like()]
    ) {
        if let Some(ms) = legacy_date(&s) {
            // 1970-01-01 -14:00 .. 9999-12-31 23:59:60 +14:00
            let lo = -14 * 3_600_000;
            let hi = (reference_days(10_000, 1, 1) * 86_400 + 14 * 3600) * 1000;
            prop_assert!((lo..=hi).contains(&ms), "{s:?} -> {ms}");
        }
    }

    /// 6. Every valid date, in each spelling, is the instant the reference computes.
    #[test]
    fn legacy_date_matches_reference((s, expected) in valid_legacy_date()) {
        prop_assert_eq!(legacy_date(&s), Some(expected), "{:?}", s);
    }

    /// 6. `days_from_civil` agrees with the reference and steps one day at a time.
    #[test]
    fn days_from_civil_is_consistent((y, m, d) in civil_date()) {
        prop_assert_eq!(days_from_civil(y, m, d), reference_days(y, m, d));
        let (ny, nm, nd) = next_day(y, m, d);
        prop_assert_eq!(days_from_civil(ny, nm, nd) - days_from_civil(y, m, d), 1);
        if ny <= 9999 {
            let a = legacy_date(&format!("{m}/{d}/{y} 12:00:00 +00:00")).unwrap();
            let b = legacy_date(&format!("{nm}/{nd}/{ny} 12:00:00 +00:00")).unwrap();
            prop_assert_eq!(b - a, 86_400_000);
        }
    }
}

#[test]
fn days_from_civil_fixed_points() {
    assert_eq!(days_from_civil(1970, 1, 1), 0);
    assert_eq!(days_from_civil(2000, 3, 1), 11_017);
    assert_eq!(reference_days(2000, 3, 1), 11_017);
    assert_eq!(
        legacy_date("1/16/2020 5:24:12 AM +00:00"),
        Some(1_579_152_252_000)
    );
    assert_eq!(
        legacy_date("12/31/9999 11:59:59 PM +00:00"),
        Some(253_402_300_799_000)
    );
}

// ---------------------------------------------------------------------------------------
// 7: error bodies
// ---------------------------------------------------------------------------------------

fn is_json_object(body: &[u8]) -> bool {
    matches!(serde_json::from_slice::<Value>(body), Ok(Value::Object(_)))
}

proptest! {
    #![proptest_config(config(2000))]

    /// 7. Any body: never a panic, never empty; a body that is not a JSON object (hence no
    /// upstream words to quote) gives at most 200 characters without control characters.
    #[test]
    fn error_message_of_any_body(
        body in prop_oneof![
            vec(any::<u8>(), 0..1200),
            unicode_string(600).prop_map(String::into_bytes),
            fragment_string(200).prop_map(String::into_bytes),
            json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
        ]
    ) {
        let m = error_message(&body);
        prop_assert!(!m.is_empty());
        if !is_json_object(&body) {
            prop_assert!(!has_control(&m), "{m:?}");
            prop_assert!(m.chars().count() <= 200, "{} chars", m.chars().count());
            prop_assert!(m.len() <= 800);
            prop_assert_eq!(m.trim(), m.as_str());
        }
    }
}

fn error_field() -> impl Strategy<Value = Value> {
    prop_oneof![
        2 => json_value(),
        1 => Just(json!("")),
        2 => json_string().prop_map(Value::String),
    ]
}

proptest! {
    #![proptest_config(config(800))]

    /// 7. The three upstream error shapes, with fields of any type: never a panic or empty.
    #[test]
    fn error_message_of_error_shapes(
        code in error_field(),
        msg in error_field(),
        shape in 0..3u8,
    ) {
        let body = match shape {
            0 => json!({ "error": { "code": code, "message": msg } }),
            1 => json!({ "error": code, "error_description": msg }),
            _ => json!({ "statusCode": code, "message": msg }),
        };
        let m = error_message(&serde_json::to_vec(&body).unwrap());
        prop_assert!(!m.is_empty());
        if let (Value::String(c), Value::String(t)) = (&code, &msg) {
            let expected = match shape {
                0 | 1 if !c.is_empty() && !t.is_empty() => format!("{c}: {t}"),
                0 | 1 if !c.is_empty() => c.clone(),
                0 | 1 if !t.is_empty() => t.clone(),
                0 | 1 => "no message in the answer".to_string(),
                _ if t.is_empty() => "no message in the answer".to_string(),
                _ => t.clone(),
            };
            // What reaches logs is one line: control characters blanked, at most 300
            // characters, trimmed, never empty.
            // Redacted first: an error body never carries a credential into a log.
            let expected = cstokenfs::rules::redact(&expected);
            let line: String = expected.chars().map(|c| if c.is_control() { ' ' } else { c }).take(300).collect();
            let line = match line.trim() {
                "" => "no message in the answer".to_string(),
                l => l.to_string(),
            };
            prop_assert_eq!(m, line);
        }
    }
}

// ---------------------------------------------------------------------------------------
// Counterexamples the properties found, pinned as plain tests (minimal inputs)
// ---------------------------------------------------------------------------------------

/// `readable_names_are_listable`: a 255-byte name keeps ':' (or any non-ASCII character)
/// raw; the listing encodes it ("%3A", 2 more bytes), so the resource is readable but
/// `canonical_name` gives `None` and `ls` never shows it.
#[test]
fn regression_long_readable_name_is_listed() {
    for n in [
        format!("https:%2F%2F{}", "a".repeat(243)),
        format!("https%3A%2F%2F{}\u{e9}", "a".repeat(239)),
    ] {
        assert_eq!(n.len(), NAME_MAX);
        let r = resolve(&n).unwrap();
        let listed = canonical_name(&r);
        assert!(listed.is_some(), "{n:?} is readable, {r:?} is not listed");
        assert_eq!(resolve(&listed.unwrap()).unwrap(), r);
    }
}

/// `readable_names_are_listable`: the scope of a scope reads `https://x/.default`, whose
/// percent-encoded listing name resolves (one `/.default` stripped) to `https://x` instead.
#[test]
fn regression_scope_of_a_scope_is_listed() {
    let n = "https%3A%2F%2Fx%2F.default%2F.default";
    let r = resolve(n).unwrap();
    assert_eq!(r, "https://x", "every /.default is stripped");
    let listed = canonical_name(&r);
    assert!(listed.is_some(), "{n:?} is readable, {r:?} is not listed");
    assert_eq!(resolve(&listed.unwrap()).unwrap(), r);
}

/// `token_fields_of_any_type`: `requested_at + secs * 1000` overflows (a panic in debug
/// builds, a wrapped negative expiry in release) for an `expires_in` that `seconds` accepts.
#[test]
fn regression_huge_expires_in_does_not_overflow() {
    let at = 1_600_000_000_000;
    let body = br#"{"access_token":"x","expires_in":9223372036854775}"#;
    if let Ok(t) = token(body, at) {
        assert!(t.expires_on >= at, "expiry wrapped to {}", t.expires_on);
    }
}

/// `legacy_date_never_panics`: `utc_offset` multiplies hours and minutes before checking them
/// (`then_some` evaluates its argument eagerly): a panic in debug builds.
#[test]
fn regression_huge_utc_offset_does_not_overflow() {
    assert_eq!(legacy_date("1/1/2000 0:0:0 +2562047788015216:00"), None);
    assert_eq!(legacy_date("1/1/2000 0:0:0 +0:153722867280912931"), None);
}

/// `error_message_of_error_shapes`: App Service's shape with an empty message gives an
/// empty string, where the other shapes say "no message in the answer".
#[test]
fn regression_empty_message_is_not_empty() {
    assert!(!error_message(br#"{"message":""}"#).is_empty());
}
