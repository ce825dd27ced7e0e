//! The cache's side of registry credentials (`.acr/REGISTRY`): a registry's key
//! (`Resource::registry`) is fetched like any other (single flight, refresh ahead, negative
//! cache, the same `Cache::read`), but by an exchange instead of the identity's source: the
//! identity's Entra token for the registry audience (held by this cache, else fetched into
//! it through the upstream's rate limit; the ARM one when the upstream refuses that
//! audience), then the registry's `/oauth2/exchange` (`crate::acr::exchange`), retried
//! while transient within the reader's deadline.
//!
//! Locks: `refused` is a leaf, never held while anything else is locked or asked.

use super::meters::Outcome;
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
use zeroize::Zeroizing;

/// The registries a daemon serves and what it learnt of its upstream.
#[derive(Default)]
pub(super) struct AcrSide {
    /// Set once at start ([`Cache::serve_registries`]); unset: no registry is served.
    exchanger: OnceLock<Exchanger>,
    /// Identities whose upstream refused the registry audience: asked for the ARM token from
    /// then on (Cloud Shell's allowlist does not change while it runs).
    refused: Mutex<HashSet<IdentityId>>,
}

/// The least lifetime a held Entra token must have left to be exchanged: one about to expire
/// could be refused by the registry (EACCES, negative-cached) on its way there.
const MIN_LEFT_MS: i64 = 60_000;

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
        // Registered while it is used, so no echo of it reaches a log (it may not be held).
        let _known = crate::known::remember(&entra);
        let token = entra.as_str();
        let tenant = tenant_of(token);
        let mut attempt = 0;
        let result = loop {
            let left = job.deadline.saturating_duration_since(self.clock.instant());
            if left.is_zero() {
                break Err(SourceError::Timeout);
            }
            calls += 1;
            let answer = exchanger.exchange(host, token, tenant.as_deref(), left);
            self.meters
                .exchange(job.key.identity, Outcome::of(&answer, Some(200)));
            let err = match answer {
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

    /// The identity's Entra token to exchange at `host`: one this cache holds with at least
    /// [`MIN_LEFT_MS`] to live, else one fetched now (and held when nothing valid is, so
    /// `MOUNT/management.azure.com` shares it). When the upstream refuses the registry
    /// audience, the ARM one.
    fn entra_token_for(
        &self,
        job: &Job,
        source: &dyn Source,
        exchanger: &Exchanger,
        host: &str,
    ) -> (Result<Zeroizing<String>, SourceError>, u64) {
        let identity = job.key.identity;
        let refused = self.acr.refused.lock().contains(&identity);
        let audiences = exchanger.registries().audiences(host, refused);
        let mut calls = 0;
        let mut last = SourceError::Credential("no Entra audience to exchange".into());
        for (i, audience) in audiences.iter().enumerate() {
            let key = Key::new(identity, audience.clone());
            if let Some(v) = self.held(&key) {
                let text = Zeroizing::new(String::from_utf8_lossy(v.token()).into_owned());
                return (Ok(text), calls);
            }
            let (result, n) =
                self.upstream
                    .fetch(source, &key, job.deadline, job.refresh, &self.meters);
            calls += n;
            match result {
                Ok(token) => {
                    let text = token.access_token.clone();
                    // Held for the mount's readers too, unless a valid one is held already.
                    let _ = self.adopt(&key, token);
                    return (Ok(text), calls);
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

    /// The valid version `key` holds now with at least [`MIN_LEFT_MS`] to live, without
    /// counting a read.
    fn held(&self, key: &Key) -> Option<Arc<Version>> {
        let now = self.clock.now();
        self.peek(key)
            .filter(|v| v.expires_on.saturating_sub(now) >= MIN_LEFT_MS)
    }
}
