//! Parsing of upstream answers: the token JSON (all upstreams share its shape, with field
//! spellings that differ) and the error bodies of each upstream.

pub use crate::civil::days_from_civil;
use crate::policy::{EpochMs, MAX_LIFETIME_MS};
use crate::token::Token;
use serde_json::{Map, Value};
use std::fmt;
use zeroize::{Zeroize, Zeroizing};

/// Why a 2xx answer is not a usable token. Never carries token bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnswerError {
    NotJson,
    NotObject,
    NoToken,
    TokenNotString,
    EmptyToken,
    /// A byte outside 0x21-0x7E, by its class ("a line break (CR or LF)", ...).
    TokenByte(&'static str),
    /// No expiry field at all.
    NoExpiry,
    /// An expiry field that is not understood.
    BadExpiry(&'static str),
    /// An expiry more than `MAX_LIFETIME_MS` after the request.
    TooFar {
        field: &'static str,
        days: i64,
    },
    /// An expiry before the epoch.
    BeforeEpoch(&'static str),
    /// The token is a JWT whose `exp` is not one number.
    JwtExp(crate::claims::BadExp),
}

impl fmt::Display for AnswerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnswerError::NotJson => f.write_str("the body is not JSON"),
            AnswerError::NotObject => f.write_str("the body is not a JSON object"),
            AnswerError::NoToken => f.write_str("no access_token in the answer"),
            AnswerError::TokenNotString => f.write_str("access_token is not a string"),
            AnswerError::EmptyToken => f.write_str("access_token is empty"),
            AnswerError::TokenByte(class) => write!(
                f,
                "access_token contains {class} (a token is printable ASCII: base64url and dots)"
            ),
            AnswerError::NoExpiry => {
                f.write_str("the answer has neither expires_on nor expires_in")
            }
            AnswerError::BadExpiry("expires_on") => {
                f.write_str("expires_on is neither epoch seconds nor a known date format")
            }
            AnswerError::BadExpiry("expiresOn") => f.write_str("expiresOn is not a date and time"),
            AnswerError::BadExpiry(field) => write!(f, "{field} is not a number of seconds"),
            AnswerError::TooFar { field, days } => write!(
                f,
                "{field} is more than 7 days away ({days} days): not a plausible token expiry (milliseconds instead of seconds?)"
            ),
            AnswerError::BeforeEpoch(field) => write!(f, "{field} is before 1970"),
            AnswerError::JwtExp(crate::claims::BadExp::NotANumber) => {
                f.write_str("the token's exp claim is not a number")
            }
            AnswerError::JwtExp(crate::claims::BadExp::Repeated) => {
                f.write_str("the token's exp claim is given more than once")
            }
        }
    }
}

impl std::error::Error for AnswerError {}

/// Parses a 2xx body into a token. `requested_at` is when the request was sent (wall clock),
/// the base for `expires_in`. The error names what was wrong, never the token.
///
/// What is refused: a token with a byte outside 0x21-0x7E (it would inject headers into
/// `.header` and lines into `.git-credential`), and an expiry more than 7 days after the
/// request. When the token is a JWT with `exp`, the earlier of `exp` and the answer's
/// expiry counts.
pub fn token(body: &[u8], requested_at: EpochMs) -> Result<Token, AnswerError> {
    let parsed: Value = serde_json::from_slice(body).map_err(|_| AnswerError::NotJson)?;
    let mut obj = match parsed {
        Value::Object(obj) => obj,
        _ => return Err(AnswerError::NotObject),
    };
    let token = token_of(&mut obj, requested_at);
    // Whatever else the answer holds (a refresh_token, say) is wiped, not just freed.
    for v in obj.values_mut() {
        if let Value::String(s) = v {
            s.zeroize();
        }
    }
    token
}

