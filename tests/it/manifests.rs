//! The Kubernetes manifests under deploy/kubernetes/ against the API's own schemas:
//! kubernetes-validate from PyPI (pinned in tests/manifests/requirements.txt, in the venv
//! scripts/test.sh makes and names in CSTOKENFS_K8S_VENV), `--strict` (an unknown field is
//! an error), against Kubernetes 1.26 (the oldest the driver is for: ephemeral inline CSI
//! volumes, tokenRequests, requiresRepublish and fsGroup delegation are all GA there) and
//! 1.37 (the newest kubernetes-validate 1.37.0 ships). kubernetes-validate only warns, and
//! exits 0, on a kind or apiVersion it has no schema for (a retired apiVersion): here that
//! is a failure, as is any document it does not report as passed. Then what the manifests
//! and the driver must agree on (the plugin's name, the audience, the socket, the paths),
//! read with the venv's PyYAML.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/kubernetes");
/// The Kubernetes versions whose schemas every manifest must pass: the oldest it supports
/// and the newest the validator ships. A manifest that needs a newer cluster says so in a
/// comment line `# Kubernetes 1.N+ ...`, and its oldest version is that one.
const SCHEMAS: [&str; 2] = ["1.26", "1.37"];

/// The versions `file` is validated against: SCHEMAS, its oldest raised to what its
/// `# Kubernetes 1.N+` comment says.
fn versions_of(file: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(file).unwrap_or_default();
    let floor = text.lines().find_map(|l| {
        let rest = l.trim_start_matches('#').trim();
        let (version, _) = rest.strip_prefix("Kubernetes ")?.split_once('+')?;
        Some(version.to_string())
    });
    let mut versions: Vec<String> = SCHEMAS.iter().map(|v| v.to_string()).collect();
    if let Some(floor) = floor {
        versions[0] = floor;
    }
    versions
}
/// `csi::PLUGIN_NAME`: the CSIDriver's name, the socket's directory.
const PLUGIN_NAME: &str = "csi.cstokenfs.io";
/// `csi::DEFAULT_AUDIENCE`: the CSIDriver's tokenRequests audience.
const AUDIENCE: &str = "api://AzureADTokenExchange";
/// The driver's `--data-dir` and `--state-dir` defaults, which the DaemonSet relies on.
const DATA_DIR: &str = "/var/lib/cstokenfs-csi/data";
const STATE_DIR: &str = "/var/lib/cstokenfs-csi/state";

/// The venv, or None (loudly; a failure when `CI=true`) when it is absent.
fn venv() -> Option<PathBuf> {
    let venv = std::env::var_os("CSTOKENFS_K8S_VENV").map(PathBuf::from);
    if let Some(v) = venv.filter(|v| v.join("bin/kubernetes-validate").exists()) {
        return Some(v);
    }
    let msg = "KUBERNETES-VALIDATE VENV UNAVAILABLE: CSTOKENFS_K8S_VENV is not a venv with \
               kubernetes-validate (scripts/test.sh makes it); the manifest tests did not run";
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{msg} (CI=true makes this a failure)");
    }
    eprintln!("\n!!!!! {msg} !!!!!\n");
    None
}

macro_rules! need_venv {
    () => {
        match venv() {
            Some(v) => v,
            None => return,
        }
    };
}

/// Every YAML file under `dir`, recursively, sorted.
fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for entry in std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display())) {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml")
            ) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// The file's non-empty YAML documents as JSON, parsed as kubernetes-validate parses them
/// (PyYAML's safe loader, empty documents skipped).
fn load(venv: &Path, file: &Path) -> Result<Vec<Value>, String> {
    let script = "import json, sys, yaml\n\
                  with open(sys.argv[1]) as f:\n    \
                  docs = [d for d in yaml.safe_load_all(f) if d]\n\
                  print(json.dumps(docs))";
    let out = Command::new(venv.join("bin/python"))
        .args(["-c", script])
        .arg(file)
        .output()
        .map_err(|e| format!("run the venv's python: {e}"))?;
    if !out.status.success() {
        // PyYAML's message, without the traceback before it.
        let stderr = String::from_utf8_lossy(&out.stderr);
        let message = stderr
            .rsplit_once("Error: ")
            .map_or(stderr.trim(), |(_, m)| m.trim());
        return Err(format!("not YAML: {message}"));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| format!("the loader's JSON: {e}"))
}

