//! Process hardening (no core dumps, no ptrace or /proc/PID/mem from same-uid processes,
//! optionally no swap) and the systemd readiness notification.

/// Makes the process not dumpable (`PR_SET_DUMPABLE` 0).
pub fn set_not_dumpable() -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_DUMPABLE takes plain integer arguments and touches no memory.
    let rc = unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Reads the flag back (`PR_GET_DUMPABLE`).
pub fn is_dumpable() -> bool {
    // SAFETY: PR_GET_DUMPABLE takes no pointer arguments.
    unsafe { libc::prctl(libc::PR_GET_DUMPABLE, 0, 0, 0, 0) != 0 }
}

/// Why `--mlock` could not lock memory, with the fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MlockError {
    /// EPERM: no CAP_IPC_LOCK and an RLIMIT_MEMLOCK of 0.
    NoCapability,
    /// ENOMEM/EAGAIN: the daemon maps more than RLIMIT_MEMLOCK allows (KiB; None: unlimited).
    Limit {
        limit_kib: Option<u64>,
    },
    Other(String),
}

impl std::fmt::Display for MlockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MlockError::NoCapability => f.write_str(
                "--mlock needs CAP_IPC_LOCK (docker run --cap-add IPC_LOCK) or root, or a \
                 non-zero RLIMIT_MEMLOCK large enough for the daemon",
            ),
            MlockError::Limit {
                limit_kib: Some(kib),
            } => write!(
                f,
                "--mlock: RLIMIT_MEMLOCK is {kib} KiB, too little for the daemon: raise it \
                 (ulimit -l, LimitMEMLOCK= in systemd, --ulimit memlock=-1 in Docker), or \
                 grant CAP_IPC_LOCK (docker run --cap-add IPC_LOCK)"
            ),
            MlockError::Limit { limit_kib: None } => f.write_str(
                "--mlock: the kernel could not lock the daemon's memory (out of memory)",
            ),
            MlockError::Other(e) => write!(f, "--mlock: cannot lock memory: {e}"),
        }
    }
}

impl std::error::Error for MlockError {}

/// The soft RLIMIT_MEMLOCK in KiB; None when unlimited (or unknown).
pub fn memlock_limit_kib() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(lim.rlim_cur / 1024)
}

/// Whether this process holds CAP_IPC_LOCK (which lifts RLIMIT_MEMLOCK), per
/// /proc/self/status; false when that cannot be read.
pub fn has_ipc_lock() -> bool {
    const CAP_IPC_LOCK: u32 = 14;
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let hex = s
                .lines()
                .find_map(|l| l.strip_prefix("CapEff:"))?
                .trim()
                .to_string();
            u64::from_str_radix(&hex, 16).ok()
        })
        .is_some_and(|caps| caps & (1 << CAP_IPC_LOCK) != 0)
}

/// What a failed lock (or a thread that cannot start under `--mlock`) means, by errno.
pub fn mlock_error(e: &std::io::Error) -> MlockError {
    match e.raw_os_error() {
        Some(libc::EPERM) => MlockError::NoCapability,
        // With CAP_IPC_LOCK no limit applies: the system is out of memory.
        Some(libc::ENOMEM) | Some(libc::EAGAIN) if has_ipc_lock() => {
            MlockError::Limit { limit_kib: None }
        }
        Some(libc::ENOMEM) | Some(libc::EAGAIN) => MlockError::Limit {
            limit_kib: memlock_limit_kib(),
        },
        _ => MlockError::Other(e.to_string()),
    }
}

