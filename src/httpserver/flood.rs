//! A flood of idle connections from another user, for tests (the library's and
//! `tests/it/endpoint.rs`, which includes this file): `flood.py` as uid and gid 65534 holds N
//! connections that never send a byte, re-opening each one the server closes.

use std::io::{self, BufRead, BufReader};
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

/// The flooding user and group (nobody).
pub const NOBODY: u32 = 65534;

pub struct Flood {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
}

impl Flood {
    /// Starts `n` connections to `addr` as nobody; returns once all are opened.
    pub fn start(addr: SocketAddr, n: usize) -> io::Result<Flood> {
        // Root's PATH may lead to an interpreter nobody cannot run (pyenv under /root).
        let python = ["/usr/bin/python3", "/usr/local/bin/python3"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("python3");
        let mut child = Command::new(python)
            .arg("-c")
            .arg(include_str!("flood.py"))
            .arg(addr.to_string())
            .arg(n.to_string())
            .uid(NOBODY)
            .gid(NOBODY)
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let mut flood = Flood {
            child,
            stdin,
            stdout: BufReader::new(stdout.ok_or_else(|| io::Error::other("no stdout"))?),
        };
        if flood.line()? != "ready" {
            return Err(io::Error::other("the flood did not start"));
        }
        Ok(flood)
    }

    fn line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        self.stdout.read_line(&mut line)?;
        Ok(line.trim().to_string())
    }

    /// Stops it: how many connections the server closed (and the flood re-opened).
    pub fn stop(mut self) -> io::Result<u64> {
        drop(self.stdin.take());
        let line = self.line()?;
        line.strip_prefix("reopened ")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| io::Error::other(format!("the flood said {line:?}")))
    }
}

impl Drop for Flood {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether this process can start a flood as another user.
pub fn can_switch_user() -> bool {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}