/// Ok when kubernetes-validate, strict, passes every document of `file` against every
/// version in SCHEMAS and says nothing else; else its output.
fn validate(venv: &Path, file: &Path) -> Result<(), String> {
    let docs = load(venv, file)?.len();
    if docs == 0 {
        return Err("no documents".into());
    }
    let versions = versions_of(file);
    let mut cmd = Command::new(venv.join("bin/kubernetes-validate"));
    cmd.arg("--strict");
    for v in &versions {
        cmd.args(["-k", v]);
    }
    let out = cmd
        .arg(file)
        .output()
        .map_err(|e| format!("run kubernetes-validate: {e}"))?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() {
        return Err(format!("{}: {}", out.status, text.trim()));
    }
    let passed = text
        .lines()
        .filter(|l| l.starts_with("INFO ") && l.contains(" passed for resource "))
        .count();
    let other = text
        .lines()
        .any(|l| !l.starts_with("INFO ") && !l.is_empty());
    if other || passed != docs * versions.len() {
        return Err(format!(
            "{passed} passes for {docs} documents x {} versions: {}",
            versions.len(),
            text.trim()
        ));
    }
    Ok(())
}

#[test]
fn every_manifest_passes_the_kubernetes_schemas() {
    let venv = need_venv!();
    let files = yaml_files(Path::new(DEPLOY));
    let names: Vec<String> = files
        .iter()
        .filter_map(|f| f.strip_prefix(DEPLOY).ok())
        .map(|f| f.display().to_string())
        .collect();
    for want in [
        "csi/10-csidriver.yaml",
        "csi/40-daemonset.yaml",
        "examples/csi-pod.yaml",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} not in {names:?}");
    }
    let failures: Vec<String> = files
        .iter()
        .filter_map(|f| {
            validate(&venv, f)
                .err()
                .map(|e| format!("{}: {e}", f.display()))
        })
        .collect();
    assert!(
        failures.is_empty(),
        "invalid manifests:\n{}",
        failures.join("\n")
    );
}

/// The check above really checks: broken copies of the shipped manifests fail it.
#[test]
fn broken_manifests_fail_the_check() {
    let venv = need_venv!();
    let read = |name: &str| {
        std::fs::read_to_string(Path::new(DEPLOY).join(name)).expect("read a shipped manifest")
    };
    let driver = read("csi/10-csidriver.yaml");
    let daemonset = read("csi/40-daemonset.yaml");
    let pod = read("examples/csi-pod.yaml");
    let broken = |text: &str, from: &str, to: &str| {
        assert!(text.contains(from), "{from:?} is not in the manifest");
        text.replacen(from, to, 1)
    };
    // Each broken copy, and what the failure must name.
    let cases = [
        // An unknown field (a typo): only --strict finds it.
        (
            "typo",
            broken(&daemonset, "mountPropagation:", "mountPropagaton:"),
            "'mountPropagaton' was unexpected",
        ),
        // A wrong type.
        (
            "type",
            broken(&driver, "attachRequired: false", "attachRequired: \"no\""),
            "'no' is not of type 'boolean'",
        ),
        // A retired apiVersion (storage.k8s.io/v1beta1 CSIDriver, gone since 1.22):
        // kubernetes-validate warns and exits 0.
        (
            "retired",
            broken(&driver, "storage.k8s.io/v1", "storage.k8s.io/v1beta1"),
            "Couldn't find schema for kind CSIDriver",
        ),
        // A missing required field (the container's name).
        (
            "required",
            broken(&pod, "- name: app\n      image:", "- image:"),
            "'name' is a required property",
        ),
        // Not YAML.
        (
            "syntax",
            format!("{pod}\n  volumes: [\n"),
            "while parsing a flow node",
        ),
    ];
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, text, why) in cases {
        let file = dir.path().join(format!("{name}.yaml"));
        std::fs::write(&file, text).expect("write the broken manifest");
        match validate(&venv, &file) {
            Ok(()) => panic!("the broken manifest {name:?} passed"),
            Err(e) => assert!(e.contains(why), "{name:?} failed, but not for {why:?}: {e}"),
        }
    }
}

