//! The query of a token request, as both loopback token listeners (`--serve-endpoint`,
//! `--serve-imds`) read it: its parameters decoded (a repeated one refused), its path, and
//! the longest `resource` either serves. Each listener checks its own parameters
//! (`api-version`, the identity, `resource`) and answers in its own protocol's shape; the
//! messages here are the same in both.

use crate::names::NameError;
use std::collections::BTreeMap;
use std::fmt;

/// The longest `resource` served, in bytes as decoded (longer ones are 400).
pub const MAX_RESOURCE: usize = 512;

/// Why a token request's query is refused with 400 before anything is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum QueryError {
    /// The query is not valid `application/x-www-form-urlencoded` UTF-8.
    Malformed,
    /// A parameter is given twice.
    Repeated(String),
    /// The resource is longer than [`MAX_RESOURCE`] (its length).
    ResourceTooLong(usize),
    /// The resource is not one the daemon serves (`names::resolve_query`'s reason).
    Resource(String, NameError),
}

impl fmt::Display for QueryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            QueryError::Malformed => f.write_str("the query string is not valid URL-encoded UTF-8"),
            QueryError::Repeated(p) => write!(f, "the parameter {p} is given more than once"),
            QueryError::ResourceTooLong(n) => write!(
                f,
                "the resource is {n} bytes long; at most {MAX_RESOURCE} are served"
            ),
            QueryError::Resource(r, why) => write!(f, "resource {r:?} is not valid: {why}"),
        }
    }
}

/// The query's parameters, decoded (`+` is a space); a repeated one is an error.
pub fn parse_query(target: &str) -> Result<BTreeMap<String, String>, QueryError> {
    let query = target.split_once('?').map_or("", |(_, q)| q);
    let mut out = BTreeMap::new();
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (decode(k)?, decode(v)?);
        if out.contains_key(&k) {
            return Err(QueryError::Repeated(k));
        }
        out.insert(k, v);
    }
    Ok(out)
}

fn decode(s: &str) -> Result<String, QueryError> {
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| QueryError::Malformed)
}

/// The path of a request target (without its query).
pub fn path(target: &str) -> &str {
    target.split_once('?').map_or(target, |(p, _)| p)
}

/// `resource`'s length against [`MAX_RESOURCE`].
pub fn check_resource_len(sent: &str) -> Result<(), QueryError> {
    if sent.len() > MAX_RESOURCE {
        return Err(QueryError::ResourceTooLong(sent.len()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        let q = parse_query("/msi/token?api-version=2019-08-01&resource=https%3A%2F%2Fx&a+b=c+d")
            .unwrap();
        assert_eq!(q["api-version"], "2019-08-01");
        assert_eq!(q["resource"], "https://x");
        assert_eq!(q["a b"], "c d");
        assert_eq!(
            parse_query("/?resource=a&resource=b"),
            Err(QueryError::Repeated("resource".into()))
        );
        assert_eq!(parse_query("/?resource=%FF"), Err(QueryError::Malformed));
        assert!(parse_query("/msi/token").unwrap().is_empty());
        assert_eq!(path("/msi/token?x=1"), "/msi/token");
        assert_eq!(check_resource_len(&"r".repeat(MAX_RESOURCE)), Ok(()));
        assert_eq!(
            check_resource_len(&"r".repeat(MAX_RESOURCE + 1)),
            Err(QueryError::ResourceTooLong(MAX_RESOURCE + 1))
        );
    }
}
