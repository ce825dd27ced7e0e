//! The faults written as raw bytes (hyper only writes well-formed HTTP) and the
//! [`Fault::Fields`] merge.

use serde_json::{Map, Value};

use super::action::Action;
use super::Fault;
use crate::httpserver::RawPart;

/// Header padding of [`Fault::OversizedHead`]: this many lines of about 1 KiB.
const PADDING_LINES: u64 = 1024;
const SPACES: usize = 16 * 1024;

/// 200 head with these extra header lines (each ending in CRLF) and the blank line.
fn head_200(extra: &str) -> Vec<u8> {
    format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}Connection: close\r\n\r\n")
        .into_bytes()
}

fn with_length(len: usize) -> String {
    format!("Content-Length: {len}\r\n")
}

/// The wire form of a raw fault; `body` is a success body with a fresh token.
pub(super) fn raw(fault: &Fault, body: Vec<u8>) -> Vec<RawPart> {
    match *fault {
        Fault::HugeBody { bytes } => {
            let tail = &b"{}"[..bytes.min(2)];
            let spaces = bytes - tail.len();
            let mut last = vec![b' '; spaces % SPACES];
            last.extend_from_slice(tail);
            vec![
                RawPart::Bytes(head_200(&with_length(bytes))),
                RawPart::Repeat {
                    chunk: vec![b' '; SPACES],
                    times: Some((spaces / SPACES) as u64),
                },
                RawPart::Bytes(last),
            ]
        }
        Fault::Http09 => vec![RawPart::Bytes(body)],
        Fault::BadStatusLine => {
            let mut out = format!(
                "HTTP/1.1 abc Nope\r\nContent-Type: application/json\r\n{}Connection: close\r\n\r\n",
                with_length(body.len())
            )
            .into_bytes();
            out.extend_from_slice(&body);
            vec![RawPart::Bytes(out)]
        }
        Fault::BadContentLength => {
            let mut out = head_200("Content-Length: nonsense\r\n");
            out.extend_from_slice(&body);
            vec![RawPart::Bytes(out)]
        }
        Fault::OversizedHead => {
            let line = format!("X-Padding: {}\r\n", "a".repeat(1024 - 13));
            let mut rest = head_200(&with_length(body.len()));
            // Keep the status line first: it is written by the first part.
            let status_line = b"HTTP/1.1 200 OK\r\n".to_vec();
            rest.drain(..status_line.len());
            rest.extend_from_slice(&body);
            vec![
                RawPart::Bytes(status_line),
                RawPart::Repeat {
                    chunk: line.into_bytes(),
                    times: Some(PADDING_LINES),
                },
                RawPart::Bytes(rest),
            ]
        }
        Fault::SlowBody { bytes_per_sec } => vec![
            RawPart::Bytes(head_200(&with_length(body.len()))),
            RawPart::Trickle {
                data: body,
                bytes_per_sec,
            },
        ],
        Fault::EndlessBody => vec![
            RawPart::Bytes(head_200("")),
            RawPart::Repeat {
                chunk: vec![b' '; SPACES],
                times: None,
            },
        ],
        _ => Vec::new(),
    }
}

/// `action` with `fields` merged over its body when it is a 200 with a JSON object body;
/// `Err(action)` unchanged otherwise. `fields` that is not a JSON object gives a 500.
pub(super) fn merge_fields(action: Action, fields: &str) -> Result<Action, Action> {
    let Action::Respond {
        status: 200,
        body,
        headers,
    } = action
    else {
        return Err(action);
    };
    let Ok(Value::Object(mut base)) = serde_json::from_slice::<Value>(&body) else {
        return Err(Action::Respond {
            status: 200,
            body,
            headers,
        });
    };
    let Ok(Value::Object(extra)) = serde_json::from_str::<Value>(fields) else {
        let msg = "cstokenfs emulator: Fault::Fields needs a JSON object";
        return Ok(Action::Respond {
            status: 500,
            body: serde_json::json!({"error": "bad_fault", "error_description": msg})
                .to_string()
                .into_bytes(),
            headers,
        });
    };
    merge(&mut base, extra);
    Ok(Action::Respond {
        status: 200,
        body: Value::Object(base).to_string().into_bytes(),
        headers,
    })
}

fn merge(base: &mut Map<String, Value>, extra: Map<String, Value>) {
    for (k, v) in extra {
        if v.is_null() {
            base.remove(&k);
        } else {
            base.insert(k, v);
        }
    }
}

/// The body of a [`Fault::Echo`]: its placeholders filled from the request.
pub fn echo(
    template: &str,
    sent: &[u8],
    form: &std::collections::BTreeMap<String, String>,
) -> String {
    use base64::Engine as _;
    let mut out = String::with_capacity(template.len() + sent.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(len) = rest[open..].find('}') else {
            break;
        };
        let spec = &rest[open + 1..open + len];
        let (name, how) = spec.split_once(':').unwrap_or((spec, ""));
        let value = form.get(name).map(String::as_str).unwrap_or_default();
        let filled = match (name, how) {
            ("form", "") => String::from_utf8_lossy(sent).into_owned(),
            ("form", "json") => serde_json::to_string(form).unwrap_or_default(),
            (_, "") => value.to_string(),
            (_, "pct") => {
                percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
                    .to_string()
            }
            (_, "b64") => base64::engine::general_purpose::STANDARD.encode(value),
            (_, "json") => {
                let quoted = serde_json::to_string(value).unwrap_or_default();
                quoted.trim_matches('"').to_string()
            }
            _ => {
                // Not a placeholder (JSON's own braces): kept as it is.
                out.push_str(&rest[..=open]);
                rest = &rest[open + 1..];
                continue;
            }
        };
        out.push_str(&rest[..open]);
        out.push_str(&filled);
        rest = &rest[open + len + 1..];
    }
    out.push_str(rest);
    out
}
