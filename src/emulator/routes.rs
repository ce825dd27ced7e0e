//! The emulator as an [`httpserver::Handler`]: route, wait the latency (released by stop),
//! answer, and turn the answer into the server's.

use std::future::Future;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::Arc;
use std::time::Duration;

use super::action::{reply, to_answer, Action};
use super::protocol::{self, proto_err};
use super::{acr, entra, Shared};
use crate::httpserver::{self, Answer, Reply, Request, Stop};

pub(super) struct EmuHandler(pub(super) Arc<Shared>);

impl httpserver::Handler for EmuHandler {
    fn handle(&self, req: Request, stop: Stop) -> impl Future<Output = Answer> + Send {
        let sh = Arc::clone(&self.0);
        async move {
            // The registry side, beside whichever token protocol is served.
            if let Some(route) = acr::route(&req) {
                let latency = Duration::from_nanos(sh.latency_ns.load(SeqCst));
                if !stop.sleep(latency).await {
                    return Answer::Close;
                }
                let action = acr::answer(&sh, &req, route);
                if let Action::Hang = action {
                    stop.stopped().await;
                }
                return to_answer(action);
            }
            if sh.protocol.is_entra() {
                return entra::handle(&sh, &req, stop).await;
            }
            let action = match protocol::route(&sh, &req) {
                Err(action) => action,
                Ok(routed) => {
                    let latency = Duration::from_nanos(sh.latency_ns.load(SeqCst));
                    if !stop.sleep(latency).await {
                        return Answer::Close;
                    }
                    protocol::answer(&sh, &req, routed)
                }
            };
            if let Action::Hang = action {
                stop.stopped().await;
            }
            to_answer(action)
        }
    }

    fn refuse(&self, status: u16, message: &str) -> Reply {
        match proto_err(self.0.protocol, status, "BadRequest", message) {
            Action::Respond {
                status,
                body,
                headers,
            } => reply(status, body, headers),
            _ => reply(status, Vec::new(), Vec::new()),
        }
    }
}
