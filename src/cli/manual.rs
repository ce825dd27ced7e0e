//! The man pages: `cstokenfs(1)` and one page per subcommand (`cstokenfs-mount(1)`, ...).
//! clap_mangen renders what the command line defines (title, NAME, DESCRIPTION, OPTIONS,
//! the list of subcommands, VERSION); the SYNOPSIS is built from the same definition, with
//! each option's value; EXIT STATUS, ENVIRONMENT, SIGNALS, FILES, EXAMPLES and SEE ALSO are
//! the text below, rendered through the same roff writer.

use super::{Cli, CliError};
use crate::token::View;
use clap::{ArgAction, CommandFactory};
use clap_mangen::roff::{bold, italic, roman, Inline, Roff};
use clap_mangen::Man;
use std::io::Write;
use std::path::Path;

/// One paragraph of a hand-written section: a plain one, or one under a tag (`.TP`).
enum Para {
    Text(String),
    Tagged(String, String),
}

fn text(s: impl Into<String>) -> Para {
    Para::Text(s.into())
}

fn tag(t: impl Into<String>, s: impl Into<String>) -> Para {
    Para::Tagged(t.into(), s.into())
}

/// `cstokenfs man`: the main page on stdout; `cstokenfs man --dir DIR`: every page as a
/// file in DIR (created if missing), named as man(1) looks them up.
pub fn command(dir: Option<&Path>) -> Result<(), CliError> {
    let fail = |e: std::io::Error| CliError::Failure(format!("cannot render the man pages: {e}"));
    let pages = pages().map_err(fail)?;
    let Some(dir) = dir else {
        let (_, main) = &pages[0];
        return super::write_stdout(main);
    };
    std::fs::create_dir_all(dir)
        .map_err(|e| CliError::Failure(format!("cannot make {}: {e}", dir.display())))?;
    for (name, page) in &pages {
        let path = dir.join(name);
        std::fs::write(&path, page)
            .map_err(|e| CliError::Failure(format!("cannot write {}: {e}", path.display())))?;
    }
    Ok(())
}

/// Every page as (file name, roff): `cstokenfs.1` first, then one per subcommand.
pub fn pages() -> std::io::Result<Vec<(String, Vec<u8>)>> {
    let mut cmd = Cli::command().disable_help_subcommand(true);
    cmd.build();
    let mut pages = vec![("cstokenfs.1".to_string(), page(&cmd, None)?)];
    for sub in cmd.get_subcommands() {
        pages.push((
            format!("cstokenfs-{}.1", sub.get_name()),
            page(sub, Some(sub.get_name()))?,
        ));
    }
    Ok(pages)
}

/// One page: `sub` is the subcommand's name (None: the main page).
fn page(cmd: &clap::Command, sub: Option<&str>) -> std::io::Result<Vec<u8>> {
    let title = match sub {
        Some(s) => format!("cstokenfs-{s}"),
        None => "cstokenfs".into(),
    };
    let man = Man::new(cmd.clone())
        .title(title)
        .source(format!("cstokenfs {}", env!("CARGO_PKG_VERSION")))
        .manual("cstokenfs manual");
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    // Left-aligned, no hyphenation: flags and paths stay whole.
    let mut layout = Roff::new();
    layout.control("ad", ["l"]).control("nh", []);
    layout.to_writer(&mut out)?;
    man.render_name_section(&mut out)?;
    synopsis(cmd, sub).to_writer(&mut out)?;
    man.render_description_section(&mut out)?;
    if cmd.get_arguments().any(|a| !a.is_hide_set()) {
        man.render_options_section(&mut out)?;
    }
    if cmd.has_subcommands() {
        man.render_subcommands_section(&mut out)?;
    }
    let mut roff = Roff::new();
    for (heading, paras) in sections(sub) {
        if paras.is_empty() {
            continue;
        }
        roff.control("SH", [heading]);
        for p in paras {
            match p {
                Para::Text(s) => {
                    roff.control("PP", []);
                    roff.text([roman(s)]);
                }
                Para::Tagged(t, s) => {
                    roff.control("TP", []);
                    roff.text([bold(t)]);
                    roff.text([roman(s)]);
                }
            }
        }
    }
    roff.to_writer(&mut out)?;
    if cmd.get_version().is_some() {
        man.render_version_section(&mut out)?;
    }
    out.flush()?;
    Ok(out)
}

