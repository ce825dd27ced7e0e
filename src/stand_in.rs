//! `--emulator`: the built-in emulator as the upstream, started by a front end (mount,
//! sink, get) before it builds the daemon core. The core is handed the plan already
//! pointed at the stand-in's URL and never links the emulator; the front end keeps the
//! stand-in alive until its daemon core has stopped.

use crate::daemon::DaemonError;
use crate::emulator::{Emulator, EmulatorConfig};
use crate::source::select::Plan;

/// With `--emulator`, starts the built-in emulator for the plan's upstream on an ephemeral
/// loopback port and points the plan at it; the emulator serves as long as it is kept.
pub fn start(plan: &mut Plan) -> Result<Option<Emulator>, DaemonError> {
    let Some(kind) = plan.emulated() else {
        return Ok(None);
    };
    let emu = Emulator::start_with(([127, 0, 0, 1], 0).into(), EmulatorConfig::default(), kind)
        .map_err(DaemonError::Emulator)?;
    plan.use_stand_in(emu.url(), emu.identity_header());
    Ok(Some(emu))
}
