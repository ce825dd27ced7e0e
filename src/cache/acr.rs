//! The cache's side of registry credentials (`.acr/REGISTRY`): a registry's key
//! (`Resource::registry`) is fetched like any other (single flight, refresh ahead, negative
//! cache, the same `Cache::read`), but by an exchange instead of the identity's source: the
//! identity's Entra token for the registry audience (held by this cache, else fetched into
//! it through the upstream's rate limit; the ARM one when the upstream refuses that
//! audience), then the registry's `/oauth2/exchange` (`crate::acr::exchange`), retried
//! while transient within the reader's deadline.
//!
//! Locks: `refused` is a leaf, never held while anything else is locked or asked.

use super::pool::Job;
use super::{Cache, Key};
use crate::acr::exchange::{tenant_of, Exchanger};
use crate::acr::Registries;
use crate::key::IdentityId;
use crate::source::{ConfigError, Failure, Source, SourceError};
use crate::token::{Token, Version};
use log::{debug, info};
use parking_lot::Mutex;
use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

/// The registries a daemon serves and what it learnt of its upstream.
#[derive(Default)]
pub(super) struct AcrSide {
    /// Set once at start ([`Cache::serve_registries`]); unset: no registry is served.
    exchanger: OnceLock<Exchanger>,
    /// Identities whose upstream refused the registry audience: asked for the ARM token from
    /// then on (Cloud Shell's allowlist does not change while it runs).
    refused: Mutex<HashSet<IdentityId>>,
}

/// What a fetch of a registry's key gives: the refresh token, and the upstream and
/// registry requests it took.
type Fetched = (Result<Token, SourceError>, u64);

impl Cache {
    /// Serves registries' credentials from now on (`.acr/`): builds their HTTP clients. Once
    /// only; a second call changes nothing.
    pub fn serve_registries(&self, registries: Registries) -> Result<(), ConfigError> {
        let exchanger = Exchanger::new(registries)?;
        let _ = self.acr.exchanger.set(exchanger);
        Ok(())
    }

    /// The registries this daemon serves, if any.
    pub fn registries(&self) -> Option<&Registries> {
        self.acr.exchanger.get().map(Exchanger::registries)
    }

    /// For `ask`: the fetch of `job`'s key when it is a registry's, else `None`.
    pub(super) fn fetch_registry(&self, job: &Job) -> Option<Fetched> {
        let host = job.key.resource.registry_host()?;
        let Some(exchanger) = self.acr.exchanger.get() else {
            let why = format!("{host}: this daemon serves no registry credentials");
            return Some((Err(SourceError::Credential(why)), 0));
        };
        let Some(source) = self.identities.source(job.key.identity) else {
            let why = format!("{}: not an identity of this daemon", job.key);
            return Some((Err(SourceError::Credential(why)), 0));
        };
        let (entra, mut calls) = self.entra_token_for(job, &*source, exchanger, host);
        let entra = match entra {
            Ok(v) => v,
            Err(e) => return Some((Err(e), calls)),
        };
        let token = std::str::from_utf8(entra.token()).unwrap_or_default();
        let tenant = tenant_of(token);
        let mut attempt = 0;
        let result = loop {
            let left = job.deadline.saturating_duration_since(self.clock.instant());
            if left.is_zero() {
                break Err(SourceError::Timeout);
            }
            calls += 1;
            let err = match exchanger.exchange(host, token, tenant.as_deref(), left) {
                Ok(t) => break Ok(t),
                Err(e) => e,
            };
            let pause = err
                .retry_after()
                .unwrap_or_else(|| crate::policy::in_fetch_pause(attempt));
            attempt += 1;
            if err.failure() != Failure::Transient
                || err.ends_the_fetch()
                || pause >= job.deadline.saturating_duration_since(self.clock.instant())
            {
                break Err(err);
            }
            debug!(
                "{}: exchange attempt {attempt} at {} failed ({err}); again in {pause:?}",
                self.shown(&job.key),
                exchanger.shown(host)
            );
            std::thread::sleep(pause);
        };
        Some((result, calls))
    }

    /// The identity's Entra token to exchange at `host`: a valid one this cache holds, else
    /// one fetched now (and held, so `MOUNT/management.azure.com` shares it). When the
    /// upstream refuses the registry audience, the ARM one.
    fn entra_token_for(
        &self,
        job: &Job,
        source: &dyn Source,
        exchanger: &Exchanger,
        host: &str,
    ) -> (Result<Arc<Version>, SourceError>, u64) {
        let identity = job.key.identity;
        let refused = self.acr.refused.lock().contains(&identity);
        let audiences = exchanger.registries().audiences(host, refused);
        let mut calls = 0;
        let mut last = SourceError::Credential("no Entra audience to exchange".into());
        for (i, audience) in audiences.iter().enumerate() {
            let key = Key::new(identity, audience.clone());
            if let Some(v) = self.held(&key) {
                return (Ok(v), calls);
            }
            let (result, n) = self
                .upstream
                .fetch(source, audience, job.deadline, job.refresh);
            calls += n;
            match result {
                Ok(token) => {
                    return match self.adopt(&key, token) {
                        Some(v) => (Ok(v), calls),
                        None => (
                            Err(SourceError::BadResponse(
                                "the endpoint issued a token that is already expired".into(),
                            )),
                            calls,
                        ),
                    }
                }
                Err(e) if e.failure() == Failure::Refused && i + 1 < audiences.len() => {
                    info!(
                        "{}: the endpoint refused the audience {audience} ({e}); exchanging the {} token instead",
                        self.shown(&job.key),
                        audiences[i + 1]
                    );
                    self.acr.refused.lock().insert(identity);
                    last = e;
                }
                Err(e) => return (Err(e), calls),
            }
        }
        (Err(last), calls)
    }

    /// The valid version `key` holds now, without counting a read.
    fn held(&self, key: &Key) -> Option<Arc<Version>> {
        let now = self.clock.now();
        self.state
            .lock()
            .entries
            .get(key)
            .and_then(|e| e.valid(now).cloned())
    }
}
