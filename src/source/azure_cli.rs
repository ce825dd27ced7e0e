//! The Azure CLI on a laptop or VM after `az login`: runs `az account get-access-token
//! --resource R --output json` with a timeout and reads `accessToken` and `expires_on`
//! (or the older local-time `expiresOn`); what az says on stderr becomes the error.

use super::{parse, Source, SourceError, MAX_BODY};
use crate::token::Token;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

pub struct AzureCli {
    program: PathBuf,
}

impl AzureCli {
    /// `program` is `az` (looked up on PATH) or a path to a stand-in.
    pub fn new(program: impl Into<PathBuf>) -> AzureCli {
        AzureCli {
            program: program.into(),
        }
    }
}

/// Whether `az` is an executable file on `path` (a PATH-style list).
pub fn on_path(path: &std::ffi::OsStr) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path).any(|dir| {
        std::fs::metadata(dir.join("az"))
            .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    })
}

impl Source for AzureCli {
    fn fetch_once(&self, resource: &str, timeout: Duration) -> Result<Token, SourceError> {
        let deadline = Instant::now() + timeout;
        let requested_at = crate::policy::now_ms();
        let mut child = Command::new(&self.program)
            .args([
                "account",
                "get-access-token",
                "--resource",
                resource,
                "--output",
                "json",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own process group: on a timeout the whole group goes (the `az` wrapper
            // runs Python as a child, which would keep our pipes open).
            .process_group(0)
            .spawn()
            .map_err(|e| {
                SourceError::Unreachable(format!("cannot run {}: {e}", self.program.display()))
            })?;
        let stdout = child
            .stdout
            .take()
            .map(|out| std::thread::spawn(move || drain(out)));
        let stderr = child
            .stderr
            .take()
            .map(|err| std::thread::spawn(move || drain(err)));
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() >= deadline => {
                    // SAFETY: signalling the process group we created.
                    unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
                    let _ = child.wait();
                    return Err(SourceError::Timeout);
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(10)),
                Err(e) => return Err(SourceError::Unreachable(format!("waiting for az: {e}"))),
            }
        };
        // Anything az left running in its group would hold our pipes open.
        // SAFETY: signalling the process group we created (ESRCH if it is gone).
        unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
        let out = stdout.and_then(|h| h.join().ok()).unwrap_or_default();
        let err = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
        if !status.success() {
            // Redacted whole, before it is cut short: a cut never keeps part of a credential.
            let joined = String::from_utf8_lossy(&err)
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(" ");
            let text: String = super::redact::redact(&joined)
                .chars()
                .filter(|c| !c.is_control())
                .take(300)
                .collect();
            let text = if text.is_empty() {
                format!("az exited with {status}")
            } else {
                text
            };
            return Err(SourceError::Command(text));
        }
        if out.len() > MAX_BODY {
            return Err(SourceError::BadResponse(format!(
                "az printed more than {} KiB",
                MAX_BODY / 1024
            )));
        }
        Ok(parse::token(&out, requested_at)?)
    }

    fn endpoint(&self) -> String {
        format!("{} account get-access-token", self.program.display())
    }

    fn kind(&self) -> super::Kind {
        super::Kind::AzureCli
    }
}

/// Reads a pipe to the end, keeping at most a little over `MAX_BODY` (wiped on drop).
fn drain(mut r: impl Read) -> Zeroizing<Vec<u8>> {
    // Sized for the most that is kept, so it never reallocates (leaving unwiped copies).
    let mut buf = Zeroizing::new(Vec::with_capacity(MAX_BODY + 1));
    let _ = (&mut r).take(MAX_BODY as u64 + 1).read_to_end(&mut buf);
    let _ = std::io::copy(&mut r, &mut std::io::sink());
    buf
}
