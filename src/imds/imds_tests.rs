//! The IMDS listener over real loopback sockets, on a cache fed by the emulator (no FUSE):
//! the identity rule, IMDS's answer and error shapes, the counters.

use super::*;
use crate::emulator::{Emulator, EmulatorConfig};
use crate::policy::{Policy, SystemClock};
use crate::source::cloudshell::CloudShell;
use crate::source::Identity;

struct Rig {
    emu: Emulator,
    imds: Imds,
}

fn rig(identity: Identity, url: Option<String>) -> Rig {
    let emu = Emulator::start("127.0.0.1:0".parse().unwrap(), EmulatorConfig::default()).unwrap();
    let source = Arc::new(CloudShell::new(&url.unwrap_or_else(|| emu.url())).unwrap());
    let policy = Policy {
        timeout: Duration::from_secs(2),
        ..Policy::default()
    };
    let cache = Cache::new(
        crate::cache::Identities::new(source, identity, "the test".into(), Vec::new()),
        policy,
        &[],
        Arc::new(SystemClock),
    );
    // SAFETY: getuid cannot fail.
    let me = unsafe { libc::getuid() };
    let settings = Settings {
        listen: "127.0.0.1:0".parse().unwrap(),
        timeout: Duration::from_secs(2),
        access: Access::asked(None, None, None),
        reach: authz::Reach {
            mounter: me,
            allow_other: false,
        },
    };
    let imds = Imds::start(settings, cache, None).unwrap();
    Rig { emu, imds }
}

fn ask(imds: &Imds, query: &str) -> (u16, crate::testing::Body) {
    let head = format!("Host: {}\r\nMetadata: true\r\n", imds.addr());
    crate::testing::http_get(imds.addr(), &format!("{PATH}?{query}"), &head)
}

const CLIENT: &str = "0000aaaa-0000-0000-0000-000000000001";

#[test]
fn the_mounts_identity_by_client_id_and_no_other() {
    let r = rig(
        Identity {
            client_id: Some(CLIENT.into()),
            ..Identity::default()
        },
        None,
    );
    assert_eq!(
        r.imds.env_line(),
        format!(
            "AZURE_POD_IDENTITY_AUTHORITY_HOST=http://{}\n",
            r.imds.addr()
        )
    );
    let vault = "api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net";
    let (status, body) = ask(&r.imds, &format!("{vault}&client_id={CLIENT}"));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["client_id"], CLIENT, "the mount's client ID");
    let keys: Vec<&String> = body.as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        [
            "access_token",
            "client_id",
            "expires_in",
            "expires_on",
            "ext_expires_in",
            "not_before",
            "resource",
            "token_type"
        ],
        "IMDS's fields"
    );
    // No parameter: the mount's own identity.
    assert_eq!(ask(&r.imds, vault).0, 200);
    for other in [
        format!("client_id={}", CLIENT.replace('1', "2")),
        format!("object_id={CLIENT}"),
        "msi_res_id=%2Fsubscriptions%2Fx".to_string(),
        "mi_res_id=%2Fsubscriptions%2Fx".to_string(),
    ] {
        let (status, body) = ask(&r.imds, &format!("{vault}&{other}"));
        assert_eq!(status, 400, "{other}");
        assert_eq!(
            body.0,
            serde_json::json!({"error":"invalid_request","error_description":"Identity not found"}),
            "{other}"
        );
    }
    let (status, body) = ask(&r.imds, &format!("{vault}&client_id={CLIENT}&object_id=x"));
    assert_eq!(status, 400);
    assert!(body["error_description"]
        .as_str()
        .unwrap()
        .contains("Only one"));
    assert_eq!(r.emu.requests(), 1, "refusals cost no upstream call");
    let s = (r.imds.status_part())();
    assert_eq!(s["served"], 2);
    assert_eq!(s["bad_request"], 5);
}

#[test]
fn refused_resources_and_an_upstream_down_in_imds_shapes() {
    let r = rig(Identity::default(), None);
    let (status, body) = ask(
        &r.imds,
        "api-version=2018-02-01&resource=https%3A%2F%2Frefused.example.com",
    );
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_resource");
    let (status, body) = ask(&r.imds, "api-version=2018-02-01&resource=%00");
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "invalid_resource");
    let (status, _) = ask(&r.imds, "api-version=2017-01-01&resource=x");
    assert_eq!(status, 400);

    let down = format!("http://127.0.0.1:{}/oauth2/token", {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    });
    let r = rig(Identity::default(), Some(down));
    let (status, body) = ask(
        &r.imds,
        "api-version=2018-02-01&resource=https%3A%2F%2Fvault.azure.net",
    );
    assert_eq!(status, 500, "{body}");
    assert_eq!(body["error"], "unknown_error");
    assert_eq!((r.imds.status_part())()["upstream_failed"], 1);
}