/// The one document of `kind` (and `name`, when given) among the shipped manifests.
fn object<'a>(docs: &'a [Value], kind: &str, name: Option<&str>) -> &'a Value {
    let found: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == kind)
        .filter(|d| name.is_none_or(|n| d["metadata"]["name"] == n))
        .collect();
    assert_eq!(found.len(), 1, "one {kind} {name:?} in deploy/kubernetes/");
    found[0]
}

/// The element of the array `list` whose `name` is `name`.
fn named<'a>(list: &'a Value, name: &str) -> &'a Value {
    list.as_array()
        .and_then(|l| l.iter().find(|x| x["name"] == name))
        .unwrap_or_else(|| panic!("no {name:?} in {list}"))
}

#[test]
fn the_manifests_agree_with_the_driver() {
    let venv = need_venv!();
    let mut docs = Vec::new();
    for f in yaml_files(Path::new(DEPLOY)) {
        docs.extend(load(&venv, &f).unwrap_or_else(|e| panic!("{}: {e}", f.display())));
    }

    let driver = object(&docs, "CSIDriver", Some(PLUGIN_NAME));
    let want = serde_json::json!({
        "attachRequired": false,
        "podInfoOnMount": true,
        "volumeLifecycleModes": ["Ephemeral"],
        "tokenRequests": [{"audience": AUDIENCE}],
        "requiresRepublish": true,
        "fsGroupPolicy": "File",
    });
    assert_eq!(driver["spec"], want);

    let ds = object(&docs, "DaemonSet", None);
    let ns = &ds["metadata"]["namespace"];
    let _ = object(&docs, "Namespace", ns.as_str());
    let pod = &ds["spec"]["template"]["spec"];
    let sa = object(&docs, "ServiceAccount", pod["serviceAccountName"].as_str());
    assert_eq!(&sa["metadata"]["namespace"], ns);
    assert_eq!(sa["automountServiceAccountToken"], false);
    assert_eq!(pod["automountServiceAccountToken"], false);
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(
        pod["tolerations"],
        serde_json::json!([{"operator": "Exists"}])
    );

    let volumes = &pod["volumes"];
    let host = |volume: &str| named(volumes, volume)["hostPath"]["path"].clone();
    let plugin = &named(&pod["containers"], "cstokenfs");
    let args: Vec<&str> = plugin["args"]
        .as_array()
        .expect("the plugin's args")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        args,
        [
            "csi",
            "--endpoint",
            "unix:///csi/csi.sock",
            "--node-id",
            "$(NODE_ID)",
            "--metrics",
            "0.0.0.0:9464"
        ]
    );
    assert_eq!(plugin["securityContext"]["privileged"], true);
    let mounts = &plugin["volumeMounts"];
    // The socket's directory: /csi in the containers, the kubelet's plugin dir on the host.
    assert_eq!(named(mounts, "plugin-dir")["mountPath"], "/csi");
    let plugin_dir = format!("/var/lib/kubelet/plugins/{PLUGIN_NAME}");
    assert_eq!(host("plugin-dir"), plugin_dir.as_str());
    let registrar = named(&pod["containers"], "node-driver-registrar");
    let registration = format!("--kubelet-registration-path={plugin_dir}/csi.sock");
    assert!(
        registrar["args"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x == registration.as_str())),
        "the registrar's args name {registration}"
    );
    // The same paths inside as on the host; what the driver mounts reaches the host.
    for (volume, path, propagation) in [
        ("pods-dir", "/var/lib/kubelet/pods", Some("Bidirectional")),
        ("data-dir", DATA_DIR, Some("Bidirectional")),
        ("state-dir", STATE_DIR, None),
    ] {
        let m = named(mounts, volume);
        assert_eq!(m["mountPath"], path, "{volume}");
        assert_eq!(host(volume), path, "{volume}");
        assert_eq!(m["mountPropagation"].as_str(), propagation, "{volume}");
    }
    // The startupProbe reaches the livenessprobe sidecar's port; liveness and readiness are
    // the plugin's own /healthz and /readyz on its --metrics port, which is scraped.
    assert_eq!(named(&plugin["ports"], "healthz")["containerPort"], 9808);
    assert_eq!(named(&plugin["ports"], "metrics")["containerPort"], 9464);
    let probe = |which: &str| plugin[which]["httpGet"].clone();
    assert_eq!(
        probe("startupProbe"),
        serde_json::json!({"path": "/healthz", "port": "healthz"})
    );
    assert_eq!(
        probe("livenessProbe"),
        serde_json::json!({"path": "/healthz", "port": "metrics"})
    );
    assert_eq!(
        probe("readinessProbe"),
        serde_json::json!({"path": "/readyz", "port": "metrics"})
    );
    let annotations = &ds["spec"]["template"]["metadata"]["annotations"];
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], "9464");
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    let example = object(&docs, "Pod", Some("token-reader"));
    let csi = &named(&example["spec"]["volumes"], "azure-tokens")["csi"];
    assert_eq!(csi["driver"], PLUGIN_NAME);
    assert_eq!(csi["readOnly"], true);
    for attr in ["clientID", "tenantID", "resources"] {
        assert!(csi["volumeAttributes"][attr].is_string(), "{attr}");
    }
}