/// `--mlock`: keeps the daemon's memory, tokens included, out of swap. Every current and
/// future mapping is locked, but only as its pages are touched (`MCL_ONFAULT`): a thread's
/// stack costs what it uses, not its whole reservation (without it, 54-60 MB resident at
/// start and hundreds under concurrent first reads). One malloc arena (`M_ARENA_MAX`) keeps
/// the mapped, and so the locked, total small: each further arena reserves 64 MiB, which
/// counts against RLIMIT_MEMLOCK even untouched. Call before any thread starts.
pub fn lock_memory() -> Result<(), MlockError> {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt takes integers; no thread allocates concurrently (none started yet).
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let on_fault = libc::MCL_CURRENT | libc::MCL_FUTURE | libc::MCL_ONFAULT;
    // SAFETY: mlockall takes flags only.
    if unsafe { libc::mlockall(on_fault) } == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::EINVAL) {
        return Err(mlock_error(&err));
    }
    // A kernel before 4.4 has no MCL_ONFAULT: lock everything up front.
    // SAFETY: as above.
    if unsafe { libc::mlockall(libc::MCL_CURRENT | libc::MCL_FUTURE) } == 0 {
        log::warn!("--mlock: this kernel lacks MCL_ONFAULT: whole thread stacks are locked");
        return Ok(());
    }
    Err(mlock_error(&std::io::Error::last_os_error()))
}

/// Tells systemd (`Type=notify`) our state through `$NOTIFY_SOCKET`, if it is set.
pub fn notify_systemd(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(std::path::Path::new(&path)),
    };
    let sent = addr.and_then(|addr| {
        let sock = UnixDatagram::unbound()?;
        sock.send_to_addr(state.as_bytes(), &addr)
    });
    if let Err(e) = sent {
        log::warn!("cannot notify systemd at {}: {e}", path.to_string_lossy());
    }
}

/// `bytes` random bytes from the kernel, in lowercase hex (wiped when dropped): secrets
/// (the local endpoint's, the emulator's) and ids.
pub(crate) fn random_hex(bytes: usize) -> std::io::Result<zeroize::Zeroizing<String>> {
    use std::io::Read;
    let mut raw = zeroize::Zeroizing::new(vec![0u8; bytes]);
    std::fs::File::open("/dev/urandom")?.read_exact(&mut raw)?;
    let mut hex = zeroize::Zeroizing::new(String::with_capacity(bytes * 2));
    for b in raw.iter() {
        hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
        hex.push(char::from(b"0123456789abcdef"[usize::from(b & 15)]));
    }
    Ok(hex)
}

/// Equal bytes, in time independent of where they differ (the length is not secret).
pub(crate) fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    let diff = a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

/// The most of a secret or federated token file that is read.
pub(crate) const MAX_SECRET_FILE: usize = 64 * 1024;
/// The most of a certificate or key file (a certificate chain and its key) that is read.
pub(crate) const MAX_CERTIFICATE_FILE: usize = 1024 * 1024;

/// Why a credential file was refused: shown after its path, never with its contents.
#[derive(Debug)]
pub(crate) enum FileRefused {
    /// It could not be opened, inspected or read.
    Io(std::io::Error),
    /// Not a regular file: a FIFO would block its reader, a device never ends.
    NotRegular(&'static str),
    /// On a kernel interface filesystem (procfs, sysfs...): not a credential, and reading
    /// it could send the kernel's or a process's state upstream.
    KernelFs(&'static str),
    /// Larger than the cap (bytes).
    TooLarge(usize),
    /// Its filesystem did not finish the open or read in time (seconds): a dead NFS
    /// server, a FUSE daemon that never answers.
    Hung(u64),
}

impl std::fmt::Display for FileRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FileRefused::Io(e) => write!(f, "{e}"),
            FileRefused::NotRegular(kind) => write!(f, "is not a regular file ({kind})"),
            FileRefused::KernelFs(fs) => {
                write!(f, "is on {fs}, a kernel interface: not a credential file")
            }
            FileRefused::TooLarge(cap) if cap % (1024 * 1024) == 0 => {
                write!(f, "is larger than {} MiB", cap / (1024 * 1024))
            }
            FileRefused::TooLarge(cap) if cap % 1024 == 0 => {
                write!(f, "is larger than {} KiB", cap / 1024)
            }
            FileRefused::TooLarge(cap) => write!(f, "is larger than {cap} bytes"),
            FileRefused::Hung(secs) => write!(
                f,
                "could not be read within {secs} s: its filesystem does not answer"
            ),
        }
    }
}

