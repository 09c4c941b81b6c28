//! OAuth 2 access tokens for destinations that authenticate with a refresh
//! token (Google Ads): fetched on first use, shared by every batch of the
//! sink, renewed a minute before they expire, and dropped when the vendor
//! answers 401 so the next request fetches a fresh one.

use std::time::Duration;

use serde::Deserialize;
use thiserror::Error;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::settings::OAuthSettings;

/// Renew this long before the vendor's stated expiry, so a token never
/// expires in flight.
const EARLY: Duration = Duration::from_secs(60);
/// The most of a token endpoint's answer read; a token response is a few
/// hundred bytes.
const TOKEN_RESPONSE_MAX_BYTES: usize = 64 * 1024;

#[derive(Debug, Error)]
pub enum AuthError {
    #[error("token endpoint unreachable: {0}")]
    Network(String),
    #[error("token endpoint refused the refresh ({status}): {error}: {description}")]
    Refused {
        status: u16,
        error: String,
        description: String,
    },
    #[error("token endpoint answered {status} without an access token")]
    Malformed { status: u16 },
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

#[derive(Deserialize, Default)]
struct ErrorResponse {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

struct Cached {
    token: String,
    renew_at: Instant,
}

pub struct TokenSource {
    settings: OAuthSettings,
    cached: Mutex<Option<Cached>>,
}

impl TokenSource {
    pub fn new(settings: OAuthSettings) -> TokenSource {
        TokenSource {
            settings,
            cached: Mutex::new(None),
        }
    }

    /// A valid access token; the lock is held across a refresh so that
    /// concurrent batches wait for one refresh instead of each making one.
    pub async fn token(&self, http: &reqwest::Client) -> Result<String, AuthError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref()
            && Instant::now() < c.renew_at
        {
            return Ok(c.token.clone());
        }
        let fresh = self.refresh(http).await?;
        let token = fresh.token.clone();
        *cached = Some(fresh);
        Ok(token)
    }

    /// Forgets `used` after the vendor refused it, unless a newer token has
    /// replaced it meanwhile.
    pub async fn invalidate(&self, used: &str) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|c| c.token == used) {
            *cached = None;
        }
    }

    async fn refresh(&self, http: &reqwest::Client) -> Result<Cached, AuthError> {
        let s = &self.settings;
        let form = serde_urlencoded::to_string([
            ("grant_type", "refresh_token"),
            ("client_id", s.client_id.as_str()),
            ("client_secret", s.client_secret.expose()),
            ("refresh_token", s.refresh_token.expose()),
        ])
        .expect("string pairs encode");
        let asked = Instant::now();
        let resp = http
            .post(&s.token_url)
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form)
            .send()
            .await
            .map_err(|e| AuthError::Network(e.without_url().to_string()))?;
        let status = resp.status().as_u16();
        let body = super::send::read_body(resp, TOKEN_RESPONSE_MAX_BYTES)
            .await
            .map_err(|e| AuthError::Network(e.without_url().to_string()))?;
        if !(200..300).contains(&status) {
            let e: ErrorResponse = serde_json::from_slice(&body).unwrap_or_default();
            return Err(AuthError::Refused {
                status,
                error: e.error,
                description: e.error_description,
            });
        }
        let t: TokenResponse =
            serde_json::from_slice(&body).map_err(|_| AuthError::Malformed { status })?;
        // Google states about an hour; without a stated lifetime, assume
        // that and let a 401 correct it.
        // A stated lifetime beyond a day is not trusted (a token server's
        // `u64::MAX` must not overflow the renewal time): renew daily.
        let lifetime = Duration::from_secs(t.expires_in.unwrap_or(3600).min(MAX_LIFETIME_S));
        let renew_in = if lifetime > EARLY * 2 {
            lifetime - EARLY
        } else {
            lifetime / 2
        };
        tracing::debug!(
            lifetime_s = lifetime.as_secs(),
            "OAuth access token refreshed"
        );
        Ok(Cached {
            token: t.access_token,
            renew_at: asked + renew_in,
        })
    }
}

/// The longest token lifetime believed.
const MAX_LIFETIME_S: u64 = 24 * 3600;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::Secret;
    use switchyard_fakes::google_ads::{OAuthClient, Settings};

    fn source(base: &str, refresh_token: &str) -> TokenSource {
        let d = OAuthClient::default();
        TokenSource::new(OAuthSettings {
            client_id: d.client_id,
            client_secret: Secret::new(d.client_secret),
            refresh_token: Secret::new(refresh_token),
            token_url: format!("{base}/token"),
        })
    }

    #[tokio::test]
    async fn tokens_are_cached_renewed_and_invalidated() {
        let fake = switchyard_fakes::serve(Settings {
            oauth: OAuthClient {
                // Short enough that the source renews at half-life (2 s).
                token_lifetime: Duration::from_secs(4),
                ..OAuthClient::default()
            },
            ..Settings::default()
        })
        .await
        .unwrap();
        let http = reqwest::Client::new();
        let refreshes = || {
            fake.exchanges()
                .iter()
                .filter(|x| x.request.path == "/token")
                .count()
        };
        let s = source(&fake.base_url(), "demo-refresh-token");
        let t1 = s.token(&http).await.unwrap();
        assert_eq!(s.token(&http).await.unwrap(), t1, "cached");
        assert_eq!(refreshes(), 1);
        // A refused token is dropped; the next call fetches another.
        s.invalidate(&t1).await;
        s.token(&http).await.unwrap();
        assert_eq!(refreshes(), 2);
        // Invalidating a token that was already replaced keeps the new one.
        s.invalidate("ya29.stale").await;
        s.token(&http).await.unwrap();
        assert_eq!(refreshes(), 2);
        tokio::time::sleep(Duration::from_millis(2100)).await;
        s.token(&http).await.unwrap();
        assert_eq!(refreshes(), 3, "renewed before expiry");
    }

    #[tokio::test]
    async fn a_token_lifetime_near_u64_max_is_cached_without_overflow() {
        let fake = switchyard_fakes::serve(Settings {
            oauth: OAuthClient {
                // The fake states it as a JSON integer (i64).
                token_lifetime: Duration::from_secs(i64::MAX as u64),
                ..OAuthClient::default()
            },
            ..Settings::default()
        })
        .await
        .unwrap();
        let http = reqwest::Client::new();
        let s = source(&fake.base_url(), "demo-refresh-token");
        let t = s.token(&http).await.unwrap();
        assert_eq!(s.token(&http).await.unwrap(), t, "cached");
    }

    #[tokio::test]
    async fn refusals_say_why_without_secrets() {
        let fake = switchyard_fakes::serve(Settings::default()).await.unwrap();
        let http = reqwest::Client::new();
        let err = source(&fake.base_url(), "revoked-token")
            .token(&http)
            .await
            .unwrap_err();
        let text = err.to_string();
        assert!(text.contains("invalid_grant"), "{text}");
        assert!(!text.contains("revoked-token") && !text.contains("demo-client-secret"));
        let err = source("http://127.0.0.1:9", "x")
            .token(&http)
            .await
            .unwrap_err();
        assert!(matches!(err, AuthError::Network(_)), "{err}");
    }
}
