//! The Azure Instance Metadata Service (VMs, AKS nodes): `GET
//! <endpoint>?api-version=2018-02-01&resource=R` with `Metadata: true`, and the parameters
//! of a user-assigned identity. Only used when chosen explicitly (`--source imds`).

use super::http::{self, HttpEndpoint};
use super::{ConfigError, Identity, Kind, Source, SourceError};
use crate::token::Token;
use std::time::Duration;

/// IMDS's identity endpoint. Never contacted unless `--source imds` is given.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

pub struct Imds {
    endpoint: HttpEndpoint,
    identity: Identity,
}

impl Imds {
    pub fn new(endpoint: &str, identity: Identity) -> Result<Imds, ConfigError> {
        Ok(Imds {
            endpoint: HttpEndpoint::new(endpoint)?,
            identity,
        })
    }
}

impl Source for Imds {
    fn fetch_once(&self, resource: &str, timeout: Duration) -> Result<Token, SourceError> {
        let mut params = vec![("api-version", "2018-02-01"), ("resource", resource)];
        params.extend(self.identity.params("client_id", "object_id", "msi_res_id"));
        let request = self.endpoint.get(&params).header("Metadata", "true");
        http::request_token(request, timeout)
    }

    fn endpoint(&self) -> String {
        self.endpoint.shown()
    }

    fn kind(&self) -> Kind {
        Kind::Imds
    }
}