/// SYNOPSIS from the command's own arguments, each option with its value (clap_mangen's
/// synopsis leaves the values out): `cstokenfs mount [--source SOURCE] ... MOUNTPOINT`.
fn synopsis(cmd: &clap::Command, sub: Option<&str>) -> Roff {
    let mut line: Vec<Inline> = vec![bold("cstokenfs")];
    if let Some(s) = sub {
        line.push(roman(" "));
        line.push(bold(s));
    }
    for arg in cmd
        .get_arguments()
        .filter(|a| !a.is_hide_set() && !a.is_positional())
    {
        let name = match (arg.get_short(), arg.get_long()) {
            (Some(s), Some(l)) => format!("-{s}|--{l}"),
            (None, Some(l)) => format!("--{l}"),
            (Some(s), None) => format!("-{s}"),
            (None, None) => continue,
        };
        let required = arg.is_required_set();
        line.push(roman(if required { " " } else { " [" }));
        line.push(bold(name));
        if arg.get_action().takes_values() {
            let value = arg
                .get_value_names()
                .map(|v| v.join(" "))
                .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
            line.push(roman(" "));
            line.push(italic(value));
        }
        if !required {
            line.push(roman("]"));
        }
        if matches!(arg.get_action(), ArgAction::Append) {
            line.push(roman("..."));
        }
    }
    for arg in cmd.get_positionals().filter(|a| !a.is_hide_set()) {
        let value = arg
            .get_value_names()
            .map(|v| v.join(" "))
            .unwrap_or_else(|| arg.get_id().as_str().to_uppercase());
        line.push(roman(" "));
        line.push(italic(value));
    }
    if cmd.has_subcommands() {
        line.push(roman(" "));
        line.push(italic("COMMAND"));
        line.push(roman(" ..."));
    }
    let mut roff = Roff::new();
    roff.control("SH", ["SYNOPSIS"]);
    roff.text(line);
    roff
}

/// The hand-written sections of a page, in order; every page has each of them (one that
/// has nothing of its own says so).
fn sections(sub: Option<&str>) -> Vec<(&'static str, Vec<Para>)> {
    let or = |paras: Vec<Para>, none: &str| {
        if paras.is_empty() {
            vec![text(none)]
        } else {
            paras
        }
    };
    vec![
        ("EXIT STATUS", exit_status(sub)),
        (
            "ENVIRONMENT",
            or(
                environment(sub),
                "No environment variable changes what it does.",
            ),
        ),
        (
            "SIGNALS",
            or(
                signals(sub),
                "None is handled: SIGINT and SIGTERM end it at once (it keeps no state).",
            ),
        ),
        (
            "FILES",
            or(files(sub), "It reads and writes no file of its own."),
        ),
        ("EXAMPLES", examples(sub)),
        ("SEE ALSO", see_also(sub)),
    ]
}

