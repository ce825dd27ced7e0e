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

    /// `last_error` of one resource in `.status` (empty if none).
    pub fn last_error(&self, resource: &str) -> String {
        self.resource_status(resource)["last_error"]
            .as_str()
            .unwrap_or_default()
            .to_string()
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
