//! What a sink that is gone (killed, its container restarted) left in DIR, as the sink
//! taking its lock over sees it: the files of its own layout that still hold a valid token
//! stay until their replacement is written (readers see no gap across a restart), the
//! others (expired, no readable `.json/<name>`, not as this sink would have written them)
//! are removed at once, with the directories of the layout before that this one has not.

use super::dir::Record;
use super::sync::UNLINK_LEAD;
use super::Declared;
use crate::policy::{EpochMs, MAX_SKEW_MS};
use crate::token::View;
use crate::writer::{self, Writer};
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// A view file larger than this is not one a sink wrote (a token is a few KiB).
const MAX_VIEW_BYTES: usize = 64 * 1024;

/// What this sink took over: the directories it holds instead of making them, the files
/// it keeps, and for each declared resource (in order) until when its kept files may stay.
#[derive(Debug, Default)]
pub struct TakenOver {
    pub dirs: BTreeSet<String>,
    pub files: BTreeSet<String>,
    pub until: Vec<Option<Instant>>,
}

/// The fields of a `.json/<name>` file that decide whether its token is still valid.
/// The token is borrowed from the file's bytes (wiped when dropped): a token, plain
/// base64url, has nothing to unescape.
#[derive(Deserialize)]
struct JsonView<'a> {
    #[serde(borrow)]
    access_token: Cow<'a, str>,
    /// Seconds since the epoch.
    expires_on: i64,
    resource: String,
}

impl Drop for JsonView<'_> {
    fn drop(&mut self) {
        if let Cow::Owned(token) = &mut self.access_token {
            zeroize::Zeroize::zeroize(token);
        }
    }
}

/// When files holding a token that expires at `expires_on` (ms) must be gone: the cache's
/// `valid_until` with the largest skew it takes (the lifetime is not in the file), less
/// the sink's `UNLINK_LEAD`.
fn deadline(expires_on: EpochMs) -> EpochMs {
    expires_on.saturating_sub(MAX_SKEW_MS + UNLINK_LEAD.as_millis() as i64)
}

/// Whether `bytes`, left at `view`, is that view of the token `json` describes.
fn is_view_of(view: View, bytes: &[u8], json: &JsonView<'_>) -> bool {
    let token = json.access_token.as_bytes();
    match view {
        View::Raw => bytes == token,
        View::Claims => {
            *crate::claims::render(&json.access_token, json.expires_on.saturating_mul(1000))
                == *bytes
        }
        _ => !token.is_empty() && bytes.windows(token.len()).any(|w| w == token),
    }
}

/// Takes over from the sink whose record is `old`: holds the directories both layouts
/// have, keeps the files of `declared` that hold a token valid for a while yet, removes
/// the rest of what `old` names (only names a sink's layout has, never through a symlink)
/// and its directories that are not this sink's. `layout` is this sink's directories,
/// parents first; `now` is the wall clock (ms).
pub fn take_over(
    writer: &mut Writer,
    old: &Record,
    declared: &[Declared],
    layout: &[String],
    now: EpochMs,
) -> Result<TakenOver, String> {
    let mut taken = TakenOver::default();
    for rel in layout.iter().filter(|r| old.dirs.contains(r)) {
        // One not held (not a directory of ours) is removed below, or refused later.
        if writer.take_over_dir(rel).is_ok() {
            taken.dirs.insert(rel.clone());
        }
    }
    let started = Instant::now();
    for d in declared {
        let kept = keep_views(writer, old, d, now);
        taken.until.push(kept.as_ref().map(|(until, _)| {
            let left = u64::try_from(until.saturating_sub(now)).unwrap_or(0);
            started + Duration::from_millis(left)
        }));
        taken
            .files
            .extend(kept.into_iter().flat_map(|(_, files)| files));
    }
    // `.status` is no token: kept until rewritten (a startup probe reading it sees no gap).
    if old.files.iter().any(|f| f == writer::STATUS)
        && writer.read_as_written(writer::STATUS, 1 << 20).is_some()
    {
        taken.files.insert(writer::STATUS.to_string());
    }
    for rel in &taken.files {
        writer.keep(rel);
    }
    // Only names a sink's layout has: DIR/<name>, .status, and <dir>/<name> where the
    // directory is one a sink makes (opened without following a symlink).
    let ours = |rel: &str| {
        writer::is_inside(rel)
            && rel
                .rsplit_once('/')
                .is_none_or(|(parent, _)| writer::is_sink_dir(parent))
    };
    for rel in old
        .files
        .iter()
        .filter(|r| ours(r) && !taken.files.contains(*r))
    {
        writer
            .remove_left(rel)
            .map_err(|e| format!("{}: {e}", writer.path(rel).display()))?;
    }
    let gone = |r: &&String| writer::is_sink_dir(r) && !taken.dirs.contains(*r);
    for rel in old.dirs.iter().rev().filter(gone) {
        writer.remove_left_dir(rel);
    }
    Ok(taken)
}

