//! Redaction of upstream text (error bodies, `az`'s stderr, transport errors) before it
//! reaches a log, an error message or `.status`: whatever looks like a credential goes.
//!
//! - a word holding `eyJ` (the start of every base64url JSON header, so of every JWT) or
//!   shaped like a JWT (three or more base64url segments joined by dots, one of them long);
//! - the value of `access_token`, `refresh_token`, `id_token`, `client_secret` and
//!   `client_assertion`, written `key=value`, `key: value` or JSON `"key": "value"`;
//! - the word after `Bearer` (any case).

const HIDDEN: &str = "<redacted>";
const SECRET_KEYS: [&str; 5] = [
    "access_token",
    "refresh_token",
    "id_token",
    "client_secret",
    "client_assertion",
];
/// A JWT-like word has at least one dot-separated segment this long.
const LONG_SEGMENT: usize = 20;

/// `text` with every credential-like word replaced by `<redacted>`; white space is kept.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut hide_next = false;
    for piece in text.split_inclusive(char::is_whitespace) {
        let word = piece.trim_end_matches(char::is_whitespace);
        let space = &piece[word.len()..];
        if word.is_empty() {
            out.push_str(space);
            continue;
        }
        let bare = word.trim_matches(|c: char| !c.is_ascii_alphanumeric());
        if hide_next {
            out.push_str(HIDDEN);
            hide_next = false;
        } else if bare.eq_ignore_ascii_case("bearer") {
            out.push_str(word);
            hide_next = true;
        } else if word.contains("eyJ") || jwt_shaped(bare) {
            out.push_str(HIDDEN);
        } else {
            let (shown, dangling) = hide_values(word);
            out.push_str(&shown);
            hide_next = dangling;
        }
        out.push_str(space);
    }
    out
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

/// Replaces the value after each secret key in `word`; `true` when a key ends the word
/// (`"refresh_token":`), so the next word is its value.
fn hide_values(word: &str) -> (String, bool) {
    let lower = word.to_ascii_lowercase();
    let mut out = String::with_capacity(word.len());
    let mut at = 0;
    while let Some((start, key)) = SECRET_KEYS
        .iter()
        .filter_map(|k| lower[at..].find(k).map(|i| (at + i, *k)))
        .min_by_key(|(i, _)| *i)
    {
        let after_key = start + key.len();
        // The separator: `=`, `:`, quotes around the key (spaces are word breaks).
        let sep_len = word[after_key..]
            .bytes()
            .take_while(|b| matches!(b, b'"' | b'\'' | b'=' | b':'))
            .count();
        let value_start = after_key + sep_len;
        out.push_str(&word[at..value_start]);
        at = value_start;
        if sep_len == 0 {
            // The key's name alone (`grant_type=refresh_token&...`): nothing to hide.
            continue;
        }
        if at == word.len() {
            return (out, true);
        }
        // The value runs to the next delimiter; what follows may name another secret.
        let value_len = word[at..]
            .find(['&', '"', '\'', ',', ';', '}', ')'])
            .unwrap_or(word.len() - at);
        out.push_str(HIDDEN);
        at += value_len;
    }
    out.push_str(&word[at..]);
    (out, false)
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
        assert_eq!(redact("a  b\tc "), "a  b\tc ", "white space is kept");
    }
}
