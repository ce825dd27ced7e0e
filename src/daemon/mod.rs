//! The daemon core: what every front end (the FUSE mount, the sink, `get`, the local
//! endpoint's listener) builds and runs the same way, beneath them all.
//!
//! - [`Daemon`]: the upstream's client from the plan (with `--emulator`, a plan the front
//!   end already pointed at its stand-in: see `stand_in.rs`), the cache, and its
//!   background pass and fetch pool; undone on drop.
//! - `signals`: SIGTERM/SIGINT stop, SIGUSR1 drops tokens, SIGHUP reopens the log file.
//! - `detach`: the fork, the readiness pipe, the daemon's session and descriptors.
//! - `log_file`: `--log-file`, opened before detaching and reopened on SIGHUP.
//! - `error`: [`DaemonError`], which each front end turns into its own.
//!
//! The front ends sit side by side above it and never reach into one another.
//!
//! State and locks: the core holds no lock of its own. A [`Daemon`]'s fields are set at
//! start-up and only read after; the cache it holds guards its own state (see
//! `cache/mod.rs`). Signals reach the front end's event loop over a channel, so the state
//! a front end keeps (the mount's `Started`, the sink's `Mirror`) is owned by that one
//! thread.

mod detach;
mod error;
mod log_file;
mod signals;

pub use detach::{daemonize, Detached, Ready};
pub use error::DaemonError;
pub use log_file::{open_log, reopen_log, say_if_logs_are_discarded};
pub use signals::{small_thread, Handled, Signal};

use crate::cache::{Cache, Identities, Key};
use crate::names::Resource;
use crate::policy::{Policy, SystemClock};
use crate::source::select::{self, Env, Plan, Wanted};
use log::{info, warn};
use std::sync::Arc;

/// The plan for `wanted` in this process's environment: which upstream, and why.
pub fn plan(wanted: &Wanted) -> Result<Plan, DaemonError> {
    Ok(select::plan(wanted, &Env::current())?)
}

/// What a daemon's start-up leaves running. Dropping it (or [`stop`](Self::stop)) stops the
/// background pass and the fetch pool (readers still waiting are told the daemon is
/// stopping).
pub struct Daemon {
    /// The cache every front end reads through. Shared with the front end's threads (FUSE,
    /// the endpoint, the sink's loop), which may hold it past the `Daemon`.
    cache: Arc<Cache>,
    /// Whether the background pass runs (`start_background`): stopped on drop.
    background: bool,
    /// Why the plan chose this upstream (`.status`'s `source_reason`).
    source_reason: String,
}

impl Daemon {
    /// Builds the upstream's client (reqwest starts a thread: call it after any fork) and
    /// the cache, which knows `declared` (resolved resource names) from the start. No
    /// background pass yet: `get` needs none.
    pub fn build(plan: Plan, policy: Policy, declared: &[Resource]) -> Result<Daemon, DaemonError> {
        let source = plan.build()?;
        info!("source {}: {}", plan.kind, plan.reason);
        let others: Vec<_> = plan
            .declared()
            .zip(plan.build_declared()?)
            .map(|(d, source)| (d.name.clone(), d.identity(), source))
            .collect();
        for (name, ids, _) in &others {
            if let Some(s) = crate::source::declared::selector_of(ids) {
                info!("identity {name}: {}={}", s.kind, s.value);
            }
        }
        let count = others.len() + 1;
        let identities = Identities::new(
            source,
            plan.own_identity().clone(),
            plan.identity_origin().to_string(),
            others,
        );
        let cache = Cache::new(
            identities,
            policy,
            &Key::all(count, declared),
            Arc::new(SystemClock),
        );
        cache.set_source_reason(&plan.reason);
        Ok(Daemon {
            cache,
            background: false,
            source_reason: plan.reason,
        })
    }

    /// [`build`](Self::build), then the background pass: what a long-running front end
    /// (mount, sink) starts with. `mlock`: whether `--mlock` is on (a thread that cannot
    /// start then says why).
    pub fn start(
        plan: Plan,
        policy: Policy,
        declared: &[Resource],
        mlock: bool,
    ) -> Result<Daemon, DaemonError> {
        let mut daemon = Daemon::build(plan, policy, declared)?;
        daemon
            .cache
            .start_background()
            .map_err(|e| DaemonError::thread(e, mlock))?;
        daemon.background = true;
        Ok(daemon)
    }

    /// The core of a front end whose identities are all added while it runs (the CSI
    /// driver: one per pod's service account and application), with the background pass.
    /// It has no identity of its own: a fetch as the default identity is refused with
    /// `why`, and nothing is ever fetched as the node.
    pub fn with_added_identities(policy: Policy, why: &str) -> Result<Daemon, DaemonError> {
        let identities = Identities::without_own(why);
        let cache = Cache::new(identities, policy, &[], Arc::new(SystemClock));
        cache
            .start_background()
            .map_err(|e| DaemonError::thread(e, false))?;
        Ok(Daemon {
            cache,
            background: true,
            source_reason: why.to_string(),
        })
    }

    pub fn cache(&self) -> &Arc<Cache> {
        &self.cache
    }

    /// Why the plan chose this upstream.
    pub fn source_reason(&self) -> &str {
        &self.source_reason
    }
}

impl Daemon {
    /// Stops the background pass and the fetch pool (readers still waiting are told the
    /// daemon is stopping); the cache still answers from what it holds. Once: dropping
    /// the `Daemon` after it does nothing more.
    pub fn stop(&mut self) {
        if std::mem::take(&mut self.background) {
            self.cache.stop_background();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Makes the process non-dumpable (no core files, no ptrace by the same uid; a warning if
/// it cannot) and, with `mlock`, locks its memory out of swap. Call before any thread
/// starts. `who` names the daemon in the warning ("daemon", "sink").
pub fn harden(who: &str, mlock: bool) -> Result<(), DaemonError> {
    if let Err(e) = crate::hardening::set_not_dumpable() {
        warn!("cannot make the {who} non-dumpable: {e}");
    }
    if mlock {
        crate::hardening::lock_memory()?;
    }
    Ok(())
}
