//! App Service, Functions and Container Apps: `GET
//! $IDENTITY_ENDPOINT?api-version=2019-08-01&resource=R` with `X-IDENTITY-HEADER:
//! $IDENTITY_HEADER`.

use super::http::{self, HttpEndpoint};
use super::{ConfigError, Identity, Kind, Source, SourceError};
use crate::token::Token;
use std::time::Duration;
use zeroize::Zeroizing;

pub struct AppService {
    endpoint: HttpEndpoint,
    secret: Zeroizing<String>,
    identity: Identity,
}

impl AppService {
    pub fn new(
        endpoint: &str,
        secret: &str,
        identity: Identity,
    ) -> Result<AppService, ConfigError> {
        if secret.is_empty() {
            return Err(ConfigError::Choice(
                "--source appservice needs IDENTITY_HEADER (the endpoint's secret)",
            ));
        }
        Ok(AppService {
            endpoint: HttpEndpoint::new(endpoint)?,
            secret: Zeroizing::new(secret.to_string()),
            identity,
        })
    }
}

impl Source for AppService {
    fn fetch_once(&self, resource: &str, timeout: Duration) -> Result<Token, SourceError> {
        let mut params = vec![("api-version", "2019-08-01"), ("resource", resource)];
        params.extend(
            self.identity
                .params("client_id", "principal_id", "mi_res_id"),
        );
        let request = self
            .endpoint
            .get(&params)
            .header("X-IDENTITY-HEADER", self.secret.as_str());
        http::request_token(request, timeout)
    }

    fn endpoint(&self) -> String {
        self.endpoint.shown()
    }

    fn kind(&self) -> Kind {
        Kind::AppService
    }
}