/// The sidecar examples do what the README says: a native sidecar (restartPolicy: Always)
/// whose startup probe waits for a file of a declared resource on the shared volume; the
/// sink's volume a tmpfs the app mounts read-only, the pod not root; the FUSE sidecar's
/// mount shared both ways from the sidecar and into the app, unmounted if it is killed.
#[test]
fn the_sidecar_examples_hold_together() {
    let venv = need_venv!();
    let pod_of = |file: &str| -> Value {
        let path = Path::new(DEPLOY).join("examples").join(file);
        let docs = load(&venv, &path).unwrap_or_else(|e| panic!("{file}: {e}"));
        object(&docs, "Pod", None).clone()
    };
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|s| s.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    for (file, mount_path) in [
        ("sink-sidecar.yaml", "/var/run/azure-tokens"),
        ("fuse-sidecar.yaml", "/run/cstoken"),
    ] {
        let pod = pod_of(file);
        let sidecar = &pod["spec"]["initContainers"][0];
        assert_eq!(
            sidecar["restartPolicy"], "Always",
            "{file}: a native sidecar"
        );
        let args = strings(&sidecar["command"]);
        let probe = strings(&sidecar["startupProbe"]["exec"]["command"]);
        let probed = probe.last().cloned().unwrap_or_default();
        assert!(probed.starts_with(mount_path), "{file}: {probed}");
        assert_eq!(
            sidecar["volumeMounts"][0]["mountPath"], mount_path,
            "{file}"
        );
        let app = &pod["spec"]["containers"][0];
        assert_eq!(app["volumeMounts"][0]["mountPath"], mount_path, "{file}");
        if file == "sink-sidecar.yaml" {
            assert_eq!(args.get(1).map(String::as_str), Some("sink"));
            let resources: Vec<&String> = args
                .windows(2)
                .filter(|w| w[0] == "--resource")
                .map(|w| &w[1])
                .collect();
            let name = probed.rsplit('/').next().unwrap_or_default().to_string();
            assert!(
                resources.contains(&&name),
                "{file}: the probe waits for {name}"
            );
            assert_eq!(args.last().map(String::as_str), Some(mount_path));
            assert_eq!(pod["spec"]["volumes"][0]["emptyDir"]["medium"], "Memory");
            assert_eq!(app["volumeMounts"][0]["readOnly"], true);
            assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
        } else {
            assert_eq!(args.get(1).map(String::as_str), Some("mount"));
            assert!(args.iter().any(|a| a == "--auto-unmount"), "{file}");
            assert_eq!(args.last().map(String::as_str), Some(mount_path));
            assert_eq!(
                sidecar["volumeMounts"][0]["mountPropagation"],
                "Bidirectional"
            );
            assert_eq!(
                app["volumeMounts"][0]["mountPropagation"],
                "HostToContainer"
            );
        }
    }
}
