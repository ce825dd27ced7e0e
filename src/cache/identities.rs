//! The daemon's identities: each owns the source (credential and upstream client) its
//! tokens come from. The mount's own identity is `IdentityId::DEFAULT`; the declared ones
//! (`--identity NAME=SELECTOR`) follow in their order. [`Identities::select`] is the one
//! rule by which a request's `client_id`, `object_id`/`principal_id` or
//! `msi_res_id`/`mi_res_id` picks an identity, for every listener.
//!
//! Those are the *fixed* identities, known at start and read without a lock. A daemon may
//! also add identities at run time ([`Identities::add`], the CSI driver: one per pod's
//! workload identity) and remove them ([`Identities::remove`]); their ids follow the fixed
//! ones and are never reused. No listener selects an added identity: `select`, `by_name`,
//! `declared`, `ids` and `describe` see the fixed ones only.

use crate::key::IdentityId;
use crate::source::declared::{selector_of, Selector};
use crate::source::{Identity, Kind, Source, SourceError};
use crate::token::Token;
use parking_lot::RwLock;
use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// One identity of the daemon.
struct Member {
    /// `None`: the mount's own identity.
    name: Option<String>,
    /// The ids it is sent upstream under (and matched by).
    ids: Identity,
    source: Arc<dyn Source>,
}

/// The daemon's identities, each with the source it fetches its tokens from. The cache's
/// background pass and fetch pool serve every identity (no thread per identity); the
/// upstream rate limit and known-down state stay per upstream (`upstream.rs`: one per
/// cache, shared by every identity, as IMDS limits requests per VM).
pub struct Identities {
    /// The fixed identities, by `IdentityId`: index 0 is the mount's own identity. Fixed
    /// at start, read without a lock.
    members: Vec<Member>,
    /// The identities added at run time, by id (each id after the fixed ones).
    added: RwLock<HashMap<IdentityId, Member>>,
    /// The id the next added identity gets: never reused.
    next: AtomicU32,
    /// Where the mount's own identity came from, for `.status`.
    origin: String,
}

/// Which identity a request names, by the parameters of IMDS's and App Service's
/// protocols (empty values count as absent).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Query {
    /// (parameter as the request spelled it, selector kind it matches, value).
    asked: Vec<(&'static str, &'static str, String)>,
}

/// Each identity parameter a request may carry, and the selector kind it matches.
const PARAMS: [(&str, &str); 5] = [
    ("client_id", "client-id"),
    ("object_id", "object-id"),
    ("principal_id", "object-id"),
    ("msi_res_id", "resource-id"),
    ("mi_res_id", "resource-id"),
];

/// The identity parameters IMDS's protocol takes (`mi_res_id` from some callers).
pub const IMDS_PARAMS: [&str; 4] = ["client_id", "object_id", "msi_res_id", "mi_res_id"];

impl Query {
    /// The identity parameters of an App Service-protocol request: `client_id`;
    /// `object_id` or `principal_id` (an object ID); `msi_res_id` or `mi_res_id` (a
    /// resource ID).
    pub fn from_params(params: &BTreeMap<String, String>) -> Query {
        Query::named(params, &PARAMS)
    }

    /// The identity parameters of an IMDS-protocol request: [`IMDS_PARAMS`] (App Service's
    /// `principal_id` means nothing there).
    pub fn imds(params: &BTreeMap<String, String>) -> Query {
        let imds = PARAMS.iter().filter(|(p, _)| IMDS_PARAMS.contains(p));
        Query::named(params, &imds.copied().collect::<Vec<_>>())
    }

    fn named(params: &BTreeMap<String, String>, names: &[(&'static str, &'static str)]) -> Query {
        let asked = names
            .iter()
            .filter_map(|&(param, kind)| {
                let v = params.get(param).filter(|v| !v.is_empty())?;
                Some((param, kind, v.clone()))
            })
            .collect();
        Query { asked }
    }

    /// Whether the request names no identity (the mount's own is meant).
    pub fn is_empty(&self) -> bool {
        self.asked.is_empty()
    }
}

/// A request names an identity the operator did not declare: the first parameter that no
/// declared identity matches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotDeclared {
    pub param: &'static str,
}

impl fmt::Display for NotDeclared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} names no identity this daemon serves: only the mount's own identity and those declared with --identity are served",
            self.param
        )
    }
}

