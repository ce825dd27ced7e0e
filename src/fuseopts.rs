//! FUSE-style command lines, so fstab and mount(8) work: `cstokenfs SOURCE MOUNTPOINT -o
//! allow_other,uid=1000,...` and `cstokenfs mount -o ... MOUNTPOINT` are rewritten into the
//! long flags before clap sees them. Every long flag of `mount` has an `-o` key (its name with
//! `_` for `-`); options mount(8) and mount.fuse3 add on their own are accepted and ignored
//! (the mount is always read-only, nosuid, nodev, noexec).

use std::ffi::OsString;

const SUBCOMMANDS: &[&str] = &["mount", "sink", "get", "emulator", "help"];

/// `-o` keys that take a value, as long flags.
const VALUE_KEYS: &[&str] = &[
    "endpoint",
    "resource",
    "refresh-margin",
    "timeout",
    "negative-ttl",
    "max-resources",
    "max-upstream-rate",
    "log-file",
    "uid",
    "gid",
    "mode",
    "fsname",
    "source",
    "client-id",
    "object-id",
    "msi-res-id",
    "serve-endpoint",
    "tenant-id",
    "authority-host",
    "federated-token-file",
    "client-secret-file",
    "client-certificate",
    "ca-file",
];

/// `-o` keys that are switches.
const FLAG_KEYS: &[&str] = &["foreground", "emulator", "allow-other", "mlock", "no-open"];

/// What mount(8) and mount.fuse3 pass that does not apply here.
const IGNORED: &[&str] = &[
    "rw",
    "ro",
    "dev",
    "nodev",
    "suid",
    "nosuid",
    "exec",
    "noexec",
    "async",
    "sync",
    "dirsync",
    "atime",
    "noatime",
    "relatime",
    "norelatime",
    "strictatime",
    "nostrictatime",
    "diratime",
    "nodiratime",
    "lazytime",
    "nolazytime",
    "auto",
    "noauto",
    "user",
    "nouser",
    "users",
    "owner",
    "group",
    "defaults",
    "_netdev",
    "nofail",
    "default_permissions",
    "silent",
    "loud",
    "mand",
    "nomand",
    "iversion",
    "noiversion",
    "blkdev",
    "subtype",
];

/// Rewrites a FUSE-style command line into `mount` with long flags; anything else is
/// returned unchanged but for `-o` after `mount`.
pub fn rewrite(args: Vec<OsString>) -> Result<Vec<OsString>, String> {
    let Some(first) = args.get(1).and_then(|a| a.to_str()) else {
        return Ok(args);
    };
    if first.starts_with('-') || SUBCOMMANDS.contains(&first) {
        if first != "mount" {
            return Ok(args);
        }
        let mut out = args[..2].to_vec();
        out.extend(expand(&args[2..])?);
        return Ok(out);
    }
    // SOURCE MOUNTPOINT [options]: options may come before, between or after.
    let mut positional = Vec::new();
    let mut rest = Vec::new();
    let mut iter = args[1..].iter();
    while let Some(a) = iter.next() {
        match a.to_str() {
            Some("-o") => {
                rest.push(a.clone());
                rest.extend(iter.next().cloned());
            }
            Some(s) if s.starts_with('-') => rest.push(a.clone()),
            _ => positional.push(a.clone()),
        }
    }
    let [source, mountpoint] = <[OsString; 2]>::try_from(positional).map_err(|p| {
        format!(
            "expected SOURCE MOUNTPOINT [-o OPTIONS], got {} positional arguments",
            p.len()
        )
    })?;
    let mut out = vec![args[0].clone(), "mount".into(), "--fsname".into(), source];
    out.extend(expand(&rest)?);
    out.push(mountpoint);
    Ok(out)
}

/// Replaces each `-o LIST` / `-oLIST` by the long flags it stands for.
fn expand(args: &[OsString]) -> Result<Vec<OsString>, String> {
    let mut out = Vec::new();
    let mut iter = args.iter();
    while let Some(a) = iter.next() {
        let list = match a.to_str() {
            Some("-o") => iter
                .next()
                .ok_or("-o needs a list of options")?
                .to_str()
                .ok_or("-o options must be UTF-8")?,
            Some(s) if s.starts_with("-o") && s.len() > 2 => &s[2..],
            _ => {
                out.push(a.clone());
                continue;
            }
        };
        for item in list.split(',').filter(|i| !i.is_empty()) {
            out.extend(option(item)?);
        }
    }
    Ok(out)
}

