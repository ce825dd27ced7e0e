//! FUSE-style command lines, so fstab and mount(8) work: `cstokenfs SOURCE MOUNTPOINT -o
//! allow_other,uid=1000,...` and `cstokenfs mount -o ... MOUNTPOINT` are rewritten into long
//! flags (`--allow-other --uid=1000`) before clap sees them, so clap checks `-o` values with
//! the same messages (and suggestions) as the long flags. Every long flag of `mount` is an
//! `-o` key, its name with `_` for `-`: nothing here lists them, they come from the clap
//! definition the caller passes (the program's: `Cli::command()`). Options mount(8) and
//! mount.fuse3 add on their own are accepted and ignored (the mount is always read-only,
//! nosuid, nodev, noexec).
//!
//! The `SOURCE MOUNTPOINT` form applies only when invoked as a mount helper would be: under
//! a `mount.*` name (`mount.cstokenfs`, `mount.fuse.cstokenfs`), or with `-o` (mount.fuse3
//! always passes `-o`: it adds `dev,suid` at least). Anything else is clap's, so a mistyped
//! subcommand is clap's "unrecognized subcommand" error with its suggestion.

use std::ffi::{OsStr, OsString};

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

/// The subcommand `-o` and the `SOURCE MOUNTPOINT` form belong to.
const MOUNT: &str = "mount";

/// The names (and aliases) of every subcommand of `cli`, plus `help`.
pub fn subcommands(cli: &clap::Command) -> Vec<String> {
    let mut names: Vec<String> = cli
        .get_subcommands()
        .flat_map(|s| std::iter::once(s.get_name()).chain(s.get_all_aliases()))
        .map(str::to_owned)
        .collect();
    names.push("help".into());
    names
}

/// The `-o` keys: every long flag of `cli`'s `mount` with `_` for `-`, and whether it takes
/// a value.
#[cfg(test)]
pub fn option_keys(cli: &clap::Command) -> Vec<(String, bool)> {
    let Some(mount) = cli.find_subcommand(MOUNT) else {
        return Vec::new();
    };
    mount
        .get_arguments()
        .filter(|a| !a.is_positional())
        .filter_map(|a| Some((a.get_long()?.replace('-', "_"), takes_value(a))))
        .filter(|(k, _)| k != "help")
        .collect()
}

fn takes_value(arg: &clap::Arg) -> bool {
    arg.get_action().takes_values()
}

/// Whether the `mount` flag spelled `flag` (`--uid`, `-f`) takes a value as the next
/// argument; unknown flags are taken as switches (clap then names them).
fn flag_takes_value(mount: &clap::Command, flag: &str) -> bool {
    if let Some(long) = flag.strip_prefix("--") {
        return !long.contains('=')
            && mount
                .get_arguments()
                .any(|a| a.get_long() == Some(long) && takes_value(a));
    }
    // A cluster of shorts (`-fd`): the last one may take the next argument.
    let Some(last) = flag.chars().last().filter(|_| flag.len() == 2) else {
        return false;
    };
    mount
        .get_arguments()
        .any(|a| a.get_short() == Some(last) && takes_value(a))
}

/// Whether argv[0] names a mount helper: `mount.cstokenfs`, `mount.fuse.cstokenfs`, ...
fn invoked_as_mount_helper(argv0: &OsStr) -> bool {
    std::path::Path::new(argv0)
        .file_name()
        .and_then(OsStr::to_str)
        .is_some_and(|n| n.starts_with("mount."))
}

fn has_dash_o(args: &[OsString]) -> bool {
    args.iter().any(|a| {
        a.to_str()
            .is_some_and(|s| s == "-o" || (s.starts_with("-o") && s.len() > 2))
    })
}

/// Rewrites a FUSE-style command line into `mount` with long flags, as `cli` (the program's
/// clap definition) spells them; anything else is returned unchanged but for `-o` after
/// `mount`.
pub fn rewrite(cli: &clap::Command, args: Vec<OsString>) -> Result<Vec<OsString>, clap::Error> {
    let Some(argv0) = args.first().cloned() else {
        return Ok(args);
    };
    let helper = invoked_as_mount_helper(&argv0);
    let first = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
    if subcommands(cli).iter().any(|s| s == first) {
        if first != MOUNT {
            return Ok(args);
        }
        let mut out = args[..2].to_vec();
        out.extend(expand(&args[2..]));
        return Ok(out);
    }
    if args.len() < 2 || !(helper || has_dash_o(&args[1..])) {
        // `cstokenfs mout ...`, `cstokenfs --version`, no arguments: clap answers.
        return Ok(args);
    }
    mount_form(cli, argv0, &args[1..], helper)
}

