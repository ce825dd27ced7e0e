//! Form / query decoding and the legacy expiry date forms.

use std::collections::BTreeMap;

/// `M/D/YYYY h:mm:ss AM +00:00` (`am_pm`) or `MM/DD/YYYY HH:mm:ss +00:00`, in UTC.
pub(super) fn legacy_date(epoch: u64, am_pm: bool) -> String {
    let (y, m, d) = crate::civil::civil_from_days(i64::try_from(epoch / 86_400).unwrap_or(0));
    let secs = epoch % 86_400;
    let (h, mi, s) = (secs / 3600, secs / 60 % 60, secs % 60);
    if am_pm {
        let h12 = if h % 12 == 0 { 12 } else { h % 12 };
        let half = if h < 12 { "AM" } else { "PM" };
        format!("{m}/{d}/{y} {h12}:{mi:02}:{s:02} {half} +00:00")
    } else {
        format!("{m:02}/{d:02}/{y} {h:02}:{mi:02}:{s:02} +00:00")
    }
}

/// Value of `key` in an `application/x-www-form-urlencoded` body; `Err` if undecodable.
pub(super) fn form_value(body: &[u8], key: &str) -> Result<Option<String>, ()> {
    let text = std::str::from_utf8(body).map_err(|_| ())?;
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        if decode_component(k, false)? == key {
            return decode_component(v, false).map(Some);
        }
    }
    Ok(None)
}

/// One form component: `+` is a space, then percent-decoding.
fn decode_component(s: &str, lossy: bool) -> Result<String, ()> {
    let s = s.replace('+', " ");
    let bytes = percent_encoding::percent_decode_str(&s);
    if lossy {
        Ok(bytes.decode_utf8_lossy().into_owned())
    } else {
        bytes.decode_utf8().map(|c| c.into_owned()).map_err(|_| ())
    }
}

/// Decodes a whole form / query string (first value of each key wins); `lossy` replaces
/// undecodable UTF-8 instead of failing.
fn params(text: &[u8], lossy: bool) -> Result<BTreeMap<String, String>, ()> {
    let text = if lossy {
        String::from_utf8_lossy(text)
    } else {
        std::borrow::Cow::Borrowed(std::str::from_utf8(text).map_err(|_| ())?)
    };
    let mut out = BTreeMap::new();
    for pair in text.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let key = decode_component(k, lossy)?;
        if let std::collections::btree_map::Entry::Vacant(slot) = out.entry(key) {
            slot.insert(decode_component(v, lossy)?);
        }
    }
    Ok(out)
}

pub(super) fn params_strict(text: &[u8]) -> Result<BTreeMap<String, String>, ()> {
    params(text, false)
}

pub(super) fn params_lossy(text: &[u8]) -> BTreeMap<String, String> {
    params(text, true).unwrap_or_default()
}
