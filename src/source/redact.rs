//! Redaction of upstream text (error bodies, `az`'s stderr, transport errors) before it
//! reaches a log, an error message, `.status` or an HTTP reply: the one place such text
//! passes. First every credential the daemon holds goes, in every form it could be echoed
//! in (`crate::known::scrub`); then whatever looks like a credential:
//!
//! - a word holding `eyJ` (the start of every base64url JSON header, so of every JWT) or
//!   shaped like a JWT (three or more base64url segments joined by dots, one of them long);
//! - the value of `access_token`, `refresh_token`, `id_token`, `client_secret`,
//!   `client_assertion`, `X-IDENTITY-HEADER`, `IDENTITY_HEADER`, `password` and any `secret`,
//!   written `key=value`, `key: value`, `key = value` or JSON `"key": "value"`;
//! - the word after `Bearer` (any case).
//!
//! Last, what could forge or hide log text is escaped: control characters but space and tab
//! (a line break would start a fake log line) and bidi or invisible characters
//! (`crate::names::is_unprintable`) become `\u{..}`.

use crate::known::HIDDEN;
const SECRET_KEYS: [&str; 9] = [
    "access_token",
    "refresh_token",
    "id_token",
    "client_secret",
    "client_assertion",
    "x-identity-header",
    "identity_header",
    "password",
    "secret",
];
/// A JWT-like word has at least one dot-separated segment this long.
const LONG_SEGMENT: usize = 20;

/// What the next word is, given the words before it.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Next {
    Plain,
    /// A secret's value (after `key=`, `key:`, `"key": ` or `Bearer`).
    Value,
    /// A secret's key ended the word, no separator yet (`access_token = x`).
    Key,
}

/// `text` without any credential the daemon holds or any credential-like word (each
/// replaced by `<redacted>`), its unprintable characters escaped; white space is kept.
pub fn redact(text: &str) -> String {
    crate::names::escape_unprintable(&by_pattern(&crate::known::scrub(text)))
}

/// `text` with every credential-like word replaced by `<redacted>`; white space is kept.
fn by_pattern(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut next = Next::Plain;
    for piece in text.split_inclusive(char::is_whitespace) {
        let word = piece.trim_end_matches(char::is_whitespace);
        let space = &piece[word.len()..];
        if word.is_empty() {
            out.push_str(space);
            continue;
        }
        let seps = word.bytes().take_while(|b| is_separator(*b)).count();
        let has_sep = word[..seps].contains(['=', ':']);
        match next {
            Next::Value if seps == word.len() => {}
            Next::Value => {
                out.push_str(HIDDEN);
                next = Next::Plain;
                out.push_str(space);
                continue;
            }
            Next::Key if has_sep && seps == word.len() => {
                out.push_str(word);
                out.push_str(space);
                next = Next::Value;
                continue;
            }
            Next::Key if has_sep => {
                out.push_str(&word[..seps]);
                out.push_str(HIDDEN);
                out.push_str(space);
                next = Next::Plain;
                continue;
            }
            Next::Key | Next::Plain => next = Next::Plain,
        }
        let bare = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
        if next == Next::Value {
            // Only separators while a value is awaited: keep waiting.
            out.push_str(word);
        } else if bare.eq_ignore_ascii_case("bearer") {
            out.push_str(word);
            next = Next::Value;
        } else if word.contains("eyJ") || jwt_shaped(bare) {
            out.push_str(HIDDEN);
        } else {
            let (shown, after) = hide_values(word);
            out.push_str(&shown);
            next = after;
        }
        out.push_str(space);
    }
    out
}

fn is_separator(b: u8) -> bool {
    matches!(b, b'"' | b'\'' | b'=' | b':')
}

