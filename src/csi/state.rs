//! The driver's record of each published volume under `--state-dir` (one JSON file per
//! volume, named like its data directory): what a restarted driver needs to adopt it. Never
//! a token or a service-account token: the target path, the attributes, the pod and the key.
//! Written through the directory's descriptor, each record replaced atomically.

use super::attrs::{IdentityKey, Pod};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

/// A record's file name ends so.
const SUFFIX: &str = ".json";
/// The most a record may weigh (read from disk).
const MAX_RECORD: u64 = 64 * 1024;

/// One published volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub volume_id: String,
    pub target_path: String,
    /// Its directory under `--data-dir` (and this record's name).
    pub data: String,
    pub pod: Pod,
    pub key: IdentityKey,
    /// `resources` as the pod gave it.
    pub resources: String,
    pub file_mode: Option<u16>,
    pub group: Option<u32>,
}

/// `--state-dir`, held open.
pub struct StateDir {
    fd: OwnedFd,
    path: PathBuf,
}

impl StateDir {
    /// Opens `path` (made for root alone if missing).
    pub fn open(path: &Path) -> io::Result<StateDir> {
        super::volume::own_dir(path)?;
        let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::open(path, flags, Mode::empty())?;
        Ok(StateDir {
            fd,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `record` (replacing the one of the same volume).
    pub fn save(&self, record: &Record) -> io::Result<()> {
        let name = format!("{}{SUFFIX}", record.data);
        let temp = format!(".{name}.tmp");
        let bytes = serde_json::to_vec_pretty(record).map_err(io::Error::other)?;
        let _ = rfs::unlinkat(&self.fd, temp.as_str(), AtFlags::empty());
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rfs::openat(&self.fd, temp.as_str(), flags, Mode::from_raw_mode(0o600))?;
        let mut file = std::fs::File::from(fd);
        let written = file.write_all(&bytes).and_then(|()| file.sync_all());
        if let Err(e) = written {
            let _ = rfs::unlinkat(&self.fd, temp.as_str(), AtFlags::empty());
            return Err(e);
        }
        Ok(rfs::renameat(
            &self.fd,
            temp.as_str(),
            &self.fd,
            name.as_str(),
        )?)
    }

    /// Removes the record of the volume whose data directory is `data` (none is fine).
    pub fn remove(&self, data: &str) -> io::Result<()> {
        let name = format!("{data}{SUFFIX}");
        match rfs::unlinkat(&self.fd, name.as_str(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// The record of the volume whose data directory is `data`, if one reads.
    pub fn get(&self, data: &str) -> Option<Record> {
        self.read(&format!("{data}{SUFFIX}"))
            .ok()
            .filter(|r| r.data == data)
    }

    /// Every record that reads; what does not is named in the second list (and left).
    pub fn load(&self) -> io::Result<(Vec<Record>, Vec<String>)> {
        let mut records = Vec::new();
        let mut bad = Vec::new();
        for entry in std::fs::read_dir(&self.path)? {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') || !name.ends_with(SUFFIX) {
                continue;
            }
            match self.read(&name) {
                Ok(r) if format!("{}{SUFFIX}", r.data) == name => records.push(r),
                Ok(_) => bad.push(format!("{name}: names another volume's directory")),
                Err(e) => bad.push(format!("{name}: {e}")),
            }
        }
        records.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        Ok((records, bad))
    }

    fn read(&self, name: &str) -> io::Result<Record> {
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC | OFlags::NONBLOCK;
        let fd = rfs::openat(&self.fd, name, flags, Mode::empty())?;
        let st = rfs::fstat(&fd)?;
        if rfs::FileType::from_raw_mode(st.st_mode) != rfs::FileType::RegularFile {
            return Err(io::Error::other("not a regular file"));
        }
        let mut text = Vec::new();
        std::fs::File::from(fd)
            .take(MAX_RECORD)
            .read_to_end(&mut text)?;
        serde_json::from_slice(&text).map_err(|e| io::Error::other(format!("not a record: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Record {
        Record {
            volume_id: id.into(),
            target_path: "/var/lib/kubelet/pods/x/volumes/kubernetes.io~csi/t/mount".into(),
            data: super::super::volume::data_name(id),
            pod: Pod {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
                service_account: "sa".into(),
            },
            key: IdentityKey {
                tenant: "t".into(),
                client_id: "c".into(),
                issuer: "i".into(),
                subject: "system:serviceaccount:ns:sa".into(),
            },
            resources: "management.azure.com".into(),
            file_mode: Some(0o440),
            group: Some(2000),
        }
    }

    #[test]
    fn records_are_saved_loaded_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state");
        let state = StateDir::open(&path).unwrap();
        state.save(&record("b")).unwrap();
        state.save(&record("a")).unwrap();
        state.save(&record("a")).unwrap();
        std::fs::write(path.join("junk.json"), b"{").unwrap();
        let (records, bad) = state.load().unwrap();
        assert_eq!(records, vec![record("a"), record("b")]);
        assert_eq!(bad.len(), 1, "{bad:?}");
        state.remove(&record("a").data).unwrap();
        state.remove(&record("a").data).unwrap();
        assert_eq!(state.load().unwrap().0, vec![record("b")]);
        let mode = std::fs::metadata(path.join(format!("{}.json", record("b").data)))
            .unwrap()
            .permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
    }
}