fn exit_status(sub: Option<&str>) -> Vec<Para> {
    let ok = match sub {
        Some("mount") => {
            "Done: the mount is live (without -f, once it is; a cat right after works), or, \
             in the foreground, it was unmounted by SIGTERM or SIGINT."
        }
        Some("sink") => {
            "Done: every declared resource was written or failed once (without -f), or, in \
             the foreground, the sink was stopped by SIGTERM or SIGINT and removed its files."
        }
        Some("get") => "The token (or the view asked for) was printed.",
        Some("csi") => "Stopped by SIGTERM or SIGINT (the volumes stay mounted).",
        Some("emulator") => "Stopped by SIGTERM or SIGINT.",
        Some("credential-helper") => {
            "The credentials were printed (get, list), or the input was read (store, erase)."
        }
        _ => "Done (also for --help and --version).",
    };
    if sub == Some("credential-helper") {
        return vec![
            tag("0", ok),
            tag(
                "1",
                "No credentials: its message on standard output, as the protocol wants \
                 (credentials not found in native keychain: a registry the mount does not \
                 serve, and docker pulls anonymously; else what went wrong: no mount, access \
                 denied, no credentials in time).",
            ),
            tag("2", "A usage error: an unknown action or flag."),
        ];
    }
    vec![
        tag("0", ok),
        tag(
            "1",
            "A failure at run time, named in one line on standard error (cstokenfs: ...): the \
             mount or DIR is unusable, the fetch failed, a file cannot be read, a socket \
             cannot be listened on.",
        ),
        tag(
            "2",
            "A usage error: an unknown flag or subcommand, a bad value, or flags and \
             environment that ask for something that cannot work; nothing was started.",
        ),
    ]
}

/// The variables `--source auto` reads, and those the Entra sources default to.
fn detection_variables() -> Vec<Para> {
    vec![
        tag(
            "MSI_ENDPOINT, MSI_SECRET",
            "Cloud Shell's token endpoint when MSI_ENDPOINT is set alone; also the default of \
             --endpoint.",
        ),
        tag(
            "IDENTITY_ENDPOINT, IDENTITY_HEADER",
            "App Service, Functions and Container Apps (both set).",
        ),
        tag(
            "IDENTITY_ENDPOINT, IMDS_ENDPOINT",
            "An Azure Arc-connected server (both set). IMDS itself is used only with \
             --source imds.",
        ),
        tag(
            "AZURE_CLIENT_ID",
            "The default of --client-id: the user-assigned identity (imds, appservice) or the \
             application (Entra).",
        ),
        tag("AZURE_TENANT_ID", "The default of --tenant-id (Entra)."),
        tag(
            "AZURE_FEDERATED_TOKEN_FILE",
            "Workload identity's federated token file (the default of --federated-token-file); \
             with AZURE_TENANT_ID and AZURE_CLIENT_ID it selects workload-identity.",
        ),
        tag(
            "AZURE_CLIENT_SECRET, AZURE_CLIENT_CERTIFICATE_PATH",
            "A service principal's secret, or the PEM file with its certificate and key.",
        ),
        tag(
            "AZURE_AUTHORITY_HOST",
            "The default of --authority-host (else https://login.microsoftonline.com/).",
        ),
        tag(
            "PATH",
            "Where az is looked for: the Azure CLI is chosen when it is there and no managed \
             identity endpoint is set.",
        ),
    ]
}

fn rust_log(default: &str) -> Para {
    tag(
        "RUST_LOG",
        format!(
            "The log level (default {default}); RUST_LOG=info,cstokenfs::audit=warn quiets the \
             audit of opens; FUSE's line per request only with RUST_LOG=trace."
        ),
    )
}

fn environment(sub: Option<&str>) -> Vec<Para> {
    match sub {
        Some("mount") | Some("sink") => {
            let mut v = detection_variables();
            v.push(rust_log("info"));
            v.push(tag(
                "NOTIFY_SOCKET",
                "Set by systemd for Type=notify: READY=1 is sent once the files are there.",
            ));
            v
        }
        Some("get") => {
            let mut v = detection_variables();
            v.push(rust_log("warn"));
            v
        }
        Some("csi") => vec![
            tag(
                "CSI_ENDPOINT",
                "The default of --endpoint: the gRPC socket.",
            ),
            tag("NODE_ID", "The default of --node-id: this node's name."),
            tag("AZURE_TENANT_ID", "The default of --tenant-id."),
            tag("AZURE_AUTHORITY_HOST", "The default of --authority-host."),
            rust_log("info"),
        ],
        Some("emulator") => vec![rust_log("info")],
        Some("credential-helper") => vec![
            tag(
                "CSTOKENFS_MOUNT",
                "The default of --mount (else /run/cstoken): docker passes no arguments.",
            ),
            tag("CSTOKENFS_IDENTITY", "The default of --identity."),
        ],
        Some(_) => vec![],
        None => {
            let mut v = vec![text(
                "mount, sink and get choose their source from these (--source auto); csi \
                 reads CSI_ENDPOINT, NODE_ID, AZURE_TENANT_ID and AZURE_AUTHORITY_HOST; each \
                 page says which it reads.",
            )];
            v.extend(detection_variables());
            v.push(rust_log("info"));
            v
        }
    }
}