/// The files of `d` to keep, and until when (ms): those `old` names that hold, as this
/// sink writes them, the token of `.json/<name>` if it is valid past the deadline.
fn keep_views(
    writer: &Writer,
    old: &Record,
    d: &Declared,
    now: EpochMs,
) -> Option<(EpochMs, Vec<String>)> {
    let named = |rel: &String| old.files.contains(rel);
    let json_path = d.path(View::Json);
    if !named(&json_path) {
        return None;
    }
    let text = writer.read_as_written(&json_path, MAX_VIEW_BYTES)?;
    let json: JsonView = serde_json::from_slice(&text).ok()?;
    let until = deadline(json.expires_on.saturating_mul(1000));
    if d.resource != json.resource.as_str() || until <= now {
        return None;
    }
    let files = View::ALL
        .into_iter()
        .map(|v| (v, d.path(v)))
        .filter(|(_, rel)| named(rel))
        .filter(|(v, rel)| {
            writer
                .read_as_written(rel, MAX_VIEW_BYTES)
                .is_some_and(|bytes| is_view_of(*v, &bytes, &json))
        })
        .map(|(_, rel)| rel)
        .collect();
    Some((until, files))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::access::Access;
    use crate::cache::IdentityId;
    use rustix::fs as rfs;

    const NAME: &str = "vault.azure.net";

    fn now_ms() -> EpochMs {
        crate::policy::now_ms()
    }

    fn writer(dir: &std::path::Path) -> Writer {
        let access = Access::asked(None, None, None);
        let fd = writer::open_dir_at(rfs::CWD, dir).unwrap();
        Writer::new(fd, dir.to_path_buf(), access, 0o700).unwrap()
    }

    fn declared() -> Declared {
        Declared {
            resource: crate::names::resolve(NAME).unwrap(),
            name: NAME.into(),
            identity: IdentityId::DEFAULT,
            under: String::new(),
        }
    }

    /// What a sink of `declared()` leaves: every view of a token expiring at `expires_on`.
    fn leave(dir: &std::path::Path, expires_on: EpochMs) -> Record {
        let mut w = writer(dir);
        let d = declared();
        for rel in writer::view_dirs() {
            w.make_dir(rel).unwrap();
        }
        let token = "eyJhbGciOiJub25lIn0.eyJleHAiOjF9.sig";
        let json = format!(
            "{{\"access_token\":\"{token}\",\"token_type\":\"Bearer\",\"expires_on\":{},\"resource\":\"https://{NAME}\"}}\n",
            expires_on / 1000
        );
        for v in View::ALL {
            let bytes = match v {
                View::Raw => token.as_bytes().to_vec(),
                View::Json => json.clone().into_bytes(),
                View::Claims => {
                    crate::claims::render(token, expires_on.div_euclid(1000) * 1000).to_vec()
                }
                _ => format!("x {token}\n").into_bytes(),
            };
            w.write(&d.path(v), &bytes).unwrap();
        }
        w.write(writer::STATUS, b"{}").unwrap();
        let mut files: Vec<String> = View::ALL.map(|v| d.path(v)).to_vec();
        files.push(writer::STATUS.into());
        Record {
            files,
            dirs: writer::dirs(&[]),
            ..Record::default()
        }
    }

    fn taken(dir: &std::path::Path, old: &Record) -> TakenOver {
        let mut w = writer(dir);
        take_over(&mut w, old, &[declared()], &writer::dirs(&[]), now_ms()).unwrap()
    }

    #[test]
    fn a_valid_token_is_kept_until_its_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let expires_on = now_ms() + 3_600_000;
        let old = leave(dir.path(), expires_on);
        let t = taken(dir.path(), &old);
        assert_eq!(t.files.len(), View::ALL.len() + 1, "{:?}", t.files);
        assert_eq!(t.dirs.len(), writer::view_dirs().len());
        let until = t.until[0].expect("kept");
        let left = until.saturating_duration_since(Instant::now());
        assert!(left > Duration::from_secs(3590) && left < Duration::from_secs(3600));
        assert!(dir.path().join(NAME).exists());
    }

    #[test]
    fn an_expired_token_and_a_mismatched_view_go_at_once() {
        let dir = tempfile::tempdir().unwrap();
        // Valid for 5 s more: within the cache's skew and the lead, so no longer served.
        let old = leave(dir.path(), now_ms() + 5_000);
        let t = taken(dir.path(), &old);
        assert_eq!(t.until, [None]);
        assert_eq!(t.files.iter().collect::<Vec<_>>(), [writer::STATUS]);
        assert!(!dir.path().join(NAME).exists());
        assert!(!dir.path().join(".json").join(NAME).exists());

        let dir = tempfile::tempdir().unwrap();
        let old = leave(dir.path(), now_ms() + 3_600_000);
        std::fs::write(dir.path().join(NAME), b"another token").unwrap();
        let t = taken(dir.path(), &old);
        assert!(t.until[0].is_some());
        assert!(!t.files.contains(NAME), "a raw file of another version");
        assert!(!dir.path().join(NAME).exists());
        assert!(dir.path().join(".header").join(NAME).exists());
    }

    #[test]
    fn no_readable_json_or_another_mode_removes_every_view() {
        let dir = tempfile::tempdir().unwrap();
        let old = leave(dir.path(), now_ms() + 3_600_000);
        std::fs::remove_file(dir.path().join(".json").join(NAME)).unwrap();
        let t = taken(dir.path(), &old);
        assert_eq!(t.until, [None]);
        assert!(!dir.path().join(NAME).exists());

        let dir = tempfile::tempdir().unwrap();
        let old = leave(dir.path(), now_ms() + 3_600_000);
        let json = dir.path().join(".json").join(NAME);
        rfs::chmod(&json, rfs::Mode::from_raw_mode(0o444)).unwrap();
        let t = taken(dir.path(), &old);
        assert_eq!(t.until, [None], "not as this sink writes it");
        assert!(!json.exists());
    }
}