impl std::error::Error for NotDeclared {}

/// What `.status` says of an identity: its name and selector (never a secret).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Described {
    pub id: IdentityId,
    /// `None`: the mount's own identity.
    pub name: Option<String>,
    pub selector: Option<Selector>,
}

impl Identities {
    /// One identity, the mount's own, fetching from `source`.
    pub fn one(source: Arc<dyn Source>) -> Identities {
        Identities::new(source, Identity::default(), String::new(), Vec::new())
    }

    /// The mount's own identity (`own`: its ids, `origin`: where they came from) and the
    /// declared ones, by name, ids and source, in order.
    pub fn new(
        source: Arc<dyn Source>,
        own: Identity,
        origin: String,
        declared: Vec<(String, Identity, Arc<dyn Source>)>,
    ) -> Identities {
        let mut members = vec![Member {
            name: None,
            ids: own,
            source,
        }];
        members.extend(declared.into_iter().map(|(name, ids, source)| Member {
            name: Some(name),
            ids,
            source,
        }));
        let next = AtomicU32::new(u32::try_from(members.len()).unwrap_or(u32::MAX));
        Identities {
            members,
            added: RwLock::new(HashMap::new()),
            next,
            origin,
        }
    }

    /// A daemon with no identity of its own (the CSI driver: it must never fetch as the
    /// node): the default identity's source refuses every fetch, without a request, with
    /// `SourceError::Credential(why)`. Its identities are the ones added at run time.
    pub fn without_own(why: &str) -> Identities {
        let refusing: Arc<dyn Source> = Arc::new(NoOwnIdentity {
            why: why.to_string(),
        });
        Identities::new(refusing, Identity::default(), String::new(), Vec::new())
    }

    /// Adds an identity at run time, fetching from `source`; `name` names its keys in log
    /// lines (`id/NAME/<resource>`). Returns its id, never one given before.
    pub fn add(&self, name: String, ids: Identity, source: Arc<dyn Source>) -> IdentityId {
        let id = IdentityId::at(self.next.fetch_add(1, Ordering::Relaxed) as usize);
        let member = Member {
            name: Some(name),
            ids,
            source,
        };
        self.added.write().insert(id, member);
        id
    }

    /// Removes an identity added at run time (a fixed one stays: nothing happens). Its
    /// source is dropped once no fetch under way holds it. The cache's
    /// `Cache::forget_identity` drops its entries and calls this.
    pub fn remove(&self, id: IdentityId) {
        self.added.write().remove(&id);
    }

    /// Whether `identity` is one of this daemon's now (fixed, or added and not removed).
    pub fn contains(&self, identity: IdentityId) -> bool {
        identity.index() < self.members.len() || self.added.read().contains_key(&identity)
    }

    /// The identities added at run time and not removed.
    pub fn added_count(&self) -> usize {
        self.added.read().len()
    }

    /// The source of `identity`, fixed or added (`None`: not an identity of this daemon,
    /// or removed).
    pub fn source(&self, identity: IdentityId) -> Option<Arc<dyn Source>> {
        match self.members.get(identity.index()) {
            Some(m) => Some(m.source.clone()),
            None => self.added.read().get(&identity).map(|m| m.source.clone()),
        }
    }

    /// The default identity's source (what `.status` describes at the top).
    pub fn default_source(&self) -> &dyn Source {
        &*self.members[0].source
    }

    /// The ids a fixed `identity` is sent upstream under (`None`: not a fixed identity of
    /// this daemon; no listener serves an added one).
    pub fn ids(&self, identity: IdentityId) -> Option<&Identity> {
        self.members.get(identity.index()).map(|m| &m.ids)
    }

    /// The declared identity named `name` (`MOUNT/id/NAME`; fixed identities only).
    pub fn by_name(&self, name: &str) -> Option<IdentityId> {
        self.members
            .iter()
            .position(|m| m.name.as_deref() == Some(name))
            .map(IdentityId::at)
    }

