//! Scraping `--metrics` as Prometheus does: a raw HTTP/1.1 GET, then the body parsed by
//! `prometheus_client`'s parsers (PyPI, in the venv `scripts/test.sh` makes: never a parser
//! of ours), and checked with `promtool check metrics` when Debian's package could be had.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

/// One answer of the metrics listener.
pub struct Scraped {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `GET path` (with `Accept: accept` when given), the connection closed after.
pub fn http(addr: SocketAddr, path: &str, accept: Option<&str>) -> Scraped {
    let mut s = TcpStream::connect(addr).expect("connect to --metrics");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("read the answer");
    let text = String::from_utf8(raw).expect("UTF-8");
    let (head, body) = text.split_once("\r\n\r\n").expect("a head");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status");
    let content_type = head
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.eq_ignore_ascii_case("content-type")
                .then(|| v.trim().to_string())
        })
        .unwrap_or_default();
    Scraped {
        status,
        content_type,
        body: body.to_string(),
    }
}

/// The venv with prometheus_client, or None (loudly; a failure when `CI=true`).
pub fn parser_venv() -> Option<PathBuf> {
    let venv = std::env::var_os("CSTOKENFS_PROM_VENV").map(PathBuf::from);
    if let Some(v) = venv.filter(|v| v.join("bin/python").exists()) {
        return Some(v);
    }
    let test = std::thread::current().name().unwrap_or("?").to_string();
    let msg = format!(
        "SKIPPED {test}: CSTOKENFS_PROM_VENV (prometheus_client) is not set; scripts/test.sh makes it"
    );
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true makes this a failure)");
    }
    eprintln!("\n!!!!! {msg} !!!!!\n");
    None
}

/// One sample of a scrape.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Sample {
    pub family: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub labels: std::collections::BTreeMap<String, String>,
    pub value: f64,
}

/// A scrape's samples, as prometheus_client parsed them.
pub struct Samples(pub Vec<Sample>);

impl Samples {
    /// Parses `body` (`openmetrics`: in that format) with the venv's parser; panics with the
    /// parser's words if it does not parse.
    pub fn parse(venv: &std::path::Path, body: &str, openmetrics: bool) -> Samples {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/metrics/parse.py");
        let mut python = Command::new(venv.join("bin/python"));
        python
            .arg(script)
            .arg(if openmetrics { "openmetrics" } else { "text" });
        let out = fed(python, body);
        assert!(
            out.status.success(),
            "prometheus_client does not parse the scrape: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Samples(serde_json::from_slice(&out.stdout).expect("the parser's JSON"))
    }

    /// The value of sample `name` whose labels include `labels`, if exactly one matches.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let found: Vec<&Sample> = self.matching(name, labels).collect();
        (found.len() == 1).then(|| found[0].value)
    }

    /// The sum of the samples `name` whose labels include `labels` (0 if none).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.0.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The families' names, each once.
    pub fn families(&self) -> std::collections::BTreeSet<String> {
        self.0.iter().map(|s| s.family.clone()).collect()
    }
}

/// `promtool check metrics` on `body` when promtool is at hand (`CSTOKENFS_PROMTOOL`):
/// whether it had its say (panics on a complaint).
pub fn promtool_check(body: &str) -> bool {
    let Some(promtool) = std::env::var_os("CSTOKENFS_PROMTOOL") else {
        eprintln!("note: CSTOKENFS_PROMTOOL unset: promtool check metrics skipped");
        return false;
    };
    let mut check = Command::new(promtool);
    check.args(["check", "metrics"]);
    let out = fed(check, body);
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool check metrics: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    true
}

/// Every metric family of `samples` is in the README's list of metrics.
pub fn assert_documented(samples: &Samples) {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let list = readme
        .split("| metric | type | labels | what |")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .expect("the README's table of metrics");
    for family in samples.families() {
        assert!(
            list.contains(&format!("`{family}")),
            "the README's table of metrics does not list {family}"
        );
    }
}

/// The README's PrometheusRule example: its `spec`, as a Prometheus rule file.
pub fn readme_rules() -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let block = readme
        .split("<!-- prometheusrule -->\n```yaml\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("the README's PrometheusRule");
    let spec = block.split("\nspec:\n").nth(1).expect("its spec");
    spec.lines()
        .map(|l| l.strip_prefix("  ").unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A mount's `--metrics` address, from its `.status`.
pub fn metrics_addr(m: &super::Mounted) -> SocketAddr {
    let s = m.status();
    s["metrics"]["address"]
        .as_str()
        .expect(".status names the metrics address")
        .parse()
        .expect("an IP:PORT")
}

/// `cmd`'s output with `input` on its stdin.
pub fn fed(mut cmd: Command, input: &str) -> std::process::Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run a checker");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}
