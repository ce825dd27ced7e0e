//! Who is calling: the uid that owns a connecting TCP socket (the shared look-up,
//! [`crate::httpserver::peer`]), and that uid's groups (getgrouplist), which blocks briefly
//! (NSS), so callers run it off the server's thread.

pub use crate::httpserver::peer::{owner, Owner};

/// The groups of `uid` as login would set them (its passwd entry's group and the group
/// database's, getgrouplist); empty for a uid without a passwd entry.
pub fn groups_of(uid: u32) -> Vec<u32> {
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut found: *mut libc::passwd = std::ptr::null_mut();
    let mut buf = vec![0 as libc::c_char; 16 * 1024];
    // SAFETY: `buf` outlives `pw`'s pointers, which are read only below.
    let rc = unsafe { libc::getpwuid_r(uid, &mut pw, buf.as_mut_ptr(), buf.len(), &mut found) };
    if rc != 0 || found.is_null() {
        return Vec::new();
    }
    let mut n: libc::c_int = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n as usize];
        let asked = n;
        // SAFETY: `pw.pw_name` is a C string in `buf`; `groups` holds `n` entries.
        let rc = unsafe { libc::getgrouplist(pw.pw_name, pw.pw_gid, groups.as_mut_ptr(), &mut n) };
        if rc >= 0 {
            groups.truncate(n.max(0) as usize);
            return groups;
        }
        if n <= asked {
            // No larger size was asked for: give up rather than loop.
            return vec![pw.pw_gid];
        }
        if n > 65_536 {
            return vec![pw.pw_gid];
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_is_in_its_own_group() {
        assert!(groups_of(0).contains(&0));
        assert!(groups_of(4_000_000_000).is_empty());
    }
}