    /// The name of `identity`, fixed or added (`None`: the mount's own, or not an
    /// identity). A fixed one's is borrowed, without a lock.
    pub fn name(&self, identity: IdentityId) -> Option<Cow<'_, str>> {
        match self.members.get(identity.index()) {
            Some(m) => m.name.as_deref().map(Cow::Borrowed),
            None => {
                let added = self.added.read();
                let name = added.get(&identity)?.name.clone()?;
                Some(Cow::Owned(name))
            }
        }
    }

    /// `identity` as a message names it: `identity NAME`, or `this mount's identity`.
    pub fn who(&self, identity: IdentityId) -> String {
        match self.name(identity) {
            Some(name) => format!("identity {name}"),
            None => "this mount's identity".into(),
        }
    }

    /// The declared identities' ids and names, in order (fixed identities only).
    pub fn declared(&self) -> impl Iterator<Item = (IdentityId, &str)> {
        self.members
            .iter()
            .enumerate()
            .filter_map(|(i, m)| Some((IdentityId::at(i), m.name.as_deref()?)))
    }

    /// Every fixed identity, the mount's own first, as `.status` describes it.
    pub fn describe(&self) -> Vec<Described> {
        self.members
            .iter()
            .enumerate()
            .map(|(i, m)| Described {
                id: IdentityId::at(i),
                name: m.name.clone(),
                selector: selector_of(&m.ids),
            })
            .collect()
    }

    /// Where the mount's own identity came from.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The identity a request names: the mount's own when it names none; else the first
    /// (the mount's own, then the declared in order) whose selector matches every parameter
    /// given. A `client_id` matches only a client ID, an `object_id`/`principal_id` only an
    /// object ID, a `msi_res_id`/`mi_res_id` only a resource ID (the daemon cannot know
    /// that two kinds of id name one identity); case does not matter.
    pub fn select(&self, query: &Query) -> Result<IdentityId, NotDeclared> {
        if query.is_empty() {
            return Ok(IdentityId::DEFAULT);
        }
        let matches = |ids: &Identity| query.asked.iter().all(|(_, k, v)| has(ids, k, v));
        if let Some(i) = self.members.iter().position(|m| matches(&m.ids)) {
            return Ok(IdentityId::at(i));
        }
        // Name the first parameter no identity has, else the first given.
        let param = query
            .asked
            .iter()
            .find(|(_, k, v)| !self.members.iter().any(|m| has(&m.ids, k, v)))
            .or(query.asked.first())
            .map_or("client_id", |(p, _, _)| p);
        Err(NotDeclared { param })
    }
}

/// The default identity of a daemon that has none of its own ([`Identities::without_own`]).
struct NoOwnIdentity {
    why: String,
}

impl Source for NoOwnIdentity {
    fn fetch_once(&self, _resource: &str, _timeout: Duration) -> Result<Token, SourceError> {
        Err(SourceError::Credential(self.why.clone()))
    }
    fn endpoint(&self) -> String {
        "none (this daemon has no identity of its own)".into()
    }
    fn kind(&self) -> Kind {
        Kind::WorkloadIdentity
    }
}

