//! Who may ask `--serve-imds` for a token: exactly the uids that could open the mount's
//! top-level token files. IMDS has no secret, so the decision rests on the uid that owns
//! the connecting socket (see `peer`); this module is the rule alone, a pure function.

use crate::access::Access;

/// Who may reach the mount at all, besides what its modes say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reach {
    /// The uid the daemon runs as (who mounted).
    pub mounter: u32,
    /// `--allow-other`: users other than the one who mounted may enter.
    pub allow_other: bool,
}

/// Whether `uid`, a member of `groups`, may ask: root always; nobody but the mounting user
/// without `--allow-other`; then the permission bits of the token files as the kernel
/// applies them: the owner class decides for the files' owner, the group class for a
/// member of the files' group, the other class for everyone else.
pub fn may_ask(uid: u32, groups: &[u32], access: &Access, reach: Reach) -> bool {
    if uid == 0 {
        return true;
    }
    if uid != reach.mounter && !reach.allow_other {
        return false;
    }
    let mode = access.file_mode;
    if uid == access.uid {
        mode & 0o400 != 0
    } else if groups.contains(&access.gid) {
        mode & 0o040 != 0
    } else {
        mode & 0o004 != 0
    }
}

/// Whether [`may_ask`] for `uid` can depend on its groups (so they are worth looking up).
pub fn needs_groups(uid: u32, access: &Access, reach: Reach) -> bool {
    uid != 0
        && (uid == reach.mounter || reach.allow_other)
        && uid != access.uid
        && (access.file_mode & 0o040 != 0) != (access.file_mode & 0o004 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access(uid: u32, gid: u32, file_mode: u16) -> Access {
        Access {
            uid,
            gid,
            file_mode,
        }
    }

    const ALONE: Reach = Reach {
        mounter: 1000,
        allow_other: false,
    };
    const OTHERS: Reach = Reach {
        mounter: 1000,
        allow_other: true,
    };

    #[test]
    fn root_always() {
        for mode in [0o000, 0o400, 0o444] {
            assert!(may_ask(0, &[], &access(1000, 1000, mode), ALONE));
            assert!(!needs_groups(0, &access(1000, 50, mode), OTHERS));
        }
    }

    #[test]
    fn the_owner_by_the_owner_bits() {
        assert!(may_ask(1000, &[1000], &access(1000, 1000, 0o400), ALONE));
        assert!(!may_ask(1000, &[1000], &access(1000, 1000, 0o040), ALONE));
        // The owner class decides for the owner, even when others may read.
        assert!(!may_ask(1000, &[1000], &access(1000, 1000, 0o044), OTHERS));
    }

    #[test]
    fn others_only_with_allow_other() {
        let a = access(1000, 2000, 0o444);
        assert!(!may_ask(1001, &[2000], &a, ALONE));
        assert!(!needs_groups(1001, &a, ALONE));
        assert!(may_ask(1001, &[], &a, OTHERS));
        assert!(may_ask(1001, &[2000], &a, OTHERS));
    }

    #[test]
    fn group_members_by_the_group_bits() {
        let a = access(1000, 2000, 0o440);
        assert!(needs_groups(1001, &a, OTHERS));
        assert!(may_ask(1001, &[5, 2000], &a, OTHERS));
        assert!(!may_ask(1001, &[5], &a, OTHERS));
        // Group class decides for members: 0404 lets others in but not the group.
        let b = access(1000, 2000, 0o404);
        assert!(!may_ask(1001, &[2000], &b, OTHERS));
        assert!(may_ask(1001, &[3000], &b, OTHERS));
    }

    #[test]
    fn the_mounter_who_does_not_own_the_files() {
        // `--uid 2000` mounted by 1000: 1000 is then an "other" to the files.
        let a = access(2000, 2000, 0o400);
        assert!(!may_ask(1000, &[1000], &a, ALONE));
        assert!(may_ask(2000, &[], &a, OTHERS));
        assert!(!may_ask(2000, &[], &a, ALONE));
        assert!(may_ask(1000, &[], &access(2000, 2000, 0o404), ALONE));
    }

    #[test]
    fn groups_matter_only_when_the_group_and_other_bits_differ() {
        assert!(!needs_groups(1001, &access(1000, 2000, 0o444), OTHERS));
        assert!(!needs_groups(1001, &access(1000, 2000, 0o400), OTHERS));
        assert!(!needs_groups(1000, &access(1000, 2000, 0o440), OTHERS));
        assert!(needs_groups(1000, &access(2000, 2000, 0o440), ALONE));
    }
}
