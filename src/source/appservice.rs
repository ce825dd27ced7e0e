//! App Service, Functions and Container Apps: `GET
//! $IDENTITY_ENDPOINT?api-version=2019-08-01&resource=R` with `X-IDENTITY-HEADER:
//! $IDENTITY_HEADER`.

use super::http;
use super::{Identity, Source, SourceError};
use crate::token::Token;
use reqwest::blocking::Client;
use std::time::Duration;
use zeroize::Zeroizing;

pub struct AppService {
    url: reqwest::Url,
    client: Client,
    secret: Zeroizing<String>,
    identity: Identity,
}

impl AppService {
    pub fn new(endpoint: &str, secret: &str, identity: Identity) -> Result<AppService, String> {
        let url = http::check_url(endpoint)?;
        if secret.is_empty() {
            return Err(
                "App Service needs IDENTITY_HEADER (the secret the endpoint expects)".into(),
            );
        }
        Ok(AppService {
            client: http::client(&url)?,
            url,
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
            .client
            .get(http::with_query(&self.url, &params))
            .header("X-IDENTITY-HEADER", self.secret.as_str());
        http::request_token(request, timeout)
    }

    fn endpoint(&self) -> String {
        self.url.to_string()
    }

    fn kind(&self) -> &'static str {
        "appservice"
    }
}
