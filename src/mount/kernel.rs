//! The kernel side: mounting (our own mount(2) as root, fusermount3 otherwise), the
//! errors that name the fix, and unmounting.

use super::{MountError, MountRequest};
use crate::fs::fuse::FuseAdapter;
use crate::fs::Core;
use log::{debug, info};
use std::ffi::CString;
use std::fs::OpenOptions;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

/// The filesystem type in the mount table, whoever mounts.
pub const FS_TYPE: &str = "fuse.cstokenfs";

/// Mounts and opens the FUSE session, with type `fuse.cstokenfs` either way: as root, our
/// own mount(2) (fuser's own mount(2) hard-codes `fuse`), then `Session::from_fd`; as an
/// ordinary user, with `auto_unmount` (which only fusermount3 can do), or where root's
/// mount(2) is refused (a container without CAP_SYS_ADMIN), fuser and fuse3's setuid
/// fusermount3, which names the type from the subtype. True: our own mount(2).
pub(super) fn open_session(
    req: &MountRequest,
    core: &Arc<Core>,
    mountpoint: &Path,
) -> Result<(fuser::Session<FuseAdapter>, bool), MountError> {
    let acl = if req.allow_other {
        fuser::SessionACL::All
    } else if req.allow_root || req.auto_unmount {
        fuser::SessionACL::RootAndOwner
    } else {
        fuser::SessionACL::Owner
    };
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName(req.fsname.clone()),
        fuser::MountOption::Subtype("cstokenfs".into()),
        fuser::MountOption::RO,
        fuser::MountOption::NoSuid,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoExec,
        fuser::MountOption::DefaultPermissions,
    ];
    if req.auto_unmount {
        config.mount_options.push(fuser::MountOption::AutoUnmount);
    }
    config.n_threads = Some(2);
    config.acl = acl;
    debug!(
        "mounting {} as {FS_TYPE} (source {:?}, access {acl:?}, auto_unmount {})",
        mountpoint.display(),
        req.fsname,
        req.auto_unmount
    );
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 && !req.auto_unmount {
        match mount_direct(&req.fsname, mountpoint, acl != fuser::SessionACL::Owner) {
            Ok(fd) => {
                let adapter = FuseAdapter::new(core.clone());
                return match fuser::Session::from_fd(adapter, fd, acl, config) {
                    Ok(session) => Ok((session, true)),
                    Err(e) => {
                        let _ = unmount(mountpoint);
                        Err(mount_error(&e, mountpoint))
                    }
                };
            }
            Err(e) if e.raw_os_error() == Some(libc::EPERM) => {
                info!("mount(2) refused (EPERM): mounting through fusermount3");
            }
            Err(e) => return Err(mount_error(&e, mountpoint)),
        }
    }
    if req.auto_unmount && !fusermount3_on_path() {
        return Err(MountError::Mount(
            "auto_unmount needs fuse3's fusermount3 (install the fuse3 package)".into(),
        ));
    }
    fuser::Session::new(FuseAdapter::new(core.clone()), mountpoint, &config)
        .map(|s| (s, false))
        .map_err(|e| mount_error(&e, mountpoint))
}

pub(super) fn fusermount3_on_path() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|p| std::env::split_paths(&p).any(|d| d.join("fusermount3").is_file()))
}

/// mount(2) of type `fuse.cstokenfs` on a new /dev/fuse descriptor: read-only, nosuid,
/// nodev, noexec, default_permissions; `allow_other` lets the kernel pass other users'
/// requests (fuser then enforces allow_root itself).
pub(super) fn mount_direct(
    fsname: &str,
    mountpoint: &Path,
    allow_other: bool,
) -> std::io::Result<std::os::fd::OwnedFd> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/fuse")?;
    let root_mode = std::fs::metadata(mountpoint)?.mode() & libc::S_IFMT;
    // SAFETY: getuid/getgid cannot fail.
    let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
    let mut data = format!(
        "fd={},rootmode={root_mode:o},user_id={uid},group_id={gid},default_permissions",
        dev.as_raw_fd()
    );
    if allow_other {
        data.push_str(",allow_other");
    }
    let nul = |_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a NUL byte in a name");
    let source = CString::new(fsname).map_err(nul)?;
    let target = CString::new(mountpoint.as_os_str().as_bytes()).map_err(nul)?;
    let fstype = CString::new(FS_TYPE).map_err(nul)?;
    let data = CString::new(data).map_err(nul)?;
    let flags = libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: every pointer is a NUL-terminated string that outlives the call.
    let rc = unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(dev.into())
}

pub(super) fn mount_error(e: &std::io::Error, mountpoint: &Path) -> MountError {
    if e.to_string().contains("user_allow_other") {
        return MountError::Mount(
            "--allow-other, --allow-root or --auto-unmount (which implies allow_root) as an \
             ordinary user needs a line `user_allow_other` in /etc/fuse.conf"
                .into(),
        );
    }
    match e.raw_os_error() {
        Some(libc::EPERM) | Some(libc::EACCES) => MountError::Mount(format!(
            "not permitted to mount on {}: run as root, install fuse3 (fusermount3), or in Docker \
             add --device /dev/fuse --cap-add SYS_ADMIN",
            mountpoint.display()
        )),
        Some(libc::ENOENT) if !Path::new("/dev/fuse").exists() => MountError::no_fuse(),
        _ => MountError::Mount(format!("{}: {e}", mountpoint.display())),
    }
}

/// Unmounts `path`: `umount2` as root (lazily if busy), else fuse3's `fusermount3 -u`.
pub fn unmount(path: &Path) -> std::io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes())?;
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        // SAFETY: c is a valid NUL-terminated path.
        if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EBUSY) {
            return Err(err);
        }
        // SAFETY: as above.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return Ok(());
        }
        return Err(std::io::Error::last_os_error());
    }
    for args in [["-u"].as_slice(), ["-u", "-z"].as_slice()] {
        let status = std::process::Command::new("fusermount3")
            .args(args)
            .arg(path)
            .status()?;
        if status.success() {
            return Ok(());
        }
    }
    Err(std::io::Error::other("fusermount3 -u failed"))
}