impl std::error::Error for FileRefused {}

impl From<rustix::io::Errno> for FileRefused {
    fn from(e: rustix::io::Errno) -> FileRefused {
        FileRefused::Io(e.into())
    }
}

/// What a file that is not a regular one is ("a FIFO"); None for a regular file.
pub(crate) fn not_regular(stat: &rustix::fs::Stat) -> Option<&'static str> {
    use rustix::fs::FileType;
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => None,
        FileType::Fifo => Some("a FIFO"),
        FileType::Socket => Some("a socket"),
        FileType::CharacterDevice => Some("a character device"),
        FileType::BlockDevice => Some("a block device"),
        FileType::Directory => Some("a directory"),
        FileType::Symlink => Some("a symbolic link"),
        FileType::Unknown => Some("of an unknown type"),
    }
}

/// Kernel interface filesystems, by `statfs` magic: their files look regular but are
/// generated by the kernel (a process's environment, device attributes, trace pipes).
const KERNEL_FILESYSTEMS: [(u32, &str); 8] = [
    (0x9fa0, "procfs"),
    (0x6265_6572, "sysfs"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0x6265_6570, "configfs"),
    (0x0027_e0eb, "cgroupfs"),
    (0x6367_7270, "cgroup2fs"),
];

/// Reads a credential file (a secret, a federated token, a certificate or key) safely:
/// opened non-blocking (a FIFO cannot hang the open), then it must be a regular file
/// (symbolic links to one are followed, as Kubernetes' projected volumes need) not on a
/// kernel interface filesystem, and at most `cap` bytes; the bytes are wiped when dropped.
/// No read can block: a regular file's never does.
pub(crate) fn read_credential_file(
    path: &std::path::Path,
    cap: usize,
) -> Result<zeroize::Zeroizing<Vec<u8>>, FileRefused> {
    use rustix::fs::{Mode, OFlags};
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    let fd = rustix::fs::open(path, flags, Mode::empty())?;
    if let Some(kind) = not_regular(&rustix::fs::fstat(&fd)?) {
        return Err(FileRefused::NotRegular(kind));
    }
    // The magic is a 32-bit number in a word whose width and sign vary by architecture.
    let magic = rustix::fs::fstatfs(&fd)?.f_type as u32;
    if let Some((_, fs)) = KERNEL_FILESYSTEMS.iter().find(|(m, _)| *m == magic) {
        return Err(FileRefused::KernelFs(fs));
    }
    // Allocated once, never grown: no copy of the contents is left behind unwiped.
    let mut buf = zeroize::Zeroizing::new(vec![0u8; cap + 1]);
    let mut len = 0;
    while len < buf.len() {
        match rustix::io::read(&fd, &mut buf[len..]) {
            Ok(0) => break,
            Ok(n) => len += n,
            Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
    }
    if len > cap {
        return Err(FileRefused::TooLarge(cap));
    }
    buf.truncate(len);
    Ok(buf)
}

/// The most reads of credential files left waiting on a filesystem that does not answer.
const MAX_HUNG_READS: usize = 4;
/// Reads whose caller gave up on them, until their filesystem answers.
static HUNG_READS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// [`read_credential_file`] on a thread of its own, waited for at most `within`: a file on
/// a filesystem that never answers (a dead NFS server, a hung FUSE daemon; O_NONBLOCK does
/// not help there) cannot hold the caller (a fetch worker) past its deadline. The thread
/// left behind ends when the filesystem answers; while [`MAX_HUNG_READS`] are left, the
/// next read fails at once instead of leaving another. Reads that answer in time, however
/// many at once, count for nothing.
pub(crate) fn read_credential_file_within(
    path: &std::path::Path,
    cap: usize,
    within: std::time::Duration,
) -> Result<zeroize::Zeroizing<Vec<u8>>, FileRefused> {
    use std::sync::atomic::Ordering;
    let hung = FileRefused::Hung(within.as_secs_f64().ceil() as u64);
    if HUNG_READS.load(Ordering::SeqCst) >= MAX_HUNG_READS {
        return Err(hung);
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    // Whether the caller gave up; the answer is sent, or the count dropped, under this lock,
    // so a read that ends just as its caller gives up is counted exactly once or not at all.
    let abandoned = std::sync::Arc::new(parking_lot::Mutex::new(false));
    let (owned, gone) = (path.to_path_buf(), std::sync::Arc::clone(&abandoned));
    let spawned = std::thread::Builder::new()
        .name("credential-read".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            let read = read_credential_file(&owned, cap);
            let gone = gone.lock();
            if *gone {
                // The bytes are wiped as `read` drops.
                HUNG_READS.fetch_sub(1, Ordering::SeqCst);
            } else {
                let _ = tx.send(read);
            }
        });
    if let Err(e) = spawned {
        return Err(FileRefused::Io(e));
    }
    match rx.recv_timeout(within) {
        Ok(read) => read,
        Err(_) => {
            let mut gone = abandoned.lock();
            match rx.try_recv() {
                Ok(read) => read,
                Err(_) => {
                    *gone = true;
                    HUNG_READS.fetch_add(1, Ordering::SeqCst);
                    Err(hung)
                }
            }
        }
    }
}

/// Why a secret file was refused: shown after its path, never with its contents.
#[derive(Debug)]
pub(crate) enum SecretRefused {
    /// Refused as any credential file is (see [`FileRefused`]).
    File(FileRefused),
    NotText,
    Empty,
    /// A control character: a second line, say.
    ControlCharacters,
}

impl std::fmt::Display for SecretRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretRefused::File(e) => e.fmt(f),
            SecretRefused::NotText => f.write_str("is not UTF-8 text"),
            SecretRefused::Empty => f.write_str("is empty"),
            SecretRefused::ControlCharacters => {
                f.write_str("has control characters (one trailing newline is allowed)")
            }
        }
    }
}

