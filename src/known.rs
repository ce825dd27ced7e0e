//! The credentials the daemon holds, known by their bytes: the client secret, the federated
//! assertion and certificate assertions of a fetch, the endpoint's secret, every token held.
//! Each is registered while it is held ([`remember`], dropped with its [`Known`] guard), and
//! [`scrub`] takes every registered one out of a text from outside before it can reach a
//! log line, `.status`, an error message or an HTTP reply: the exact bytes and the forms an
//! upstream could echo them in (percent- and form-encoded, JSON-escaped, base64 in either
//! alphabet, padded or not, at any alignment inside a longer base64 text).
//!
//! `source::redact::redact` calls [`scrub`] first: it is the one place outside text passes.

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD, URL_SAFE, URL_SAFE_NO_PAD};
use base64::Engine as _;
use parking_lot::Mutex;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use zeroize::Zeroizing;

/// What a scrubbed credential becomes (the pattern redaction's word too).
pub const HIDDEN: &str = "<redacted>";
/// Shorter credentials are not registered: scrubbing a few bytes would mangle ordinary
/// words, and no credential the daemon holds is that short (secrets are generated or issued
/// with 16 bytes and more).
pub const MIN_LEN: usize = 8;

/// RFC 3986's unreserved characters stay; everything else is encoded (as the Entra and
/// Cloud Shell forms encode).
const UNRESERVED: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// One registered credential. Its forms are many and each as long as the credential (with
/// 1,024 tokens held, tens of MB), so only a short piece of each is kept: the forms are
/// made again, for the one credential, when a text holds one of its pieces.
struct Entry {
    id: u64,
    secret: Zeroizing<String>,
    /// [`ANCHOR`] bytes from the middle of each form (the whole of a shorter one).
    anchors: Vec<Zeroizing<String>>,
}

/// The length of an anchor: long enough that ordinary text never holds one by chance.
const ANCHOR: usize = 16;

/// The registered credentials. A `Mutex`, not a lock-free set: registration happens once
/// per fetched token or assertion, and scrubbing only on the error path. It is held only to
/// add, remove or copy out the entries (never while a text is scanned): a `Known` dropped
/// on a FUSE thread (the last handle of a token version) never waits on a scrub.
static REGISTRY: Mutex<Vec<Arc<Entry>>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// A credential registered for scrubbing; dropping it forgets the credential.
#[must_use = "the credential is forgotten when the guard is dropped"]
pub struct Known {
    id: u64,
}

impl Drop for Known {
    fn drop(&mut self) {
        REGISTRY.lock().retain(|e| e.id != self.id);
    }
}

impl std::fmt::Debug for Known {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Known(#{})", self.id)
    }
}

/// Registers `secret` until the guard is dropped (a no-op for one shorter than [`MIN_LEN`]).
pub fn remember(secret: &str) -> Known {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    if secret.len() >= MIN_LEN {
        let mut anchors: Vec<Zeroizing<String>> = forms_of(secret)
            .iter()
            .map(|f| Zeroizing::new(anchor_of(f).to_string()))
            .collect();
        anchors.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        anchors.dedup();
        let secret = Zeroizing::new(secret.to_string());
        REGISTRY.lock().push(Arc::new(Entry {
            id,
            secret,
            anchors,
        }));
    }
    Known { id }
}

/// `text` with every registered credential, in every form, replaced by [`HIDDEN`].
pub fn scrub(text: &str) -> String {
    let registry: Vec<Arc<Entry>> = REGISTRY.lock().clone();
    let mut out = text.to_string();
    for entry in &registry {
        if !entry.anchors.iter().any(|a| out.contains(a.as_str())) {
            continue;
        }
        for form in forms_of(&entry.secret) {
            if out.contains(form.as_str()) {
                out = out.replace(form.as_str(), HIDDEN);
            }
        }
    }
    out
}

/// [`ANCHOR`] bytes from the middle of `form` (widened to whole characters), or all of it.
fn anchor_of(form: &str) -> &str {
    if form.len() <= ANCHOR {
        return form;
    }
    let mut start = (form.len() - ANCHOR) / 2;
    while !form.is_char_boundary(start) {
        start -= 1;
    }
    let mut end = start + ANCHOR;
    while !form.is_char_boundary(end) {
        end += 1;
    }
    &form[start..end]
}