fn signals(sub: Option<&str>) -> Vec<Para> {
    let stop = match sub {
        Some("csi") => "Stop; the volumes stay mounted (a restarted driver adopts them).",
        Some("sink") => "Remove the sink's files and exit 0.",
        Some("emulator") => "Stop and exit 0.",
        Some("mount") => "Unmount and exit 0.",
        None => "mount: unmount, sink: remove its files; then exit 0.",
        _ => return vec![],
    };
    let mut v = vec![tag("SIGTERM, SIGINT", stop)];
    match sub {
        Some("csi") => {
            v.push(tag(
                "SIGUSR1",
                "Ignored: the driver's tokens are its pods' (dropping them would empty every \
                 volume until its next fetch).",
            ));
            v.push(tag("SIGHUP", "Ignored: logs go to standard error."));
        }
        Some("mount") | Some("sink") | None => {
            v.push(tag(
                "SIGUSR1",
                "Drop every held token: the next read fetches anew (after az login as \
                 another user, say).",
            ));
            v.push(tag("SIGHUP", "Reopen --log-file (after log rotation)."));
        }
        _ => {}
    }
    v
}

/// The views under MOUNT (or DIR): their paths from the views the daemon serves.
fn view_files(root: &str) -> Vec<Para> {
    const WHAT: [(&str, &str); 7] = [
        ("token", "The raw token, no newline."),
        (
            "json",
            "access_token, token_type, expires_on, resource, and a newline.",
        ),
        ("header", "Authorization: Bearer <token> and a newline."),
        (
            "kubectl",
            "A client-go ExecCredential v1 (kubeconfig exec with command: cat).",
        ),
        (
            "kubectl-v1beta1",
            "The same ExecCredential as client.authentication.k8s.io/v1beta1, for kubeconfigs that ask for it.",
        ),
        (
            "git-credential",
            "git's credential helper format (username=, password=).",
        ),
        ("claims", "The JWT payload as JSON (never the token)."),
    ];
    let mut v: Vec<Para> = View::ALL
        .into_iter()
        .map(|view| {
            let path = match view.dir_name() {
                Some(d) => format!("{root}/{d}/NAME"),
                None => format!("{root}/NAME"),
            };
            let what = WHAT
                .iter()
                .find(|(label, _)| *label == view.label())
                .map_or("", |(_, w)| w);
            tag(path, format!("The {} view. {what}", view.label()))
        })
        .collect();
    v.push(tag(
        format!("{root}/.status"),
        "JSON: the source and why it was chosen, the identity, errors, counters.",
    ));
    v.push(tag(
        format!("{root}/id/NAME/"),
        "The same tree for each --identity NAME=SELECTOR.",
    ));
    v
}

/// The registry credentials under MOUNT.
fn registry_files() -> Vec<Para> {
    vec![
        tag(
            "MOUNT/.acr/REGISTRY",
            "An Azure Container Registry's refresh token (REGISTRY: a host such as \
             myregistry.azurecr.io), exchanged with the mount's identity; MOUNT/id/NAME/.acr/ \
             with a declared identity's.",
        ),
        tag(
            "MOUNT/.acr/REGISTRY.json",
            "username (00000000-0000-0000-0000-000000000000), refresh_token, expires_on, and a \
             newline.",
        ),
    ]
}

