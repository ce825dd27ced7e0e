//! The fuser adapter: each callback calls one method of the core and maps `Ok` to a reply
//! and `Err` to its errno. Lookups may answer from a fetch thread. Every call fuser would
//! otherwise answer with a "[Not Implemented]" warning (three log lines per call, outside the
//! audit's rate limit) and that a reader can reach is answered here, quietly. Calls that
//! would change the filesystem never reach the daemon on this read-only mount (see the end).

use super::{noopen::FuseRequest, Caller, Core, FsError, OpenMode};
use fuser::{
    AccessFlags, Errno, FileHandle, Filesystem, FopenFlags, Generation, INodeNo, IoctlFlags,
    LockOwner, OpenFlags, PollEvents, PollFlags, PollNotifier, ReplyAttr, ReplyBmap, ReplyData,
    ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyIoctl, ReplyLock, ReplyLseek,
    ReplyOpen, ReplyPoll, ReplyStatfs, Request,
};
use std::ffi::OsStr;
use std::sync::Arc;

pub struct FuseAdapter {
    core: Arc<Core>,
}

impl FuseAdapter {
    pub fn new(core: Arc<Core>) -> FuseAdapter {
        FuseAdapter { core }
    }
}

impl Filesystem for FuseAdapter {
    fn init(&mut self, _req: &Request, config: &mut fuser::KernelConfig) -> std::io::Result<()> {
        // Without this the kernel serializes lookups in a directory: a name waiting for its
        // first token would hold up every other name.
        if let Err(missing) = config.add_capabilities(fuser::InitFlags::FUSE_PARALLEL_DIROPS) {
            log::warn!("the kernel lacks {missing:?}: lookups in one directory run one at a time");
        }
        if self.core.no_open() {
            // No-open: the kernel answers opens itself once one OPEN got ENOSYS; it drops a
            // file's cached pages when its mtime changes (`.status`).
            let wanted =
                fuser::InitFlags::FUSE_NO_OPEN_SUPPORT | fuser::InitFlags::FUSE_AUTO_INVAL_DATA;
            if let Err(missing) = config.add_capabilities(wanted) {
                return Err(std::io::Error::other(format!(
                    "--no-open: the kernel lacks {missing:?} (Linux 4.19 or later has it)"
                )));
            }
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else {
            return reply.error(Errno::ENOENT);
        };
        let caller = Caller {
            pid: req.pid(),
            uid: req.uid(),
            gid: req.gid(),
        };
        self.core.lookup(parent.0, name, caller, move |r| match r {
            Ok(e) => reply.entry_with_ttls(&e.ttl, &e.entry_ttl, &e.attr, Generation(0)),
            Err(e) => reply.error(e.errno()),
        });
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.core.forget(ino.0, nlookup);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.core.getattr(ino.0) {
            Ok(e) => reply.attr(&e.ttl, &e.attr),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.core.count(FuseRequest::Open);
        if flags.acc_mode() != fuser::OpenAccMode::O_RDONLY {
            return reply.error(FsError::ReadOnly.errno());
        }
        let caller = Caller {
            pid: req.pid(),
            uid: req.uid(),
            gid: req.gid(),
        };
        match self.core.open(ino.0, caller) {
            Ok((fh, OpenMode::Cached)) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_NOFLUSH,
            ),
            Ok((fh, OpenMode::Direct)) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // The reply is sent while the handle's bytes are borrowed: no copy.
        let mut reply = Some(reply);
        let send = |bytes: &[u8]| {
            if let Some(r) = reply.take() {
                r.data(bytes);
            }
        };
        let sent = self.core.read(ino.0, fh.0, offset, size, send);
        if let (Err(e), Some(r)) = (sent, reply) {
            r.error(e.errno());
        }
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.core.count(FuseRequest::Release);
        self.core.release(fh.0);
        reply.ok();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lo: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.core.count(FuseRequest::Flush);
        match self.core.flush() {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.core.opendir(ino.0) {
            Ok(fh) => reply.opened(FileHandle(fh), FopenFlags::empty()),
            Err(e) => reply.error(e.errno()),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.core.release(fh.0);
        reply.ok();
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.core.readdir(fh.0) {
            Ok(entries) => {
                for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset as usize) {
                    if reply.add(INodeNo(*ino), (i + 1) as u64, *kind, name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(e.errno()),
        }
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: fuser::ReplyXattr,
    ) {
        reply.error(Errno::ENODATA);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    /// Python's `open()` asks whether the file is a terminal (TCGETS): it is not.
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY);
    }

    /// Only SEEK_DATA and SEEK_HOLE reach the daemon (the kernel does SET, CUR and END
    /// itself): a file is all data, no holes.
    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        match self.core.seek(ino.0, fh.0, offset, whence) {
            Ok(at) => reply.offset(at),
            Err(e) => reply.error(e.errno()),
        }
    }

    /// Nothing to sync: the files are generated, never written.
    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    /// `df`: no blocks, no free space, names up to 255 bytes.
    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        reply.statfs(0, 0, 0, 0, 0, 4096, 255, 4096);
    }

    /// Not sent while `default_permissions` is on (always): the kernel checks the modes.
    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        reply.ok();
    }

    /// Nothing is a symlink, so the kernel never asks.
    fn readlink(&self, _req: &Request, _ino: INodeNo, reply: ReplyData) {
        reply.error(Errno::EINVAL);
    }

    /// `select`/`poll` on a file: ENOSYS makes the kernel stop asking and answer "ready"
    /// itself, as for any regular file.
    fn poll(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _ph: PollNotifier,
        _events: PollEvents,
        _flags: PollFlags,
        reply: ReplyPoll,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// Not sent: POSIX locks (FUSE_POSIX_LOCKS) and flock (FUSE_FLOCK_LOCKS) are not
    /// negotiated, so the kernel keeps locks locally. ENOSYS if one came anyway.
    fn getlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        reply: ReplyLock,
    ) {
        reply.error(Errno::ENOSYS);
    }

    fn setlk(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        _start: u64,
        _end: u64,
        _typ: i32,
        _pid: u32,
        _sleep: bool,
        reply: ReplyEmpty,
    ) {
        reply.error(Errno::ENOSYS);
    }

    /// Not sent: only for `blkdev` mounts (FIBMAP here never reaches the daemon).
    fn bmap(&self, _req: &Request, _ino: INodeNo, _blocksize: u32, _idx: u64, reply: ReplyBmap) {
        reply.error(Errno::ENOSYS);
    }

    /// Not sent: READDIRPLUS is not negotiated. ENOSYS makes the kernel use plain readdir.
    fn readdirplus(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        reply: ReplyDirectoryPlus,
    ) {
        reply.error(Errno::ENOSYS);
    }

    // Nothing that would change the filesystem is answered here. The mount is read-only
    // (MS_RDONLY), so the VFS refuses writes, creates, mknod, mkdir, unlink, rmdir,
    // symlink, rename, link, chmod/chown/utimes (setattr), setxattr and removexattr with
    // EROFS before the daemon hears of them, and fallocate and copy_file_range need a file
    // open for writing, which `open` never grants (that one refusal stays: a writable open
    // of a token must never succeed, even on a mount someone remounted read-write).
}