fn token_of(obj: &mut Map<String, Value>, requested_at: EpochMs) -> Result<Token, AnswerError> {
    let access_token = take_token(obj)?;
    let token_type = ["token_type", "tokenType"]
        .iter()
        .find_map(|k| obj.get(*k).and_then(Value::as_str))
        .unwrap_or("Bearer")
        .to_string();
    let (answered, field) = expiry(obj, requested_at)?;
    let expires_on = match jwt_exp(&access_token)? {
        Some(exp) if exp < answered => {
            checked_expiry(exp, "exp (the JWT's own claim)", requested_at)?
        }
        _ => checked_expiry(answered, field, requested_at)?,
    };
    let refresh_in_ms = obj.get("refresh_in").and_then(seconds).map(|s| s * 1000);
    let not_before = obj.get("not_before").and_then(seconds).map(|s| s * 1000);
    Ok(Token {
        access_token,
        token_type,
        expires_on,
        refresh_in_ms,
        not_before,
    })
}

/// Moves the token out of the parsed document and wipes the document's copy.
fn take_token(obj: &mut Map<String, Value>) -> Result<Zeroizing<String>, AnswerError> {
    let key = ["access_token", "accessToken"]
        .into_iter()
        .find(|k| obj.contains_key(*k));
    let Some(key) = key else {
        return Err(AnswerError::NoToken);
    };
    let token = match obj.remove(key) {
        Some(Value::String(s)) => Zeroizing::new(s),
        _ => return Err(AnswerError::TokenNotString),
    };
    if token.is_empty() {
        return Err(AnswerError::EmptyToken);
    }
    match token.bytes().find(|b| !(0x21..=0x7e).contains(b)) {
        None => Ok(token),
        Some(b) => Err(AnswerError::TokenByte(byte_class(b))),
    }
}

/// What kind of byte it is, for the log: never the byte itself.
fn byte_class(b: u8) -> &'static str {
    match b {
        b'\r' | b'\n' => "a line break (CR or LF)",
        b' ' | b'\t' => "white space",
        0..=0x1f | 0x7f => "a control character",
        _ => "a non-ASCII byte",
    }
}

/// The `exp` claim of a JWT, in ms: `None` for a token that is not a JWT or has no `exp`
/// (opaque tokens are fine; their answer's expiry counts); an error when `exp` is not one
/// number (the same reading of a JWT as the `.claims` view's).
pub fn jwt_exp(token: &str) -> Result<Option<EpochMs>, AnswerError> {
    let secs = crate::claims::exp(token).map_err(AnswerError::JwtExp)?;
    Ok(secs.and_then(|s| (s.floor() as i64).checked_mul(1000)))
}

/// An expiry at most `MAX_LIFETIME_MS` after the request (so also one RFC 3339 can write).
fn checked_expiry(
    at: EpochMs,
    field: &'static str,
    requested_at: EpochMs,
) -> Result<EpochMs, AnswerError> {
    if at.saturating_sub(requested_at) > MAX_LIFETIME_MS {
        let days = at.saturating_sub(requested_at) / 86_400_000;
        return Err(AnswerError::TooFar { field, days });
    }
    if at < 0 {
        return Err(AnswerError::BeforeEpoch(field));
    }
    Ok(at)
}

/// The answer's expiry and the field it came from.
fn expiry(
    obj: &Map<String, Value>,
    requested_at: EpochMs,
) -> Result<(EpochMs, &'static str), AnswerError> {
    if let Some(v) = obj.get("expires_on") {
        if let Some(secs) = seconds(v) {
            return Ok((secs * 1000, "expires_on"));
        }
        if let Some(ms) = v.as_str().and_then(legacy_date) {
            return Ok((ms, "expires_on"));
        }
        if obj.get("expires_in").is_none() {
            return Err(AnswerError::BadExpiry("expires_on"));
        }
    }
    match obj.get("expires_in") {
        Some(v) => match seconds(v) {
            Some(secs) => requested_at
                .checked_add(secs * 1000)
                .map(|ms| (ms, "expires_in"))
                .ok_or(AnswerError::BadExpiry("expires_in")),
            None => Err(AnswerError::BadExpiry("expires_in")),
        },
        // Older Azure CLIs: `expiresOn` in local time.
        None => match obj.get("expiresOn").and_then(Value::as_str) {
            Some(s) => local_datetime(s)
                .map(|ms| (ms, "expiresOn"))
                .ok_or(AnswerError::BadExpiry("expiresOn")),
            None => Err(AnswerError::NoExpiry),
        },
    }
}