fn files(sub: Option<&str>) -> Vec<Para> {
    match sub {
        Some("mount") => {
            let mut v = view_files("MOUNT");
            v.extend(registry_files());
            v.push(tag(
                "MOUNT/.env",
                "With --serve-endpoint or --serve-imds: the variables the SDKs read to use them.",
            ));
            v.push(tag(
                "/etc/fstab",
                "cstoken /run/cstoken fuse.cstokenfs allow_other 0 0 (every long flag is an -o \
                 key, with _ for -).",
            ));
            v.push(tag(
                "/etc/fuse.conf",
                "user_allow_other lets ordinary users use --allow-other and --allow-root.",
            ));
            v.push(tag(
                "/dev/fuse",
                "Needed; fuse3's fusermount3 for mounts by ordinary users and auto_unmount.",
            ));
            v.push(tag(
                "/usr/lib/systemd/system/cstokenfs.service",
                "The packaged unit (shipped disabled): systemctl enable --now cstokenfs.",
            ));
            v
        }
        Some("sink") => {
            let mut v = view_files("DIR");
            v.push(tag(
                "DIR/.cstokenfs-sink.lock",
                "Held while a sink runs: a second sink on DIR fails.",
            ));
            v
        }
        Some("credential-helper") => {
            let mut v = registry_files();
            v.push(tag(
                "~/.docker/config.json",
                "{\"credHelpers\": {\"myregistry.azurecr.io\": \"cstokenfs\"}} makes docker \
                 run docker-credential-cstokenfs (a symlink to cstokenfs) for that registry; \
                 podman, buildah and skopeo read the same key in containers' auth.json.",
            ));
            v
        }
        Some("csi") => vec![
            tag(
                "/var/lib/cstokenfs-csi/data",
                "The default --data-dir: each volume's tmpfs, mounted read-write.",
            ),
            tag(
                "/var/lib/cstokenfs-csi/state",
                "The default --state-dir: a record of each published volume (never a token).",
            ),
        ],
        None => vec![
            tag(
                "/run/cstoken",
                "Where the fstab line and the systemd unit mount.",
            ),
            tag(
                "/usr/lib/systemd/system/cstokenfs.service",
                "The packaged unit (shipped disabled).",
            ),
        ],
        _ => vec![],
    }
}

fn examples(sub: Option<&str>) -> Vec<Para> {
    let e = |cmd: &str, what: &str| tag(cmd, what);
    match sub {
        Some("mount") => vec![
            e(
                "cstokenfs mount --emulator /tmp/t && cat /tmp/t/management.azure.com",
                "Try it without Azure: the built-in emulator's unsigned test tokens.",
            ),
            e(
                "sudo cstokenfs mount --allow-other --auto-unmount --uid 1000 /run/cstoken",
                "A mount every user's tools read, detached from the daemon if it dies.",
            ),
            e(
                "curl -H @/run/cstoken/.header/management.azure.com https://management.azure.com/...",
                "A request with the header view.",
            ),
            e(
                "cstokenfs mount --serve-endpoint 127.0.0.1:0 /run/cstoken && . /run/cstoken/.env",
                "Also serve App Service's protocol on loopback, for the Azure SDKs.",
            ),
            e(
                "cstokenfs mount --metrics 127.0.0.1:9464 --resource management.azure.com /run/cstoken",
                "Prometheus metrics at /metrics, /healthz and /readyz for probes.",
            ),
            e(
                "fusermount3 -u /run/cstoken",
                "Unmount (or umount as root, or SIGTERM to the daemon).",
            ),
        ],
        Some("sink") => vec![e(
            "cstokenfs sink --resource management.azure.com --resource vault.azure.net /run/cstoken",
            "Without FUSE: the files on a tmpfs, replaced atomically before they expire.",
        )],
        Some("get") => vec![
            e(
                "cstokenfs get management.azure.com",
                "Print one token and a newline.",
            ),
            e(
                "cstokenfs get --view header https://graph.microsoft.com/.default",
                "The header view of a scope's token.",
            ),
        ],
        Some("csi") => vec![e(
            "cstokenfs csi --endpoint unix:///csi/csi.sock --node-id \"$NODE_NAME\" --metrics 0.0.0.0:9464",
            "The node plugin, as the DaemonSet under deploy/kubernetes/ runs it.",
        )],
        Some("emulator") => vec![
            e(
                "cstokenfs emulator --listen 127.0.0.1:50342",
                "Cloud Shell's endpoint on its usual port, for local tries.",
            ),
            e(
                "cstokenfs emulator --protocol appservice --listen 127.0.0.1:8081",
                "App Service's protocol; prints IDENTITY_ENDPOINT and IDENTITY_HEADER to paste.",
            ),
        ],
        Some("credential-helper") => vec![
            e(
                "ln -s /usr/bin/cstokenfs /usr/local/bin/docker-credential-cstokenfs",
                "The name docker runs (docker-credential-<credHelpers value>).",
            ),
            e(
                "echo myregistry.azurecr.io | cstokenfs credential-helper get",
                "What docker asks: the JSON with ServerURL, Username and Secret.",
            ),
        ],
        Some("completions") => vec![
            e(
                "cstokenfs completions bash > /usr/share/bash-completion/completions/cstokenfs",
                "Install the bash completion (the package does).",
            ),
            e(
                "cstokenfs completions zsh > ~/.zfunc/_cstokenfs",
                "zsh: a directory in $fpath.",
            ),
        ],
        Some(_) => vec![
            e(
                "cstokenfs man > cstokenfs.1",
                "The main page on standard output.",
            ),
            e(
                "cstokenfs man --dir /usr/local/share/man/man1",
                "Every page, as man(1) looks them up.",
            ),
        ],
        None => vec![
            e(
                "cat /run/cstoken/management.azure.com",
                "A token from a mount (see cstokenfs-mount(1)).",
            ),
            e(
                "sudo cstokenfs mount --allow-other --auto-unmount /run/cstoken",
                "Mount for every user, detached from the daemon if it dies.",
            ),
            e(
                "cstokenfs get management.azure.com",
                "One token on standard output, no mount.",
            ),
        ],
    }
}

