//! The Azure Instance Metadata Service (VMs, AKS nodes): `GET
//! <endpoint>?api-version=2018-02-01&resource=R` with `Metadata: true`, and the parameters
//! of a user-assigned identity. Only used when chosen explicitly (`--source imds`).

use super::http;
use super::{Identity, Source, SourceError};
use crate::token::Token;
use reqwest::blocking::Client;
use std::time::Duration;

/// IMDS's identity endpoint. Never contacted unless `--source imds` is given.
pub const DEFAULT_ENDPOINT: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

pub struct Imds {
    url: reqwest::Url,
    client: Client,
    identity: Identity,
}

impl Imds {
    pub fn new(endpoint: &str, identity: Identity) -> Result<Imds, String> {
        let url = http::check_url(endpoint)?;
        Ok(Imds {
            client: http::client(&url)?,
            url,
            identity,
        })
    }
}

impl Source for Imds {
    fn fetch_once(&self, resource: &str, timeout: Duration) -> Result<Token, SourceError> {
        let mut params = vec![("api-version", "2018-02-01"), ("resource", resource)];
        params.extend(self.identity.params("client_id", "object_id", "msi_res_id"));
        let request = self
            .client
            .get(http::with_query(&self.url, &params))
            .header("Metadata", "true");
        http::request_token(request, timeout)
    }

    fn endpoint(&self) -> String {
        self.url.to_string()
    }

    fn kind(&self) -> &'static str {
        "imds"
    }
}
