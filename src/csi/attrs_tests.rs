use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

const CLIENT: &str = "11111111-2222-3333-4444-555555555555";
const AUD: &str = "api://AzureADTokenExchange";

fn jwt(sub: &str) -> String {
    let claims = serde_json::json!({
        "iss": "https://oidc.example/cluster", "sub": sub, "aud": [AUD], "exp": 4_000_000_000u64
    });
    format!(
        "{}.{}.sig",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

fn tokens(token: &str) -> String {
    serde_json::json!({AUD: {"token": token, "expirationTimestamp": "2096-10-02T07:06:40Z"}})
        .to_string()
}

fn request() -> Publish {
    let mut ctx = BTreeMap::new();
    for (k, v) in [
        (EPHEMERAL, "true"),
        (POD_NAME, "web-0"),
        (POD_NAMESPACE, "shop"),
        (POD_UID, "uid-1"),
        (SERVICE_ACCOUNT, "web"),
        ("clientID", CLIENT),
        (
            "resources",
            "management.azure.com, vault.azure.net,management.azure.com",
        ),
    ] {
        ctx.insert(k.to_string(), v.to_string());
    }
    ctx.insert(
        TOKENS.into(),
        tokens(&jwt("system:serviceaccount:shop:web")),
    );
    Publish {
        volume_id: "csi-abc".into(),
        target_path: "/var/lib/kubelet/pods/uid-1/volumes/kubernetes.io~csi/tokens/mount".into(),
        readonly: true,
        capability: Capability::Mount {
            volume_mount_group: None,
        },
        volume_context: ctx,
        secrets: BTreeMap::new(),
    }
}

fn message(r: Result<Volume, CsiError>) -> (String, String) {
    match r {
        Err(CsiError::InvalidArgument(m)) => ("invalid".into(), m),
        Err(CsiError::PermissionDenied(m)) => ("denied".into(), m),
        Err(e) => ("other".into(), e.to_string()),
        Ok(_) => ("ok".into(), String::new()),
    }
}

#[test]
fn a_kubelet_request_gives_the_volume_its_key_and_resources() {
    let v = check(&request(), Some("contoso.onmicrosoft.com"), AUD).unwrap();
    assert_eq!(v.tenant, "contoso.onmicrosoft.com");
    let names: Vec<&str> = v.resources.iter().map(|w| w.name.as_str()).collect();
    assert_eq!(names, ["management.azure.com", "vault.azure.net"]);
    assert_eq!(v.key().subject, "system:serviceaccount:shop:web");
    assert_eq!(v.key().client_id, CLIENT);
    assert_eq!(v.pod.to_string(), "pod shop/web-0 serviceaccount web");
    assert_eq!(v.file_mode, None);
    assert_eq!(v.group, None);
    let shown = format!("{:?}", v);
    assert!(!shown.contains(&*v.token.token), "Debug shows no token");
}

/// A change to a good request.
type Change = Box<dyn Fn(&mut Publish)>;

#[test]
fn requests_the_driver_cannot_serve_are_invalid_arguments_naming_the_fix() {
    let cases: Vec<(Change, &str)> = vec![
        (
            Box::new(|p| drop(p.volume_context.remove(EPHEMERAL))),
            EPHEMERAL,
        ),
        (
            Box::new(|p| drop(p.volume_context.insert(EPHEMERAL.into(), "false".into()))),
            "ephemeral inline volumes only",
        ),
        (
            Box::new(|p| p.readonly = false),
            "set readOnly: true on the csi volume",
        ),
        (Box::new(|p| p.capability = Capability::Block), "block"),
        (
            Box::new(|p| drop(p.volume_context.remove("clientID"))),
            "clientID is missing",
        ),
        (
            Box::new(|p| drop(p.volume_context.insert("clientID".into(), "web".into()))),
            "not a GUID",
        ),
        (
            Box::new(|p| drop(p.volume_context.remove("resources"))),
            "resources is missing",
        ),
        (
            Box::new(|p| drop(p.volume_context.insert("resources".into(), "a b".into()))),
            "resources",
        ),
        (
            Box::new(|p| drop(p.volume_context.insert("fileMode".into(), "0999".into()))),
            "fileMode",
        ),
        (
            Box::new(|p| drop(p.volume_context.insert("clientId".into(), CLIENT.into()))),
            "unknown volume attribute(s) clientId",
        ),
        (
            Box::new(|p| drop(p.volume_context.remove(TOKENS))),
            "tokenRequests",
        ),
        (
            Box::new(|p| drop(p.volume_context.insert(TOKENS.into(), "{}".into()))),
            "tokenRequests",
        ),
        (
            Box::new(|p| drop(p.volume_context.remove(POD_NAMESPACE))),
            "podInfoOnMount",
        ),
        (
            Box::new(|p| p.target_path = "relative".into()),
            "target_path",
        ),
        (
            Box::new(|p| {
                p.target_path =
                    "/var/lib/kubelet/pods/u/volumes/kubernetes.io~csi/../../../x/mount".into()
            }),
            "target_path",
        ),
        (Box::new(|p| p.target_path = "/etc".into()), "target_path"),
    ];
    for (change, want) in cases {
        let mut p = request();
        change(&mut p);
        let (kind, m) = message(check(&p, Some("t"), AUD));
        assert_eq!(kind, "invalid", "{want}: {m}");
        assert!(m.contains(want), "{m:?} should name {want:?}");
    }
    // No tenant anywhere.
    let (kind, m) = message(check(&request(), None, AUD));
    assert_eq!(kind, "invalid");
    assert!(m.contains("tenantID"), "{m}");
}

#[test]
fn the_token_comes_from_the_secrets_or_the_volume_context_never_both() {
    let mut p = request();
    // Kubernetes 1.35's serviceAccountTokenInSecrets: in the secrets only.
    p.volume_context.remove(TOKENS);
    p.secrets.insert(
        TOKENS.into(),
        Zeroizing::new(tokens(&jwt("system:serviceaccount:shop:web"))),
    );
    let v = check(&p, Some("t"), AUD).unwrap();
    assert_eq!(v.token.subject, "system:serviceaccount:shop:web");
    // In both: one of them is not the kubelet's.
    p.volume_context.insert(
        TOKENS.into(),
        tokens(&jwt("system:serviceaccount:shop:web")),
    );
    let (kind, m) = message(check(&p, Some("t"), AUD));
    assert_eq!(kind, "invalid");
    assert!(m.contains("both"), "{m}");
}

#[test]
fn an_expired_service_account_token_is_refused() {
    let claims = serde_json::json!({
        "iss": "https://oidc.example/cluster", "sub": "system:serviceaccount:shop:web", "exp": 1_000
    });
    let old = format!(
        "{}.{}.sig",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    let mut p = request();
    p.volume_context.insert(TOKENS.into(), tokens(&old));
    let (kind, m) = message(check(&p, Some("t"), AUD));
    assert_eq!(kind, "invalid");
    assert!(m.contains("expired"), "{m}");
}

#[test]
fn a_token_of_another_service_account_is_refused() {
    let mut p = request();
    p.volume_context.insert(
        TOKENS.into(),
        tokens(&jwt("system:serviceaccount:kube-system:admin")),
    );
    let (kind, m) = message(check(&p, Some("t"), AUD));
    assert_eq!(kind, "denied", "{m}");
    assert!(m.contains("system:serviceaccount:shop:web"), "{m}");
}

#[test]
fn file_mode_and_the_pods_group_are_taken() {
    let mut p = request();
    p.volume_context.insert("fileMode".into(), "0440".into());
    p.capability = Capability::Mount {
        volume_mount_group: Some("2000".into()),
    };
    let v = check(&p, Some("t"), AUD).unwrap();
    assert_eq!(v.file_mode, Some(0o440));
    assert_eq!(v.group, Some(2000));
    p.capability = Capability::Mount {
        volume_mount_group: Some("staff".into()),
    };
    assert_eq!(message(check(&p, Some("t"), AUD)).0, "invalid");
}
