//! `cstokenfs completions bash|zsh|fish`: clap_complete's script for the command line, which
//! completes the values of `--source`, `--view` and `--protocol`, file names for file flags
//! and directories for directory arguments (their value hints in cli.rs). Here: values that
//! are neither (a URL, seconds, an ID) complete to nothing rather than to file names, and
//! bash, whose generated script leaves positionals to readline's file names, gets
//! directories for `mount`'s MOUNTPOINT and `sink`'s DIR. `Listed` is the value parser that
//! gives clap those values while the parsers in cli.rs keep their own errors.

use super::{Cli, CliError};
use crate::source::Kind;
use crate::token::View;
use clap::builder::{PossibleValue, TypedValueParser};
use clap::{CommandFactory, ValueHint};

/// Appended to the bash script: where the generated function offers only flags or nothing
/// for a word of `mount` or `sink` that is not a flag, offer directories.
const BASH_DIRECTORIES: &str = r#"
# cstokenfs: MOUNTPOINT (mount) and DIR (sink) are directories.
_cstokenfs_dirs() {
    _cstokenfs "$@"
    local cur="${COMP_WORDS[COMP_CWORD]}" w
    case "${COMP_WORDS[1]}" in
        mount|sink) ;;
        *) return 0 ;;
    esac
    [[ ${cur} == -* ]] && return 0
    for w in "${COMPREPLY[@]}"; do
        [[ ${w} == -* ]] || return 0
    done
    COMPREPLY=( $(compgen -d -- "${cur}") )
    compopt -o filenames 2>/dev/null
    return 0
}
complete -F _cstokenfs_dirs -o bashdefault -o default cstokenfs
"#;

/// The script for `shell` (bash, zsh or fish, as the argument's parser allows).
pub fn script(shell: &str) -> Vec<u8> {
    let (shell, extra) = match shell {
        "bash" => (clap_complete::Shell::Bash, BASH_DIRECTORIES),
        "zsh" => (clap_complete::Shell::Zsh, ""),
        _ => (clap_complete::Shell::Fish, ""),
    };
    let mut cmd = no_file_names(Cli::command());
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "cstokenfs", &mut out);
    out.extend_from_slice(extra.as_bytes());
    out
}

/// `completions SHELL`: the script on stdout.
pub fn command(shell: &str) -> Result<(), CliError> {
    super::write_stdout(&script(shell))
}

/// Values with no hint and no fixed set (URLs, numbers, IDs, names) complete to nothing
/// instead of to file names, in every subcommand.
fn no_file_names(cmd: clap::Command) -> clap::Command {
    cmd.mut_args(|a| {
        let unknown = a.get_value_hint() == ValueHint::Unknown
            && a.get_action().takes_values()
            && a.get_value_parser().possible_values().is_none();
        if unknown {
            a.value_hint(ValueHint::Other)
        } else {
            a
        }
    })
    .mut_subcommands(no_file_names)
}

/// A value parser that keeps `parse`'s own errors and tells completions the values it
/// takes (help lists them in its own words).
#[derive(Clone)]
pub(super) struct Listed<P> {
    parse: P,
    values: fn() -> Vec<&'static str>,
}

pub(super) fn listed<P>(parse: P, values: fn() -> Vec<&'static str>) -> Listed<P> {
    Listed { parse, values }
}

impl<P: TypedValueParser> TypedValueParser for Listed<P> {
    type Value = P::Value;

    fn parse_ref(
        &self,
        cmd: &clap::Command,
        arg: Option<&clap::Arg>,
        value: &std::ffi::OsStr,
    ) -> Result<Self::Value, clap::Error> {
        self.parse.parse_ref(cmd, arg, value)
    }

    fn possible_values(&self) -> Option<Box<dyn Iterator<Item = PossibleValue> + '_>> {
        Some(Box::new(
            (self.values)().into_iter().map(PossibleValue::new),
        ))
    }
}

/// `--source`'s values: auto and every upstream.
pub(super) fn source_values() -> Vec<&'static str> {
    std::iter::once("auto")
        .chain(Kind::ALL.into_iter().map(Kind::name))
        .collect()
}

