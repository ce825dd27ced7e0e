//! The mount table as this process sees it (/proc/self/mountinfo): read by `mount` (is the
//! mount point already a FUSE mount?) and by `sink` (which filesystem is DIR on?).

use std::os::unix::ffi::OsStrExt;
use std::path::Path;

/// One line of /proc/self/mountinfo.
pub(crate) struct Mounted {
    /// `major:minor` of the filesystem's device.
    pub device: String,
    /// The mount point, unescaped.
    pub point: Vec<u8>,
    /// The filesystem type (`fuse.cstokenfs`, `tmpfs`, ...).
    pub fstype: String,
}

/// The mount table as this process sees it (empty if it cannot be read).
pub(crate) fn mount_table() -> Vec<Mounted> {
    let Ok(info) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    info.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let device = fields.nth(2)?.to_string();
            let point = unescape(fields.nth(1)?);
            let fstype = line.split(" - ").nth(1)?.split(' ').next()?.to_string();
            Some(Mounted {
                device,
                point,
                fstype,
            })
        })
        .collect()
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(s: &str) -> Vec<u8> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (b[i], octal) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    out
}

/// Whether `path` is itself a FUSE mount point.
pub(crate) fn is_fuse_mount(path: &Path) -> bool {
    let want = path.as_os_str().as_bytes();
    mount_table()
        .iter()
        .any(|m| m.point == want && (m.fstype == "fuse" || m.fstype.starts_with("fuse.")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape(r"/run/a\040b\011c"), b"/run/a b\tc".to_vec());
        assert_eq!(unescape(r"/plain"), b"/plain".to_vec());
        assert_eq!(unescape(r"/back\134slash"), b"/back\\slash".to_vec());
    }
}