/// A whole number of seconds, as a JSON number or a string of digits.
fn seconds(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) => n.as_i64().or_else(|| n.as_f64().map(|f| f as i64)),
        Value::String(s) => s.trim().parse::<i64>().ok(),
        _ => None,
    }
    .filter(|s| (0..=i64::MAX / 1000).contains(s))
}

/// The App Service 2017-09-01 forms: `1/16/2020 5:24:12 AM +00:00` and
/// `06/20/2019 02:57:58 +00:00` (month/day/year, optional AM/PM, UTC offset).
pub fn legacy_date(s: &str) -> Option<EpochMs> {
    let parts: Vec<&str> = s.split_whitespace().collect();
    let (date, time, ampm, offset) = match parts.as_slice() {
        [d, t, o] => (*d, *t, None, *o),
        [d, t, ap, o] => (*d, *t, Some(*ap), *o),
        _ => return None,
    };
    let dmy: Vec<i64> = date
        .split('/')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let hms: Vec<i64> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let ([month, day, year], [mut hour, minute, second]) = (dmy.as_slice(), hms.as_slice()) else {
        return None;
    };
    let (month, day, year) = (*month, *day, *year);
    match ampm {
        Some(ap) if ap.eq_ignore_ascii_case("AM") && (1..=12).contains(&hour) => hour %= 12,
        Some(ap) if ap.eq_ignore_ascii_case("PM") && (1..=12).contains(&hour) => {
            hour = hour % 12 + 12
        }
        Some(_) => return None,
        None => {}
    }
    let offset_secs = utc_offset(offset)?;
    let valid = (1..=12).contains(&month)
        && (1..=days_in_month(year, month)).contains(&day)
        && (1970..=9999).contains(&year)
        && (0..24).contains(&hour)
        && (0..60).contains(minute)
        && (0..61).contains(second);
    if !valid {
        return None;
    }
    let days = days_from_civil(year, month, day);
    let secs = days * 86_400 + hour * 3600 + minute * 60 + second - offset_secs;
    Some(secs * 1000)
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]` in the machine's local time zone (the Azure CLI's
/// `expiresOn`).
pub fn local_datetime(s: &str) -> Option<EpochMs> {
    let (date, time) = s.trim().split_once(' ')?;
    let ymd: Vec<i32> = date
        .split('-')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let time = time.split('.').next()?;
    let hms: Vec<i32> = time
        .split(':')
        .map(|x| x.parse().ok())
        .collect::<Option<_>>()?;
    let ([y, mo, d], [h, mi, se]) = (ymd.as_slice(), hms.as_slice()) else {
        return None;
    };
    let valid = (1970..=9999).contains(y)
        && (1..=12).contains(mo)
        && (1..=31).contains(d)
        && (0..24).contains(h)
        && (0..60).contains(mi)
        && (0..61).contains(se);
    if !valid {
        return None;
    }
    // SAFETY: an all-zero tm is a valid value; mktime reads and normalises it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    tm.tm_year = y - 1900;
    tm.tm_mon = mo - 1;
    tm.tm_mday = *d;
    tm.tm_hour = *h;
    tm.tm_min = *mi;
    tm.tm_sec = *se;
    tm.tm_isdst = -1;
    // SAFETY: tm is a valid, exclusively borrowed struct.
    let t = unsafe { libc::mktime(&mut tm) };
    (t != -1).then_some(t as i64 * 1000)
}

fn days_in_month(year: i64, month: i64) -> i64 {
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `+HH:MM` / `-HH:MM` to seconds east of UTC.
fn utc_offset(s: &str) -> Option<i64> {
    let (sign, rest) = match s.as_bytes().first()? {
        b'+' => (1, &s[1..]),
        b'-' => (-1, &s[1..]),
        _ => return None,
    };
    let (h, m) = rest.split_once(':')?;
    let (h, m): (i64, i64) = (h.parse().ok()?, m.parse().ok()?);
    ((0..=14).contains(&h) && (0..60).contains(&m)).then(|| sign * (h * 3600 + m * 60))
}

/// The upstream's own words from an error body: Cloud Shell's nested
/// `{"error":{"code","message"}}`, IMDS's flat `{"error","error_description"}`, App
/// Service's `{"statusCode","message"}`, else the start of the body as text. One line, no
/// control characters, at most 300 characters: it goes to logs and `.status`.
pub fn error_message(body: &[u8]) -> String {
    // An upstream that echoes a token back in its error must not put it in our logs:
    // redacted whole, before it is cut short (a cut could split a credential from its key).
    let raw = super::redact::redact(&raw_error_message(body));
    let clean: String = raw
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(300)
        .collect();
    let clean = clean.trim();
    if clean.is_empty() {
        "no message in the answer".into()
    } else {
        clean.to_string()
    }
}

fn raw_error_message(body: &[u8]) -> String {
    if let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) {
        let s = |v: Option<&Value>| v.and_then(Value::as_str).map(str::to_string);
        if let Some(Value::Object(err)) = obj.get("error") {
            let code = s(err.get("code")).unwrap_or_default();
            let msg = s(err.get("message")).unwrap_or_default();
            return join(&code, &msg);
        }
        if let Some(code) = s(obj.get("error")) {
            return join(&code, &s(obj.get("error_description")).unwrap_or_default());
        }
        if let Some(msg) = s(obj.get("message")) {
            return join("", &msg);
        }
    }
    let text: String = String::from_utf8_lossy(body)
        .chars()
        .filter(|c| !c.is_control())
        .collect();
    let text: String = super::redact::redact(&text).chars().take(200).collect();
    if text.trim().is_empty() {
        "no message in the answer".into()
    } else {
        text.trim().to_string()
    }
}

fn join(code: &str, msg: &str) -> String {
    match (code.is_empty(), msg.is_empty()) {
        (false, false) => format!("{code}: {msg}"),
        (false, true) => code.to_string(),
        (true, false) => msg.to_string(),
        (true, true) => "no message in the answer".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(name: &str) -> Vec<u8> {
        let path = format!("{}/tests/samples/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    /// Parses `body` as if requested an hour before `expires_ms`, as real answers are.
    fn token_before(body: &[u8], expires_ms: EpochMs) -> Result<Token, AnswerError> {
        token(body, expires_ms - 3_600_000)
    }

    #[test]
    fn samples_of_each_upstream_parse() {
        let t = token_before(&sample("cloudshell-200.json"), 1_795_498_573_000).unwrap();
        assert_eq!(t.expires_on, 1_795_498_573_000);
        assert_eq!(t.token_type, "Bearer");
        assert_eq!(
            token_before(&sample("imds-200.json"), 1_795_580_973_000)
                .unwrap()
                .expires_on,
            1_795_580_973_000
        );
        assert_eq!(
            token_before(&sample("appservice-200.json"), 1_795_580_973_000)
                .unwrap()
                .expires_on,
            1_795_580_973_000
        );
        let legacy = token_before(&sample("appservice-2017-date.json"), 1_781_924_278_000).unwrap();
        assert_eq!(legacy.expires_on, 1_781_924_278_000); // 2026-06-20T02:57:58Z
        assert_eq!(
            token_before(&sample("azure-cli-200.json"), 1_795_498_373_000)
                .unwrap()
                .expires_on,
            1_795_498_373_000
        );
    }

    #[test]
    fn error_bodies_of_each_upstream() {
        let m = error_message(&sample("cloudshell-400-audience.json"));
        assert!(
            m.starts_with("AudienceNotSupported: Audience https://newservice.azure.com/"),
            "{m}"
        );
        assert_eq!(
            error_message(&sample("imds-400.json")),
            "invalid_request: Identity not found"
        );
        assert!(error_message(&sample("appservice-400.json")).starts_with("No Managed Identity"));
        assert_eq!(error_message(b""), "no message in the answer");
        assert_eq!(error_message(b"<html>oops</html>"), "<html>oops</html>");
        assert_eq!(
            error_message(b"bad token eyJhbGciOi.x.y here"),
            "bad token <redacted> here"
        );
    }

    #[test]
    fn expiry_forms() {
        let t = |s: &str| token(s.as_bytes(), 1_000_000);
        // Answers with an absolute expiry, requested a minute before it.
        let at = |s: &str, expires: EpochMs| token(s.as_bytes(), expires - 60_000);
        let epoch = 1_700_000_000_000;
        assert_eq!(
            at(r#"{"access_token":"x","expires_on":1700000000}"#, epoch)
                .unwrap()
                .expires_on,
            epoch
        );
        assert_eq!(
            at(r#"{"access_token":"x","expires_on":"1700000000"}"#, epoch)
                .unwrap()
                .expires_on,
            epoch
        );
        assert_eq!(
            t(r#"{"access_token":"x","expires_in":"60"}"#)
                .unwrap()
                .expires_on,
            1_060_000
        );
        assert_eq!(
            t(r#"{"access_token":"x","expires_in":60}"#)
                .unwrap()
                .expires_on,
            1_060_000
        );
        let legacy = 1_579_152_252_000;
        assert_eq!(
            at(
                r#"{"access_token":"x","expires_on":"1/16/2020 5:24:12 AM +00:00"}"#,
                legacy
            )
            .unwrap()
            .expires_on,
            legacy
        );
        let pm = legacy + 11 * 3_600_000;
        assert_eq!(
            at(
                r#"{"access_token":"x","expires_on":"1/16/2020 5:24:12 PM +01:00"}"#,
                pm
            )
            .unwrap()
            .expires_on,
            pm
        );
        assert!(t(r#"{"access_token":"x"}"#)
            .unwrap_err()
            .to_string()
            .contains("neither"));
        assert!(t(r#"{"access_token":"x","expires_on":"soon"}"#)
            .unwrap_err()
            .to_string()
            .contains("expires_on"));
        assert!(t(r#"{"access_token":"x","expires_in":"soon"}"#)
            .unwrap_err()
            .to_string()
            .contains("expires_in"));
    }

    #[test]
    fn an_expiry_in_milliseconds_or_past_a_week_is_refused_naming_the_field() {
        let now = 1_700_000_000_000;
        let ms = format!(
            r#"{{"access_token":"x","expires_on":"{}"}}"#,
            now + 3_600_000
        );
        let e = token(ms.as_bytes(), now).unwrap_err().to_string();
        assert!(e.contains("expires_on") && e.contains("7 days"), "{e}");
        let e = token(br#"{"access_token":"x","expires_in":864000}"#, now)
            .unwrap_err()
            .to_string();
        assert!(e.contains("expires_in"), "{e}");
        // A week exactly is fine.
        assert!(token(br#"{"access_token":"x","expires_in":604800}"#, now).is_ok());
    }

    fn jwt(claims: &str) -> String {
        let b64 =
            |s: &str| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, s);
        format!("{}.{}.sig", b64(r#"{"alg":"none"}"#), b64(claims))
    }

    #[test]
    fn a_jwt_exp_earlier_than_the_answer_wins() {
        let now = 1_700_000_000_000;
        let exp = now / 1000 + 600;
        let body = format!(
            r#"{{"access_token":"{}","expires_in":3600}}"#,
            jwt(&format!(r#"{{"exp":{exp}}}"#))
        );
        assert_eq!(token(body.as_bytes(), now).unwrap().expires_on, exp * 1000);
        // A later exp does not extend the answer's expiry.
        let body = format!(
            r#"{{"access_token":"{}","expires_in":60}}"#,
            jwt(&format!(r#"{{"exp":{exp}}}"#))
        );
        assert_eq!(
            token(body.as_bytes(), now).unwrap().expires_on,
            now + 60_000
        );
        // An answer in milliseconds is caught by the JWT's exp only if that is sane.
        let body = format!(
            r#"{{"access_token":"{}","expires_on":"{}"}}"#,
            jwt(&format!(r#"{{"exp":{exp}}}"#)),
            now + 3_600_000
        );
        assert_eq!(token(body.as_bytes(), now).unwrap().expires_on, exp * 1000);
        let body = format!(
            r#"{{"access_token":"{}","expires_in":{}}}"#,
            jwt(&format!(r#"{{"exp":{}}}"#, now / 1000 + 8 * 86_400)),
            9 * 86_400
        );
        let e = token(body.as_bytes(), now).unwrap_err().to_string();
        assert!(e.contains("exp"), "{e}");
        // Not a JWT, or no exp: the answer counts.
        assert_eq!(jwt_exp("opaque"), Ok(None));
        assert_eq!(jwt_exp(&jwt(r#"{"aud":"x"}"#)), Ok(None));
        assert_eq!(jwt_exp("a.!!!.c"), Ok(None));
    }

    #[test]
    fn a_jwt_whose_exp_is_not_one_number_is_refused() {
        let now = 1_700_000_000_000;
        let later = now / 1000 + 600;
        for (claims, why) in [
            (format!(r#"{{"exp":"{later}"}}"#), "not a number"),
            (format!(r#"{{"exp":{later},"exp":1}}"#), "more than once"),
        ] {
            let body = format!(r#"{{"access_token":"{}","expires_in":3600}}"#, jwt(&claims));
            let e = token(body.as_bytes(), now).unwrap_err();
            assert!(matches!(e, AnswerError::JwtExp(_)), "{e}");
            assert!(e.to_string().contains(why), "{e}");
        }
    }

    #[test]
    fn tokens_with_bytes_outside_printable_ascii_are_refused_by_class() {
        for (tok, class) in [
            ("abc\\r\\nX-Injected: evil", "line break"),
            ("abc def", "white space"),
            ("abc\\u0001", "control character"),
            ("abc\\u00e9", "non-ASCII"),
        ] {
            let body = format!(r#"{{"access_token":"{tok}","expires_in":60}}"#);
            let e = token(body.as_bytes(), 0).unwrap_err().to_string();
            assert!(e.contains(class), "{e}");
            assert!(
                !e.contains("abc"),
                "never the bytes (error of {} chars not shown)",
                e.len()
            );
        }
        assert!(token(br#"{"access_token":"a.b-c_d~!","expires_in":60}"#, 0).is_ok());
    }

    #[test]
    fn azure_cli_local_expiry() {
        let utc_ms = (days_from_civil(2030, 1, 2) * 86_400) * 1000;
        let t = token(
            br#"{"accessToken":"x","expiresOn":"2030-01-02 03:04:05.000000"}"#,
            utc_ms - 86_400_000,
        )
        .unwrap();
        let utc = (days_from_civil(2030, 1, 2) * 86_400 + 3 * 3600 + 4 * 60 + 5) * 1000;
        assert!(
            (t.expires_on - utc).abs() <= 14 * 3_600_000,
            "within a time zone of UTC"
        );
        assert!(token(br#"{"accessToken":"x","expiresOn":"tomorrow"}"#, 0).is_err());
    }

    #[test]
    fn bad_tokens() {
        assert_eq!(token(b"garbage", 0).unwrap_err(), AnswerError::NotJson);
        assert_eq!(token(b"[]", 0).unwrap_err(), AnswerError::NotObject);
        assert!(token(br#"{"expires_in":5}"#, 0)
            .unwrap_err()
            .to_string()
            .contains("no access_token"));
        assert!(token(br#"{"access_token":"","expires_in":5}"#, 0)
            .unwrap_err()
            .to_string()
            .contains("empty"));
        assert!(token(br#"{"access_token":5,"expires_in":5}"#, 0)
            .unwrap_err()
            .to_string()
            .contains("not a string"));
    }
}