fn see_also(sub: Option<&str>) -> Vec<Para> {
    let ours = [
        "mount",
        "sink",
        "get",
        "csi",
        "emulator",
        "credential-helper",
        "completions",
        "man",
    ]
    .into_iter()
    .filter(|s| Some(*s) != sub)
    .map(|s| format!("cstokenfs-{s}(1)"));
    let mut pages: Vec<String> = sub
        .map(|_| "cstokenfs(1)".to_string())
        .into_iter()
        .chain(ours)
        .collect();
    pages.extend(["fusermount3(1)", "mount(8)", "fstab(5)"].map(String::from));
    vec![text(pages.join(", "))]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every subcommand has a page, and every page the pages name exists.
    #[test]
    fn every_subcommand_has_a_page_and_see_also_names_them() {
        let pages = pages().unwrap();
        let names: Vec<&str> = pages.iter().map(|(n, _)| n.as_str()).collect();
        let cmd = Cli::command();
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let file = format!("cstokenfs-{}.1", sub.get_name());
            assert!(names.contains(&file.as_str()), "{file}: {names:?}");
        }
        assert!(!names.contains(&"cstokenfs-help.1"));
        for (name, page) in &pages {
            let page = String::from_utf8(page.clone()).unwrap();
            for section in [
                "NAME",
                "SYNOPSIS",
                "DESCRIPTION",
                "OPTIONS",
                "EXIT STATUS",
                "ENVIRONMENT",
                "SIGNALS",
                "FILES",
                "EXAMPLES",
                "SEE ALSO",
            ] {
                assert!(
                    page.contains(&format!(".SH \"{section}\""))
                        || page.contains(&format!(".SH {section}")),
                    "{name}: {section}"
                );
            }
            for cited in page.split(|c: char| c.is_whitespace() || c == ',') {
                let cited = cited.replace("\\-", "-");
                if let Some(p) = cited
                    .strip_suffix("(1)")
                    .filter(|p| p.starts_with("cstokenfs"))
                {
                    assert!(
                        names.contains(&format!("{p}.1").as_str()),
                        "{name} cites {p}"
                    );
                }
            }
        }
    }
}