/// The forms `secret` may come back in, longest first (so a form never leaves a part of a
/// longer one behind), without duplicates.
fn forms_of(secret: &str) -> Vec<Zeroizing<String>> {
    let mut forms: Vec<Zeroizing<String>> = vec![Zeroizing::new(secret.to_string())];
    for set in [UNRESERVED, NON_ALPHANUMERIC] {
        let percent = Zeroizing::new(utf8_percent_encode(secret, set).to_string());
        forms.push(Zeroizing::new(percent.replace("%20", "+")));
        forms.push(Zeroizing::new(lower_hex_escapes(&percent)));
        forms.push(percent);
    }
    if let Ok(json) = serde_json::to_string(secret) {
        let json = Zeroizing::new(json);
        let inner = &json[1..json.len() - 1];
        forms.push(Zeroizing::new(inner.replace('/', "\\/")));
        forms.push(Zeroizing::new(inner.to_string()));
    }
    for engine in [&STANDARD, &URL_SAFE, &STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
        forms.push(Zeroizing::new(engine.encode(secret)));
    }
    forms.extend(base64_cores(secret.as_bytes()));
    forms.retain(|f| f.len() >= MIN_LEN);
    forms.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
    forms.dedup();
    forms
}

/// `%2f` for `%2F`: some encoders write lower-case hex.
fn lower_hex_escapes(percent: &str) -> String {
    let mut out = String::with_capacity(percent.len());
    let mut rest = percent;
    while let Some(at) = rest.find('%') {
        out.push_str(&rest[..at]);
        let escape = rest.get(at..at + 3).unwrap_or(&rest[at..]);
        out.push_str(&escape.to_ascii_lowercase());
        rest = &rest[at + escape.len()..];
    }
    out.push_str(rest);
    out
}

/// The part of a base64 text that is fixed by `secret` alone when it sits at any offset of
/// a longer encoded text: for each of the three alignments, the 4-character groups made only
/// of the secret's bytes (both alphabets).
fn base64_cores(secret: &[u8]) -> Vec<Zeroizing<String>> {
    let mut out = Vec::new();
    for lead in 0..3usize {
        // `lead` unknown bytes before the secret: the first whole group of the secret's own
        // bytes starts after the group they share.
        let skip = (3 - lead) % 3;
        let Some(rest) = secret.get(skip..) else {
            continue;
        };
        let whole = rest.len() / 3 * 3;
        if whole == 0 {
            continue;
        }
        for engine in [&STANDARD_NO_PAD, &URL_SAFE_NO_PAD] {
            out.push(Zeroizing::new(engine.encode(&rest[..whole])));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "Xq8~Q_zK.w3/secret+value=a";

    #[test]
    fn every_form_is_scrubbed_while_held_and_none_after() {
        let known = remember(SECRET);
        let percent = utf8_percent_encode(SECRET, NON_ALPHANUMERIC).to_string();
        let shapes = [
            format!("provided: {SECRET}"),
            format!("client_secret={percent}&x=1"),
            format!("{{\"secret\":{}}}", serde_json::to_string(SECRET).unwrap()),
            format!("b64 {}", STANDARD.encode(SECRET)),
            format!("b64url {}", URL_SAFE_NO_PAD.encode(SECRET)),
            format!("embedded {}", STANDARD.encode(format!("k={SECRET}&more"))),
            format!("lower {}", lower_hex_escapes(&percent)),
            format!("slashes {}", SECRET.replace('/', "\\/")),
        ];
        for shape in &shapes {
            let out = scrub(shape);
            assert!(out.contains(HIDDEN), "shape #{} not scrubbed", shape.len());
            assert!(!out.contains("secret+value"), "a part stayed");
        }
        drop(known);
        assert_eq!(scrub(&shapes[0]), shapes[0], "forgotten once dropped");
    }

    #[test]
    fn short_credentials_are_not_registered() {
        let _k = remember("abc");
        assert_eq!(scrub("abc abc"), "abc abc");
    }

    #[test]
    fn anchors_are_short_pieces_of_whole_characters() {
        assert_eq!(anchor_of("short"), "short");
        assert_eq!(anchor_of(&"a".repeat(40)).len(), ANCHOR);
        let wide = "\u{e9}".repeat(30);
        assert!(anchor_of(&wide).len() >= ANCHOR && wide.contains(anchor_of(&wide)));
    }

    #[test]
    fn forms_are_longest_first() {
        let forms = forms_of(SECRET);
        assert!(forms.windows(2).all(|w| w[0].len() >= w[1].len()));
        assert!(forms.iter().any(|f| f.as_str() == SECRET));
    }
}