/// One `key` or `key=value` of a `-o` list, as long flags.
fn option(item: &str) -> Result<Vec<OsString>, String> {
    let (raw_key, value) = match item.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (item, None),
    };
    if IGNORED.contains(&raw_key) || raw_key.starts_with("x-") || raw_key == "comment" {
        return Ok(Vec::new());
    }
    let key = raw_key.replace('_', "-");
    let flag = OsString::from(format!("--{key}"));
    match value {
        Some(v) if VALUE_KEYS.contains(&key.as_str()) => Ok(vec![flag, v.into()]),
        None if FLAG_KEYS.contains(&key.as_str()) => Ok(vec![flag]),
        None if VALUE_KEYS.contains(&key.as_str()) => {
            Err(format!("option {raw_key} needs a value ({raw_key}=...)"))
        }
        Some(_) if FLAG_KEYS.contains(&key.as_str()) => {
            Err(format!("option {raw_key} takes no value"))
        }
        _ => Err(format!("unknown option {raw_key:?} in -o")),
    }
}

/// An octal permission mode, with or without a leading 0 (`0440`, `440`).
pub fn parse_mode(s: &str) -> Result<u16, String> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    match u16::from_str_radix(digits, 8) {
        Ok(m) if m <= 0o777 && !digits.is_empty() => Ok(m),
        _ => Err(format!("{s:?} is not an octal mode such as 0400 or 440")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(s: &str) -> Vec<OsString> {
        s.split(' ').map(OsString::from).collect()
    }

    #[test]
    fn fstab_style_becomes_mount_with_long_flags() {
        let got = rewrite(v("cstokenfs cstoken /run/cstoken -o rw,dev,suid,allow_other,uid=1000,gid=1000,mode=0440,refresh_margin=300,endpoint=http://127.0.0.1:1/oauth2/token")).unwrap();
        let want = v("cstokenfs mount --fsname cstoken --allow-other --uid 1000 --gid 1000 --mode 0440 --refresh-margin 300 --endpoint http://127.0.0.1:1/oauth2/token /run/cstoken");
        assert_eq!(got, want);
    }

    #[test]
    fn options_first_and_glued() {
        let got = rewrite(v("cstokenfs -oallow_other src /m")).unwrap();
        assert_eq!(
            got,
            v("cstokenfs -oallow_other src /m"),
            "a leading dash is clap's business"
        );
        let got = rewrite(v("cstokenfs src -o allow_other /m -f")).unwrap();
        assert_eq!(got, v("cstokenfs mount --fsname src --allow-other -f /m"));
    }

    #[test]
    fn mount_subcommand_accepts_o() {
        let got = rewrite(v(
            "cstokenfs mount -o foreground,log_file=/tmp/x,resource=vault.azure.net /m",
        ))
        .unwrap();
        assert_eq!(
            got,
            v("cstokenfs mount --foreground --log-file /tmp/x --resource vault.azure.net /m")
        );
        assert_eq!(rewrite(v("cstokenfs get x")).unwrap(), v("cstokenfs get x"));
    }

    #[test]
    fn bad_options_are_named() {
        assert!(rewrite(v("cstokenfs s /m -o bogus"))
            .unwrap_err()
            .contains("bogus"));
        assert!(rewrite(v("cstokenfs s /m -o uid"))
            .unwrap_err()
            .contains("needs a value"));
        assert!(rewrite(v("cstokenfs s /m -o allow_other=1"))
            .unwrap_err()
            .contains("no value"));
        assert!(rewrite(v("cstokenfs s"))
            .unwrap_err()
            .contains("SOURCE MOUNTPOINT"));
        assert!(rewrite(v("cstokenfs mount /m -o")).is_err());
    }

    #[test]
    fn modes_are_octal() {
        assert_eq!(parse_mode("0440"), Ok(0o440));
        assert_eq!(parse_mode("440"), Ok(0o440));
        assert_eq!(parse_mode("0400"), Ok(0o400));
        assert!(parse_mode("0888").is_err());
        assert!(parse_mode("7777").is_err());
        assert!(parse_mode("").is_err());
    }
}
