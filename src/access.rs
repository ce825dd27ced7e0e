//! Who may read what a front end shows: the owner and permission bits of token files and
//! their directories. Shared by the FUSE mount and the sink, below both.

/// The permission bits of token files when `--mode` is not given.
pub const DEFAULT_FILE_MODE: u16 = 0o400;

/// Owner and permission bits of what the mount (or the sink) shows.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub uid: u32,
    pub gid: u32,
    /// Token files; directories get the matching x bits.
    pub file_mode: u16,
}

impl Access {
    /// `uid`, `gid` and `mode` as asked, each defaulting to who runs the command and 0400.
    pub fn asked(uid: Option<u32>, gid: Option<u32>, mode: Option<u16>) -> Access {
        Access {
            // SAFETY: getuid/getgid cannot fail.
            uid: uid.unwrap_or_else(|| unsafe { libc::getuid() }),
            gid: gid.unwrap_or_else(|| unsafe { libc::getgid() }),
            file_mode: mode.unwrap_or(DEFAULT_FILE_MODE),
        }
    }

    /// The directories' mode: the file mode with an x bit for every r bit.
    pub fn dir_mode(&self) -> u16 {
        self.file_mode | ((self.file_mode & 0o444) >> 2)
    }
}
