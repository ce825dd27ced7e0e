//! What the emulator does with a request ([`Action`]), the answers every protocol shares
//! (a 200, the faults answered the same way by all) and the server's [`Answer`] for an
//! action. A leaf: it uses only the parent module's types, no sibling.

use super::Fault;
use crate::httpserver::{Answer, RawPart, Reply};

/// What the emulator does with a routed request.
pub(super) enum Action {
    Respond {
        status: u16,
        body: Vec<u8>,
        headers: Vec<(&'static str, String)>,
    },
    Raw(Vec<RawPart>),
    /// No answer until the emulator stops.
    Hang,
    /// Close without an answer.
    Close,
}

pub(super) fn ok(body: Vec<u8>) -> Action {
    Action::Respond {
        status: 200,
        body,
        headers: Vec::new(),
    }
}

/// The faults every protocol answers the same way (a status, a hang, a reset, garbage);
/// `None` for those that depend on the protocol's own answer.
pub(super) fn common_fault(fault: &Fault) -> Option<Action> {
    Some(match fault {
        Fault::Status {
            code,
            body,
            retry_after,
        } => Action::Respond {
            status: *code,
            body: body.clone().into_bytes(),
            headers: retry_after
                .clone()
                .map(|v| ("Retry-After", v))
                .into_iter()
                .collect(),
        },
        Fault::Hang => Action::Hang,
        Fault::Reset => Action::Close,
        Fault::Garbage => ok(b"this is not json <html>".to_vec()),
        _ => return None,
    })
}

/// The server's answer for an action (a hang has been waited out by then: it closes).
pub(super) fn to_answer(action: Action) -> Answer {
    match action {
        Action::Respond {
            status,
            body,
            headers,
        } => Answer::Reply(reply(status, body, headers)),
        Action::Raw(parts) => Answer::Raw(parts),
        Action::Hang | Action::Close => Answer::Close,
    }
}

pub(super) fn reply(status: u16, body: Vec<u8>, headers: Vec<(&'static str, String)>) -> Reply {
    let mut all = vec![("Content-Type".to_owned(), "application/json".to_owned())];
    all.extend(headers.into_iter().map(|(k, v)| (k.to_owned(), v)));
    Reply {
        status,
        headers: all,
        body,
    }
}
