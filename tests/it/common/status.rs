//! `.status` of a mount: parsed, one resource's entry, its `last_error`, and waits on it.

use super::eventually;
use super::mount::Mounted;
use serde_json::Value;
use std::time::Duration;

impl Mounted {
    /// `.status`, parsed.
    pub fn status(&self) -> Value {
        serde_json::from_slice(&self.read(".status").expect("read .status"))
            .expect(".status is JSON")
    }

    /// `.status`'s entry for one resource string (Null if none).
    pub fn resource_status(&self, resource: &str) -> Value {
        resource_entry(&self.status(), resource)
    }

    /// `last_error` of one resource in `.status`, once there is one (empty if none comes
    /// within 10 s): a fetch records its error as it ends, which can be after a reader's
    /// wait for it has ended (at `--timeout`).
    pub fn last_error(&self, resource: &str) -> String {
        self.wait_status(Duration::from_secs(10), |s| {
            let e = resource_entry(s, resource)["last_error"].clone();
            e.as_str().filter(|e| !e.is_empty()).map(str::to_string)
        })
        .unwrap_or_default()
    }

    /// Polls `.status` until `f` finds what it wants in it, up to `within`.
    pub fn wait_status<T>(
        &self,
        within: Duration,
        mut f: impl FnMut(&Value) -> Option<T>,
    ) -> Option<T> {
        eventually(within, || f(&self.status()))
    }
}

/// The entry for `resource` in a parsed `.status` (Null if none).
pub fn resource_entry(status: &Value, resource: &str) -> Value {
    status["resources"]
        .as_array()
        .and_then(|rs| rs.iter().find(|r| r["resource"] == resource).cloned())
        .unwrap_or(Value::Null)
}