/// `--view`'s values.
pub(super) fn view_values() -> Vec<&'static str> {
    View::ALL
        .into_iter()
        .map(|v| match v {
            View::Raw => "raw",
            v => v.label(),
        })
        .collect()
}

/// `--protocol`'s values: what the emulator serves, the Entra ones as `entra`.
pub(super) fn protocol_values() -> Vec<&'static str> {
    crate::emulator::SERVED
        .into_iter()
        .filter(|k| !k.is_entra())
        .map(Kind::name)
        .chain(std::iter::once("entra"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// The fixed sets complete to their values, URLs to nothing, files to file names,
    /// MOUNTPOINT and DIR to directories.
    #[test]
    fn values_files_and_directories() {
        let bash = String::from_utf8(script("bash")).unwrap();
        for values in [source_values(), view_values(), protocol_values()] {
            let words = format!("compgen -W \"{}\"", values.join(" "));
            assert!(bash.contains(&words), "{words}");
        }
        assert!(bash.contains("\"auto cloudshell imds appservice arc azure-cli workload-identity"));
        assert!(bash.contains("\"raw json header kubectl"));
        assert!(bash.contains("\"cloudshell imds appservice arc entra\""));
        assert!(bash.contains("compgen -d -- \"${cur}\""));
        assert!(bash.ends_with("complete -F _cstokenfs_dirs -o bashdefault -o default cstokenfs\n"));
        let zsh = String::from_utf8(script("zsh")).unwrap();
        assert!(zsh.contains(":mountpoint -- Where to mount (an existing directory):_files -/"));
        assert!(zsh.contains(":URL:' \\"), "no file names for a URL");
        assert!(zsh.contains("]:PATH:_files' \\"));
        let fish = String::from_utf8(script("fish")).unwrap();
        assert!(fish.contains("-l data-dir") && fish.contains("__fish_complete_directories"));
    }

    /// What bash's completion function offers for `words` (the last one being completed),
    /// in a directory holding `dir_a/`, `dir_b/` and `file_a`.
    fn offered(words: &[&str]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("dir_a")).unwrap();
        std::fs::create_dir(dir.path().join("dir_b")).unwrap();
        std::fs::write(dir.path().join("file_a"), "").unwrap();
        std::fs::write(dir.path().join("c.bash"), script("bash")).unwrap();
        let quoted: Vec<String> = words.iter().map(|w| format!("'{w}'")).collect();
        let program = format!(
            "source ./c.bash; COMP_WORDS=({}); COMP_CWORD={}; \
             _cstokenfs_dirs cstokenfs \"${{COMP_WORDS[COMP_CWORD]}}\" \
             \"${{COMP_WORDS[COMP_CWORD-1]}}\" 2>/dev/null; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
            quoted.join(" "),
            words.len() - 1
        );
        let out = Command::new("bash")
            .args(["--norc", "-c", &program])
            .current_dir(dir.path())
            .output()
            .expect("bash");
        let mut words: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(String::from)
            .collect();
        words.sort();
        words
    }

    #[test]
    fn bash_completes_values_and_directories() {
        if !std::path::Path::new("/bin/bash").exists() {
            eprintln!("bash is missing: the bash completion is not run");
            return;
        }
        assert_eq!(
            offered(&["cstokenfs", "mount", "--source", "w"]),
            ["workload-identity"]
        );
        assert_eq!(
            offered(&["cstokenfs", "get", "--view", "gi"]),
            ["git-credential"]
        );
        assert_eq!(
            offered(&["cstokenfs", "emulator", "--protocol", "e"]),
            ["entra"]
        );
        assert_eq!(offered(&["cstokenfs", "mount", "d"]), ["dir_a", "dir_b"]);
        assert_eq!(
            offered(&["cstokenfs", "mount", "-f", ""]),
            ["dir_a", "dir_b"]
        );
        assert_eq!(
            offered(&["cstokenfs", "sink", "--resource", "x", "d"]),
            ["dir_a", "dir_b"]
        );
        assert_eq!(
            offered(&["cstokenfs", "mount", "--log-file", "f"]),
            ["file_a"]
        );
        assert_eq!(offered(&["cstokenfs", "get", "--endpoint", "ht"]), ["ht"]);
    }
}