/// Whether `ids` has the id of selector kind `kind` equal to `value` (case-insensitively).
fn has(ids: &Identity, kind: &str, value: &str) -> bool {
    let ours = match kind {
        "client-id" => &ids.client_id,
        "object-id" => &ids.object_id,
        _ => &ids.msi_res_id,
    };
    ours.as_ref().is_some_and(|o| o.eq_ignore_ascii_case(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;
    impl Source for Nothing {
        fn fetch_once(&self, _: &str, _: Duration) -> Result<Token, SourceError> {
            Err(SourceError::Timeout)
        }
        fn endpoint(&self) -> String {
            "nowhere".into()
        }
        fn kind(&self) -> Kind {
            Kind::Imds
        }
    }

    fn ids(c: Option<&str>, o: Option<&str>, r: Option<&str>) -> Identity {
        Identity {
            client_id: c.map(str::to_string),
            object_id: o.map(str::to_string),
            msi_res_id: r.map(str::to_string),
        }
    }

    fn q(pairs: &[(&str, &str)]) -> Query {
        Query::from_params(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn a_request_selects_only_by_a_selector_of_its_kind() {
        let s: Arc<dyn Source> = Arc::new(Nothing);
        let all = Identities::new(
            s.clone(),
            ids(Some("own"), None, None),
            "--client-id".into(),
            vec![
                ("a".into(), ids(Some("AAAA"), None, None), s.clone()),
                ("b".into(), ids(None, Some("bbbb"), None), s.clone()),
                ("c".into(), ids(None, None, Some("/sub/C")), s.clone()),
            ],
        );
        let at = IdentityId::at;
        assert_eq!(all.select(&q(&[])), Ok(IdentityId::DEFAULT));
        assert_eq!(
            all.select(&q(&[("client_id", "")])),
            Ok(IdentityId::DEFAULT)
        );
        assert_eq!(
            all.select(&q(&[("client_id", "OWN")])),
            Ok(IdentityId::DEFAULT)
        );
        assert_eq!(all.select(&q(&[("client_id", "aaaa")])), Ok(at(1)));
        assert_eq!(all.select(&q(&[("object_id", "BBBB")])), Ok(at(2)));
        assert_eq!(all.select(&q(&[("principal_id", "bbbb")])), Ok(at(2)));
        assert_eq!(all.select(&q(&[("msi_res_id", "/sub/c")])), Ok(at(3)));
        assert_eq!(all.select(&q(&[("mi_res_id", "/sub/C")])), Ok(at(3)));
        // A client ID never matches an object ID, nor the reverse.
        assert_eq!(
            all.select(&q(&[("object_id", "aaaa")])),
            Err(NotDeclared { param: "object_id" })
        );
        assert_eq!(
            all.select(&q(&[("client_id", "bbbb")])),
            Err(NotDeclared { param: "client_id" })
        );
        assert_eq!(
            all.select(&q(&[("client_id", "aaaa"), ("object_id", "bbbb")])),
            Err(NotDeclared { param: "client_id" }),
            "two ids of two identities name none"
        );
        assert_eq!(all.by_name("b"), Some(at(2)));
        assert_eq!(all.name(at(3)).as_deref(), Some("c"));
        assert_eq!(all.declared().count(), 3);
        let system = Identities::one(s);
        assert!(system.select(&q(&[("client_id", "x")])).is_err());
        assert_eq!(system.select(&q(&[])), Ok(IdentityId::DEFAULT));
    }

    #[test]
    fn identities_added_at_run_time_get_new_ids_and_are_never_selected() {
        let s: Arc<dyn Source> = Arc::new(Nothing);
        let all = Identities::new(
            s.clone(),
            ids(Some("own"), None, None),
            "--client-id".into(),
            vec![("a".into(), ids(Some("aaaa"), None, None), s.clone())],
        );
        let x = all.add("x".into(), ids(Some("xxxx"), None, None), s.clone());
        let y = all.add("y".into(), ids(Some("yyyy"), None, None), s.clone());
        assert_eq!((x, y), (IdentityId::at(2), IdentityId::at(3)));
        assert_eq!(all.name(x).as_deref(), Some("x"));
        assert_eq!(all.who(y), "identity y");
        assert!(all.source(x).is_some() && all.contains(x));
        assert_eq!(all.added_count(), 2);
        // No listener reaches an added identity.
        assert!(all.select(&q(&[("client_id", "xxxx")])).is_err());
        assert_eq!(all.by_name("x"), None);
        assert_eq!(all.declared().count(), 1);
        assert_eq!(all.describe().len(), 2);
        all.remove(x);
        assert!(all.source(x).is_none() && !all.contains(x));
        assert_eq!(all.name(x), None);
        // Ids are never reused; a fixed identity cannot be removed.
        assert_eq!(
            all.add("x".into(), Identity::default(), s),
            IdentityId::at(4)
        );
        all.remove(IdentityId::at(1));
        assert_eq!(all.name(IdentityId::at(1)).as_deref(), Some("a"));
        assert!(all.source(IdentityId::DEFAULT).is_some());
    }

    #[test]
    fn a_daemon_without_its_own_identity_never_fetches_as_one() {
        let none = Identities::without_own("the CSI driver never fetches as the node");
        let source = none.source(IdentityId::DEFAULT).unwrap();
        let e = source.fetch_once("https://vault.azure.net", Duration::from_secs(1));
        assert_eq!(
            e.unwrap_err(),
            SourceError::Credential("the CSI driver never fetches as the node".into())
        );
        assert_eq!(none.name(IdentityId::DEFAULT), None);
        let s: Arc<dyn Source> = Arc::new(Nothing);
        assert_eq!(
            none.add("p".into(), Identity::default(), s),
            IdentityId::at(1)
        );
    }
}
