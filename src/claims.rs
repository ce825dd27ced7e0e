//! The `.claims` view: a token's decoded JWT payload as pretty JSON and a newline, never
//! the header's key material, the signature or the token itself. A token that is not a JWT
//! (three base64url parts whose middle one is a JSON object) gives
//! `{"opaque": true, "expires_on": <epoch seconds>}`.

use crate::policy::EpochMs;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use zeroize::Zeroizing;

/// The rendered `.claims` document of `token` (expiry `expires_on`, for opaque tokens).
pub fn render(token: &str, expires_on: EpochMs) -> Zeroizing<Vec<u8>> {
    let mut out = match payload(token) {
        Some(claims) => Zeroizing::new(serde_json::to_vec_pretty(&claims).unwrap_or_default()),
        None => opaque(expires_on),
    };
    if out.is_empty() {
        out = opaque(expires_on);
    }
    // Grown in a fresh buffer: a reallocation would leave an unwiped copy behind.
    let mut done = Zeroizing::new(Vec::with_capacity(out.len() + 1));
    done.extend_from_slice(&out);
    done.push(b'\n');
    done
}

fn opaque(expires_on: EpochMs) -> Zeroizing<Vec<u8>> {
    let doc = serde_json::json!({"opaque": true, "expires_on": expires_on.div_euclid(1000)});
    Zeroizing::new(serde_json::to_vec_pretty(&doc).unwrap_or_default())
}

/// The payload of a JWT-shaped token, if it is one: exactly three dot-separated parts, the
/// middle one base64url (padding tolerated) of a JSON object.
pub(crate) fn payload(token: &str) -> Option<serde_json::Map<String, serde_json::Value>> {
    payload_of(&payload_bytes(token)?)
}

fn payload_bytes(token: &str) -> Option<Zeroizing<Vec<u8>>> {
    let mut parts = token.split('.');
    let (_header, body, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || body.is_empty() {
        return None;
    }
    Some(Zeroizing::new(
        URL_SAFE_NO_PAD.decode(body.trim_end_matches('=')).ok()?,
    ))
}

fn payload_of(bytes: &[u8]) -> Option<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_slice(bytes).ok()? {
        serde_json::Value::Object(map) => Some(map),
        _ => None,
    }
}

/// Why a JWT's `exp` cannot be trusted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadExp {
    NotANumber,
    Repeated,
}

/// The `exp` claim of a JWT-shaped token, in seconds: `None` for a token that is not a JWT
/// or has no `exp`; an error when `exp` is not a number or appears more than once (a
/// reader could take either, so none is trusted).
pub(crate) fn exp(token: &str) -> Result<Option<f64>, BadExp> {
    /// `exp` alone; serde refuses a field given twice.
    #[derive(serde::Deserialize)]
    struct ExpOnly {
        #[allow(dead_code)] // only read for serde's duplicate check
        exp: Option<serde::de::IgnoredAny>,
    }
    let Some(bytes) = payload_bytes(token) else {
        return Ok(None);
    };
    let Some(claims) = payload_of(&bytes) else {
        return Ok(None);
    };
    let Some(exp) = claims.get("exp") else {
        return Ok(None);
    };
    if serde_json::from_slice::<ExpOnly>(&bytes).is_err() {
        return Err(BadExp::Repeated);
    }
    exp.as_f64().map(Some).ok_or(BadExp::NotANumber)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &str) -> String {
        format!(
            "{}.{}.c2lnbmF0dXJl",
            URL_SAFE_NO_PAD.encode(r#"{"alg":"RS256","typ":"JWT"}"#),
            URL_SAFE_NO_PAD.encode(claims)
        )
    }

    #[test]
    fn a_jwt_gives_its_payload_pretty_with_a_newline() {
        let t = jwt(r#"{"aud":"https://management.azure.com/","roles":["a","b"],"exp":17}"#);
        let out = render(&t, 0);
        assert!(out.ends_with(b"}\n"));
        let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(v["aud"], "https://management.azure.com/");
        assert_eq!(v["roles"][1], "b");
        assert_eq!(v["exp"], 17);
        let text = String::from_utf8(out.to_vec()).unwrap();
        assert!(text.contains("\n  \"aud\""), "pretty printed");
        assert!(!text.contains("c2lnbmF0dXJl"), "no signature");
        assert!(
            !text.contains(t.split('.').nth(1).unwrap()),
            "no token part"
        );
    }

    #[test]
    fn exp_must_be_one_number() {
        assert_eq!(exp(&jwt(r#"{"exp":17}"#)), Ok(Some(17.0)));
        assert_eq!(exp(&jwt(r#"{"exp":17.5}"#)), Ok(Some(17.5)));
        assert_eq!(exp(&jwt(r#"{"aud":"x"}"#)), Ok(None));
        assert_eq!(exp("opaque-token"), Ok(None));
        for bad in [r#"{"exp":"17"}"#, r#"{"exp":null}"#, r#"{"exp":[17]}"#] {
            assert_eq!(exp(&jwt(bad)), Err(BadExp::NotANumber), "{bad}");
        }
        assert_eq!(exp(&jwt(r#"{"exp":1,"exp":99}"#)), Err(BadExp::Repeated));
    }

    #[test]
    fn anything_else_is_opaque() {
        let bad_json = format!("a.{}.c", URL_SAFE_NO_PAD.encode("[1,2]"));
        for t in [
            "opaque-token",
            "a.b",
            "a.b.c.d",
            "a..c",
            "a.!!!.c",
            bad_json.as_str(),
        ] {
            let v: serde_json::Value =
                serde_json::from_slice(&render(t, 1_700_000_000_999)).unwrap();
            assert_eq!(
                v,
                serde_json::json!({"opaque": true, "expires_on": 1_700_000_000})
            );
        }
    }
}
