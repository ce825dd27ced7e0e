//! The two versions of App Service's managed-identity protocol the endpoint answers, chosen
//! by the request's `api-version`. They differ in the header carrying the secret, the
//! parameter naming a user-assigned identity, and how the answer spells `expires_on`:
//!
//! ```text
//!                 header               identity                       expires_on
//! 2019-08-01      X-IDENTITY-HEADER    client_id, principal_id, ...   "1795580973" (epoch s)
//! 2017-09-01      secret               clientid                       "06/20/2026 02:57:58 +00:00" (UTC)
//! ```
//!
//! Both take the same secret (`.env`'s `IDENTITY_HEADER` and `MSI_SECRET`), compared in
//! constant time, and answer errors as `{"statusCode":N,"message":".."}`.

use crate::cache::Query;
use std::collections::BTreeMap;

/// The API version azure-identity, MSAL and @azure/identity send (`IDENTITY_ENDPOINT`).
pub const V2019: &str = "2019-08-01";
/// The legacy API version (`MSI_ENDPOINT`/`MSI_SECRET`) older SDKs and tools send.
pub const V2017: &str = "2017-09-01";

/// The 2019-08-01 identity parameters that 2017-09-01 does not know (it has `clientid`).
const NOT_IN_2017: [&str; 5] = [
    "client_id",
    "object_id",
    "principal_id",
    "msi_res_id",
    "mi_res_id",
];

/// One version of the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `api-version=2019-08-01`.
    V2019,
    /// `api-version=2017-09-01`.
    V2017,
}

impl Protocol {
    /// The version a request's `api-version` names, if it is one served.
    pub fn of(api_version: &str) -> Option<Protocol> {
        match api_version {
            V2019 => Some(Protocol::V2019),
            V2017 => Some(Protocol::V2017),
            _ => None,
        }
    }

    pub fn api_version(self) -> &'static str {
        match self {
            Protocol::V2019 => V2019,
            Protocol::V2017 => V2017,
        }
    }

    /// The header the secret comes in, in lower case.
    pub fn secret_header(self) -> &'static str {
        match self {
            Protocol::V2019 => "x-identity-header",
            Protocol::V2017 => "secret",
        }
    }

    /// The identity the request names. 2017-09-01 names a user-assigned identity only by
    /// `clientid`; a 2019-08-01 parameter there is refused rather than ignored (ignoring it
    /// would answer with another identity's token): `Err` names that parameter.
    pub fn identity(self, params: &BTreeMap<String, String>) -> Result<Query, &'static str> {
        match self {
            Protocol::V2019 => Ok(Query::from_params(params)),
            Protocol::V2017 => {
                if let Some(p) = NOT_IN_2017.iter().find(|p| params.contains_key(**p)) {
                    return Err(p);
                }
                let mut named = BTreeMap::new();
                if let Some(id) = params.get("clientid") {
                    named.insert("client_id".to_string(), id.clone());
                }
                Ok(Query::from_params(&named))
            }
        }
    }

    /// How `expires_on` is spelled for a token expiring at `expires_on_ms` (epoch ms).
    pub fn expires_on(self, expires_on_ms: i64) -> String {
        let secs = expires_on_ms.div_euclid(1000);
        match self {
            Protocol::V2019 => secs.to_string(),
            Protocol::V2017 => legacy_date(secs),
        }
    }

    /// Whether the answer carries `client_id` (2017-09-01's has four fields only).
    pub fn answers_client_id(self) -> bool {
        self == Protocol::V2019
    }
}

/// `MM/dd/yyyy HH:mm:ss +00:00` in UTC: App Service 2017-09-01's `expires_on`.
pub fn legacy_date(epoch_secs: i64) -> String {
    let (y, m, d) = crate::civil::civil_from_days(epoch_secs.div_euclid(86_400));
    let s = epoch_secs.rem_euclid(86_400);
    format!(
        "{m:02}/{d:02}/{y:04} {:02}:{:02}:{:02} +00:00",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn legacy_dates_are_utc_with_leading_zeros() {
        // The sample's date (appservice-2017-date.json).
        assert_eq!(legacy_date(1_781_924_278), "06/20/2026 02:57:58 +00:00");
        assert_eq!(legacy_date(0), "01/01/1970 00:00:00 +00:00");
        assert_eq!(legacy_date(951_825_599), "02/29/2000 11:59:59 +00:00");
        assert_eq!(legacy_date(1_767_225_599), "12/31/2025 23:59:59 +00:00");
        assert_eq!(
            Protocol::V2017.expires_on(1_781_924_278_999),
            "06/20/2026 02:57:58 +00:00"
        );
        assert_eq!(Protocol::V2019.expires_on(1_781_924_278_999), "1781924278");
    }

    #[test]
    fn versions_headers_and_identity_parameters() {
        assert_eq!(Protocol::of("2019-08-01"), Some(Protocol::V2019));
        assert_eq!(Protocol::of("2017-09-01"), Some(Protocol::V2017));
        assert_eq!(Protocol::of("2018-02-01"), None);
        assert_eq!(Protocol::V2017.secret_header(), "secret");
        let params = |kv: &[(&str, &str)]| -> BTreeMap<String, String> {
            kv.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let with_clientid = params(&[("clientid", "abc")]);
        assert_eq!(
            Protocol::V2017.identity(&with_clientid),
            Ok(Query::from_params(&params(&[("client_id", "abc")])))
        );
        assert!(Protocol::V2019
            .identity(&with_clientid)
            .is_ok_and(|q| q.is_empty()));
        assert_eq!(
            Protocol::V2017.identity(&params(&[("client_id", "abc")])),
            Err("client_id")
        );
        assert!(Protocol::V2017
            .identity(&params(&[("resource", "x")]))
            .is_ok_and(|q| q.is_empty()));
    }
}