impl std::error::Error for SecretRefused {}

/// A secret kept in a file (`--client-secret-file`, `--secret-file`), read as
/// `read_credential_file` does: its contents without one trailing newline. Not text, empty,
/// or with a control character (a second line) it is refused; the error says which, never
/// the contents.
pub(crate) fn read_secret_file(
    path: &std::path::Path,
) -> Result<zeroize::Zeroizing<String>, SecretRefused> {
    let raw = read_credential_file(path, MAX_SECRET_FILE).map_err(SecretRefused::File)?;
    let text = std::str::from_utf8(&raw).map_err(|_| SecretRefused::NotText)?;
    let secret = text
        .strip_suffix("\r\n")
        .or_else(|| text.strip_suffix('\n'))
        .unwrap_or(text);
    if secret.is_empty() {
        return Err(SecretRefused::Empty);
    }
    if secret.chars().any(char::is_control) {
        return Err(SecretRefused::ControlCharacters);
    }
    Ok(zeroize::Zeroizing::new(secret.to_string()))
}

/// A random fraction in [0, 1), for backoff jitter: daemons and sinks that fail together
/// must not retry together. 0 if the kernel's randomness cannot be read.
pub(crate) fn jitter() -> f64 {
    use std::io::Read;
    let mut raw = [0u8; 2];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut raw));
    read.map_or(0.0, |()| f64::from(u16::from_le_bytes(raw)) / 65_536.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_is_a_fraction_and_varies() {
        let draws: Vec<f64> = (0..64).map(|_| jitter()).collect();
        assert!(draws.iter().all(|j| (0.0..1.0).contains(j)));
        assert!(draws.iter().any(|j| *j != draws[0]), "random, not fixed");
    }

    /// A FIFO (no writer: a blocking open would hang), a symbolic link to /dev/zero (never
    /// ends), links to procfs and sysfs files, a directory: each refused, saying why.
    #[test]
    fn credential_files_must_be_regular_files_off_procfs_and_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        let c = std::ffi::CString::new(fifo.to_str().unwrap()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path we own.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let link = |name: &str, target: &str| {
            let path = dir.path().join(name);
            std::os::unix::fs::symlink(target, &path).unwrap();
            path
        };
        let cases = [
            (fifo.clone(), "is not a regular file (a FIFO)"),
            (link("zero", "/dev/zero"), "(a character device)"),
            (link("environ", "/proc/self/environ"), "is on procfs"),
            (link("uevent", "/sys/kernel/uevent_seqnum"), "is on sysfs"),
            (dir.path().to_path_buf(), "(a directory)"),
        ];
        for (path, why) in cases {
            let e = read_credential_file(&path, MAX_SECRET_FILE).unwrap_err();
            assert!(e.to_string().contains(why), "{}: {e}", path.display());
            let e = read_secret_file(&path).unwrap_err().to_string();
            assert!(e.contains(why), "{}: {e}", path.display());
        }
    }

    #[test]
    fn credential_files_are_read_up_to_their_cap_through_links() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("secret");
        std::fs::write(&file, vec![b'x'; 1024]).unwrap();
        let link = dir.path().join("..data");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert_eq!(read_credential_file(&link, 1024).unwrap().len(), 1024);
        let e = read_credential_file(&link, 1023).unwrap_err().to_string();
        assert_eq!(e, "is larger than 1023 bytes");
        std::fs::write(&file, vec![b'x'; MAX_SECRET_FILE + 1]).unwrap();
        let e = read_secret_file(&file).unwrap_err().to_string();
        assert_eq!(e, "is larger than 64 KiB");
        let e = read_credential_file(&dir.path().join("absent"), MAX_CERTIFICATE_FILE);
        assert!(matches!(e, Err(FileRefused::Io(_))));
        assert_eq!(
            FileRefused::TooLarge(MAX_CERTIFICATE_FILE).to_string(),
            "is larger than 1 MiB"
        );
    }

    /// Many reads at once that answer in time are never taken for hung ones (the fetch pool
    /// has 8 workers; the limit of reads left waiting is 4).
    #[test]
    fn reads_in_time_however_many_at_once_all_succeed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, b"a.b.c").unwrap();
        let within = std::time::Duration::from_secs(10);
        let reads: Vec<_> = (0..4 * MAX_HUNG_READS)
            .map(|_| {
                let file = file.clone();
                std::thread::spawn(move || read_credential_file_within(&file, 64, within))
            })
            .collect();
        for read in reads {
            let bytes = read.join().unwrap().expect("read in time");
            assert_eq!(bytes.as_slice(), b"a.b.c");
        }
    }

    #[test]
    fn mlock_errors_name_the_capability_or_the_limit() {
        let eperm = mlock_error(&std::io::Error::from_raw_os_error(libc::EPERM)).to_string();
        assert!(eperm.contains("CAP_IPC_LOCK") && eperm.contains("--cap-add IPC_LOCK"));
        for errno in [libc::ENOMEM, libc::EAGAIN] {
            let e = MlockError::Limit {
                limit_kib: Some(64),
            };
            let limit_kib = (!has_ipc_lock()).then(memlock_limit_kib).flatten();
            assert_eq!(
                mlock_error(&std::io::Error::from_raw_os_error(errno)),
                MlockError::Limit { limit_kib }
            );
            let text = e.to_string();
            assert!(text.contains("RLIMIT_MEMLOCK is 64 KiB"), "{text}");
            for fix in ["ulimit -l", "LimitMEMLOCK=", "--ulimit memlock=-1"] {
                assert!(text.contains(fix), "{text}");
            }
            assert!(!text.contains("cannot start a thread"));
        }
    }
}
