//! Running the built binary and other programs: always without this machine's identity
//! variables (a test sets what it needs), as another uid through `setpriv`, bounded.

use super::{eventually, BIN};
use std::ffi::OsStr;
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

/// Variables that steer source detection; tests set them explicitly.
pub const IDENTITY_VARS: [&str; 14] = [
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
    "IMDS_ENDPOINT",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
    "HTTPS_PROXY",
    "https_proxy",
];

/// Removes this machine's identity variables from `cmd`'s environment.
pub fn without_identity(cmd: &mut Command) -> &mut Command {
    for k in IDENTITY_VARS {
        cmd.env_remove(k);
    }
    cmd
}

/// `cstokenfs ARGS` of the built binary, without the identity variables, stdin closed.
pub fn cli<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(BIN);
    cmd.args(args).stdin(Stdio::null());
    without_identity(&mut cmd);
    cmd
}

/// `cstokenfs` of the built binary with no arguments yet (identity variables removed).
pub fn bin() -> Command {
    cli::<[&str; 0], &str>([])
}

/// Runs `cstokenfs ARGS` to its end.
pub fn run(args: &[&str]) -> Output {
    cli(args).output().expect("run cstokenfs")
}

/// `cstokenfs ARGS`, killed if it runs 30 s: a detached mount or sink returns once live or
/// refused.
pub fn run_bounded(args: &[&str]) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.args(["30", BIN]).args(args).stdin(Stdio::null());
    without_identity(&mut cmd).output().expect("run cstokenfs")
}

/// `setpriv`'s arguments that run what follows as `uid`:`gid` with no supplementary groups
/// (for wrappers such as prlimit).
pub fn setpriv_args(uid: u32, gid: u32) -> Vec<String> {
    let (uid, gid) = (uid.to_string(), gid.to_string());
    [
        "setpriv",
        "--reuid",
        &uid,
        "--regid",
        &gid,
        "--clear-groups",
    ]
    .map(String::from)
    .to_vec()
}

/// `setpriv ... PROGRAM`: `program` run as `uid`:`gid` (no supplementary groups), without
/// the identity variables; the caller adds arguments.
pub fn as_user(uid: u32, gid: u32, program: impl AsRef<OsStr>) -> Command {
    let args = setpriv_args(uid, gid);
    let mut cmd = Command::new(&args[0]);
    cmd.args(&args[1..]).arg(program).stdin(Stdio::null());
    without_identity(&mut cmd);
    cmd
}

/// Waits for `child` to exit, up to `within`: its status (None if it still runs).
pub fn wait_child(child: &mut Child, within: Duration) -> Option<ExitStatus> {
    eventually(within, || child.try_wait().ok().flatten())
}

/// The pids of the `cstokenfs` daemons serving `mnt` (per their command line), leaving out
/// processes that are exiting (a detaching daemon's first process, for a moment).
pub fn daemons(mnt: &Path) -> Vec<i32> {
    let out = Command::new("pgrep")
        .args(["-f", &format!("cstokenfs.*{}", mnt.display())])
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.parse().ok())
        .filter(|pid| {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // The state follows the command name's closing parenthesis.
            let state = stat.rsplit_once(") ").map(|(_, rest)| rest.chars().next());
            let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            comm.trim() == "cstokenfs" && matches!(state, Some(Some('R' | 'S' | 'D' | 'T' | 't')))
        })
        .collect()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
