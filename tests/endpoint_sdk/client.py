"""One azure-identity client against the mount's endpoint, for tests/it/endpoint_sdk.rs.

usage: client.py mi|dac SCOPE OUT_FILE
Prints one JSON line: {"ok": true, "expires_on": N} (the token itself goes to OUT_FILE,
never to stdout) or {"ok": false, "error": TYPE, "message": TEXT}. Retries are bounded
(the SDK's own retry policy, 2 retries, short backoff) so an endpoint answering 500 makes
this fail within seconds.
"""
import json
import os
import sys

from azure.identity import DefaultAzureCredential, ManagedIdentityCredential

RETRIES = dict(retry_total=2, retry_backoff_factor=0.1, retry_backoff_max=1)


def credential(kind):
    if kind == "mi":
        # CSTOKENFS_MI_CLIENT_ID: ManagedIdentityCredential(client_id=...) (tests/it/identities.rs).
        client_id = os.environ.get("CSTOKENFS_MI_CLIENT_ID")
        if client_id:
            return ManagedIdentityCredential(client_id=client_id, **RETRIES)
        # CSTOKENFS_MI_OBJECT_ID / CSTOKENFS_MI_RES_ID: identity_config with object_id or
        # resource_id (the SDK's keys; over IMDS msal sends them as object_id and
        # msi_res_id; any other key silently means the system-assigned identity).
        for var, param in (("CSTOKENFS_MI_OBJECT_ID", "object_id"), ("CSTOKENFS_MI_RES_ID", "resource_id")):
            value = os.environ.get(var)
            if value:
                return ManagedIdentityCredential(identity_config={param: value}, **RETRIES)
        return ManagedIdentityCredential(**RETRIES)
    # DefaultAzureCredential itself, with the developer-tool credentials after managed
    # identity excluded so a failure cannot fall through to az, pwsh or a browser.
    return DefaultAzureCredential(
        exclude_cli_credential=True,
        exclude_developer_cli_credential=True,
        exclude_powershell_credential=True,
        exclude_visual_studio_code_credential=True,
        exclude_shared_token_cache_credential=True,
        exclude_interactive_browser_credential=True,
        exclude_broker_credential=True,
        **RETRIES,
    )


def main():
    kind, scope, out = sys.argv[1], sys.argv[2], sys.argv[3]
    try:
        token = credential(kind).get_token(scope)
    except Exception as e:  # the SDK's error, reported to the test
        print(json.dumps({"ok": False, "error": type(e).__name__, "message": str(e)}))
        return
    with open(out, "w") as f:
        f.write(token.token)
    print(json.dumps({"ok": True, "expires_on": token.expires_on}))


main()