/// `SOURCE MOUNTPOINT [options]` (or `MOUNTPOINT -o ...`): options may come before, between
/// or after the two.
fn mount_form(
    cli: &clap::Command,
    argv0: OsString,
    args: &[OsString],
    helper: bool,
) -> Result<Vec<OsString>, clap::Error> {
    let mount = cli
        .find_subcommand(MOUNT)
        .cloned()
        .unwrap_or_else(|| clap::Command::new(MOUNT));
    let mut positional = Vec::new();
    let mut rest = Vec::new();
    let mut iter = args.iter();
    while let Some(a) = iter.next() {
        match a.to_str() {
            Some("--") => positional.extend(iter.by_ref().cloned()),
            Some("-o") => {
                rest.push(a.clone());
                rest.extend(iter.next().cloned());
            }
            // mount(8)'s helper flags: sloppy, no mtab, verbose.
            Some("-s" | "-n" | "-v") if helper => {}
            Some(s) if s.starts_with('-') && s.len() > 1 => {
                rest.push(a.clone());
                if !s.starts_with("-o") && flag_takes_value(&mount, s) {
                    rest.extend(iter.next().cloned());
                }
            }
            _ => positional.push(a.clone()),
        }
    }
    let (source, mountpoint) = match <[OsString; 2]>::try_from(positional) {
        Ok([source, mountpoint]) => (Some(source), mountpoint),
        Err(p) if p.len() == 1 => (None, p[0].clone()),
        Err(p) => {
            let msg = format!(
                "the mount(8) form is `cstokenfs SOURCE MOUNTPOINT -o OPTIONS`: expected SOURCE \
                 and MOUNTPOINT, got {} positional argument(s)",
                p.len()
            );
            return Err(mount
                .bin_name("cstokenfs mount")
                .error(clap::error::ErrorKind::WrongNumberOfValues, msg));
        }
    };
    let mut out = vec![argv0, MOUNT.into()];
    if let Some(source) = source {
        let mut fsname = OsString::from("--fsname=");
        fsname.push(source);
        out.push(fsname);
    }
    out.extend(expand(&rest));
    out.push("--".into());
    out.push(mountpoint);
    Ok(out)
}

/// Replaces each `-o LIST` / `-oLIST` by the long flags it stands for; a `-o` without a
/// list is left for clap to report.
fn expand(args: &[OsString]) -> Vec<OsString> {
    let mut out = Vec::new();
    let mut iter = args.iter();
    while let Some(a) = iter.next() {
        let list = match a.to_str() {
            Some("--") => {
                out.push(a.clone());
                out.extend(iter.by_ref().cloned());
                break;
            }
            Some("-o") => match iter.next() {
                Some(list) => list.clone(),
                None => {
                    out.push(a.clone());
                    continue;
                }
            },
            Some(s) if s.starts_with("-o") && s.len() > 2 => OsString::from(&s[2..]),
            _ => {
                out.push(a.clone());
                continue;
            }
        };
        let Some(list) = list.to_str() else {
            // Not UTF-8: clap reports it against -o.
            out.push("-o".into());
            out.push(list);
            continue;
        };
        out.extend(list.split(',').filter_map(option));
    }
    out
}