fn jwt_shaped(word: &str) -> bool {
    let segments: Vec<&str> = word.split('.').collect();
    segments.len() >= 3
        && segments.iter().all(|s| {
            s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        && segments.iter().any(|s| s.len() >= LONG_SEGMENT)
}

/// Replaces the value after each secret key in `word`; says what the next word is when a
/// key (or a key and its separator) ends the word.
fn hide_values(word: &str) -> (String, Next) {
    let lower = word.to_ascii_lowercase();
    let mut out = String::with_capacity(word.len());
    let mut at = 0;
    while let Some((start, key)) = SECRET_KEYS
        .iter()
        .filter_map(|k| lower[at..].find(k).map(|i| (at + i, *k)))
        .min_by_key(|(i, key)| (*i, usize::MAX - key.len()))
    {
        let after_key = start + key.len();
        // Quotes around the key, then `=` or `:` (and quotes): the separator.
        let seps = word[after_key..]
            .bytes()
            .take_while(|b| is_separator(*b))
            .count();
        let separator = &word[after_key..after_key + seps];
        if !separator.contains(['=', ':']) {
            if after_key + seps == word.len() {
                // `"access_token"` then ` : value`: the separator comes in the next word.
                out.push_str(&word[at..]);
                return (out, Next::Key);
            }
            // The key's name alone (`grant_type=refresh_token&...`): nothing to hide.
            out.push_str(&word[at..after_key]);
            at = after_key;
            continue;
        }
        let value_start = after_key + seps;
        out.push_str(&word[at..value_start]);
        at = value_start;
        if at == word.len() {
            return (out, Next::Value);
        }
        // The value runs to the next delimiter; what follows may name another secret.
        let value_len = word[at..]
            .find(['&', '"', '\'', ',', ';', '}', ')'])
            .unwrap_or(word.len() - at);
        out.push_str(HIDDEN);
        at += value_len;
    }
    out.push_str(&word[at..]);
    (out, Next::Plain)
}

#[cfg(test)]
mod tests {
    use super::redact;

    const JWT: &str =
        "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOiJodHRwczovL21hbmFnZW1lbnQifQ.c2lnbmF0dXJlc2lnbmF0dXJl";

    #[test]
    fn jwts_and_jwt_shaped_words_go() {
        assert_eq!(
            redact(&format!("bad token {JWT} here")),
            "bad token <redacted> here"
        );
        assert_eq!(
            redact("x abcdefghijklmnopqrstuvwxyz.abc.def y"),
            "x <redacted> y"
        );
        // Host names and versions stay.
        assert_eq!(
            redact("https://management.azure.com/ failed, az 2.61.0"),
            "https://management.azure.com/ failed, az 2.61.0"
        );
    }

    #[test]
    fn secret_values_go_in_every_spelling() {
        assert_eq!(
            redact("grant refresh_token=0.AAAA-secret&x=1 failed"),
            "grant refresh_token=<redacted>&x=1 failed"
        );
        assert_eq!(
            redact(r#"{"access_token": "opaque-secret", "expires_in": 5}"#),
            r#"{"access_token": <redacted> "expires_in": 5}"#
        );
        assert_eq!(
            redact(r#"{"refresh_token":"opaque","a":1}"#),
            r#"{"refresh_token":"<redacted>","a":1}"#
        );
        assert_eq!(
            redact("client_secret=abc&client_assertion=def"),
            "client_secret=<redacted>&client_assertion=<redacted>"
        );
        assert_eq!(redact("no refresh_token here"), "no refresh_token here");
        assert_eq!(
            redact("grant_type=refresh_token&refresh_token=0.AAAA-x&y=1"),
            "grant_type=refresh_token&refresh_token=<redacted>&y=1"
        );
        assert_eq!(redact("ACCESS_TOKEN=xyz"), "ACCESS_TOKEN=<redacted>");
    }

    #[test]
    fn the_word_after_bearer_goes() {
        assert_eq!(
            redact("sent Authorization: Bearer opaque123 to x"),
            "sent Authorization: Bearer <redacted> to x"
        );
        assert_eq!(redact("bearer"), "bearer");
        assert_eq!(
            redact(r#"{"access_token" : "opaque", "a": 1}"#),
            r#"{"access_token" : <redacted> "a": 1}"#
        );
        assert_eq!(
            redact("access_token = opaque next"),
            "access_token = <redacted> next"
        );
        assert_eq!(
            redact("access_token =opaque next"),
            "access_token =<redacted> next"
        );
        assert_eq!(
            redact("X-IDENTITY-HEADER: 0123abcd sent"),
            "X-IDENTITY-HEADER: <redacted> sent"
        );
        assert_eq!(redact("no secret here"), "no secret here");
        assert_eq!(redact("a  b\tc "), "a  b\tc ", "white space is kept");
    }

    #[test]
    fn what_could_forge_or_hide_log_text_is_escaped() {
        assert_eq!(redact("bad\nWARN forged line"), "bad\\u{a}WARN forged line");
        assert_eq!(redact("a\u{202E}fdp.exe"), "a\\u{202e}fdp.exe");
        assert_eq!(redact("zero\u{200B}width"), "zero\\u{200b}width");
        assert_eq!(redact("r\u{e9}sum\u{e9} ok"), "r\u{e9}sum\u{e9} ok");
    }
}