/// One `key` or `key=value` of a `-o` list as a long flag (`--key`, `--key=value`), for clap
/// to check; `None` for what mount(8) passes and does not apply.
fn option(item: &str) -> Option<OsString> {
    let (raw_key, value) = match item.split_once('=') {
        Some((k, v)) => (k, Some(v)),
        None => (item, None),
    };
    if raw_key.is_empty()
        || IGNORED.contains(&raw_key)
        || raw_key.starts_with("x-")
        || raw_key == "comment"
    {
        return None;
    }
    let key = raw_key.replace('_', "-");
    Some(match value {
        Some(v) => format!("--{key}={v}").into(),
        None => format!("--{key}").into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A definition of the shape the program's has: `mount` with a flag that takes a value
    /// and one that does not, and another subcommand.
    fn cli() -> clap::Command {
        use clap::{Arg, ArgAction, Command};
        Command::new("cstokenfs")
            .subcommand(
                Command::new(MOUNT)
                    .arg(Arg::new("mountpoint"))
                    .arg(Arg::new("endpoint").long("endpoint"))
                    .arg(
                        Arg::new("foreground")
                            .short('f')
                            .long("foreground")
                            .action(ArgAction::SetTrue),
                    ),
            )
            .subcommand(Command::new("get").arg(Arg::new("name")))
    }

    fn v(s: &str) -> Vec<OsString> {
        s.split(' ').map(OsString::from).collect()
    }

    #[test]
    fn fstab_style_becomes_mount_with_long_flags() {
        let got = rewrite(&cli(), v("cstokenfs cstoken /run/cstoken -o rw,dev,suid,allow_other,uid=1000,gid=1000,mode=0440,refresh_margin=300,endpoint=http://127.0.0.1:1/oauth2/token")).unwrap();
        let want = v("cstokenfs mount --fsname=cstoken --allow-other --uid=1000 --gid=1000 --mode=0440 --refresh-margin=300 --endpoint=http://127.0.0.1:1/oauth2/token -- /run/cstoken");
        assert_eq!(got, want);
    }

    #[test]
    fn options_first_glued_and_flags_with_values() {
        let got = rewrite(&cli(), v("cstokenfs -oallow_other src /m")).unwrap();
        assert_eq!(got, v("cstokenfs mount --fsname=src --allow-other -- /m"));
        let got = rewrite(&cli(), v("cstokenfs src -o allow_other /m -f")).unwrap();
        assert_eq!(
            got,
            v("cstokenfs mount --fsname=src --allow-other -f -- /m")
        );
        // A long flag's value is not taken for a positional.
        let got = rewrite(&cli(), v("cstokenfs --endpoint http://x src /m -o debug")).unwrap();
        assert_eq!(
            got,
            v("cstokenfs mount --fsname=src --endpoint http://x --debug -- /m")
        );
    }

    #[test]
    fn mount_helper_names_take_the_mount_form_without_o() {
        let got = rewrite(&cli(), v("/sbin/mount.cstokenfs src /m")).unwrap();
        assert_eq!(got, v("/sbin/mount.cstokenfs mount --fsname=src -- /m"));
        let got = rewrite(&cli(), v("mount.fuse.cstokenfs src /m -n -s -v -o ro")).unwrap();
        assert_eq!(got, v("mount.fuse.cstokenfs mount --fsname=src -- /m"));
    }

    #[test]
    fn without_o_a_stray_word_is_clap_business() {
        for line in [
            "cstokenfs mout --emulator /tmp/x",
            "cstokenfs gett management.azure.com",
            "cstokenfs --version",
        ] {
            assert_eq!(rewrite(&cli(), v(line)).unwrap(), v(line));
        }
    }

    #[test]
    fn mount_subcommand_accepts_o() {
        let got = rewrite(
            &cli(),
            v("cstokenfs mount -o foreground,log_file=/tmp/x,resource=vault.azure.net /m"),
        )
        .unwrap();
        assert_eq!(
            got,
            v("cstokenfs mount --foreground --log-file=/tmp/x --resource=vault.azure.net /m")
        );
        assert_eq!(
            rewrite(&cli(), v("cstokenfs get x")).unwrap(),
            v("cstokenfs get x")
        );
        assert_eq!(
            rewrite(&cli(), v("cstokenfs mount /m -o")).unwrap(),
            v("cstokenfs mount /m -o")
        );
    }

    /// `identity=NAME=KEY=VALUE`: the first `=` ends the key, the rest is the flag's value
    /// (repeated per setting, as the flag is).
    #[test]
    fn identity_options_keep_their_inner_equals_signs() {
        let got = rewrite(
            &cli(),
            v("cstokenfs cstoken /m -o identity=ci=client-id=G,identity=ci=tenant-id=T"),
        )
        .unwrap();
        assert_eq!(
            got,
            v("cstokenfs mount --fsname=cstoken --identity=ci=client-id=G --identity=ci=tenant-id=T -- /m")
        );
    }

    #[test]
    fn bad_options_reach_clap_as_flags() {
        assert_eq!(
            rewrite(&cli(), v("cstokenfs s /m -o allow_otehr,refresh_margin=-5")).unwrap(),
            v("cstokenfs mount --fsname=s --allow-otehr --refresh-margin=-5 -- /m")
        );
        assert!(rewrite(&cli(), v("cstokenfs a b c -o x")).is_err());
    }
}
