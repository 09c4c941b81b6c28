//! What the config, the vendor modules and the sink share about settings:
//! problems named by key, secrets, serde helpers and the checks more than
//! one vendor makes.
//!
//! A leaf: it imports nothing from config, sink, destinations or router, so
//! each of them can use it without importing the others.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;

/// One problem with a configuration value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Dotted path of the key, e.g. `destinations.meta.access_token`.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "`{}`: {}", self.key, self.message)
        }
    }
}

/// A secret value: never printed by `Debug` or `Display`, and every one
/// made is known to [`known_secrets`], so text from outside (a vendor's
/// error, a client library's message with a URL) can be cleaned of it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

/// Secrets shorter than this are not looked for in text: they would match
/// ordinary words (and no real credential is this short).
const SECRET_MIN_LEN: usize = 6;

static KNOWN: std::sync::RwLock<Vec<String>> = std::sync::RwLock::new(Vec::new());

/// Every secret this process has read (config values, tokens it was given).
pub fn known_secrets() -> std::sync::RwLockReadGuard<'static, Vec<String>> {
    KNOWN
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        let s = s.into();
        if s.len() >= SECRET_MIN_LEN {
            let mut known = KNOWN
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if !known.contains(&s) {
                known.push(s.clone());
            }
        }
        Secret(s)
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// What a destination assumes when an event says nothing about its consent category.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsentDefault {
    Deny,
    Grant,
}

/// Where a vendor keeps the data it is sent (data residency).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Region {
    /// The vendor's default hosts, wherever it runs them.
    #[default]
    Global,
    /// Hosts in the European Union.
    Eu,
}

/// OAuth 2 refresh-token credentials (RFC 6749 §6).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuthSettings {
    pub client_id: String,
    pub client_secret: Secret,
    pub refresh_token: Secret,
    #[serde(default = "google_default_token_url")]
    pub token_url: String,
}

// Google's is the only OAuth a vendor uses today.
fn google_default_token_url() -> String {
    "https://oauth2.googleapis.com/token".into()
}

/// Deserialises `value`, naming a failure by its full key under `prefix`.
pub fn deserialize_at<T: DeserializeOwned>(value: toml::Value, prefix: &str) -> Result<T, Problem> {
    serde_path_to_error::deserialize::<_, T>(value).map_err(|e| {
        let inner = e.path().to_string();
        let key = if inner == "." || inner.is_empty() {
            prefix.to_string()
        } else {
            format!("{prefix}.{inner}")
        };
        Problem {
            key,
            message: e.into_inner().message().to_string(),
        }
    })
}

pub fn de_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s).map_err(|e| {
        serde::de::Error::custom(format!(
            "`{s}` is not a duration like \"48h\" or \"30m\" ({e})"
        ))
    })
}

/// The canonical consent category behind a vendor's "ad user data" signal.
pub fn default_consent_ad_user_data() -> String {
    "ads".into()
}

/// The canonical consent category behind a vendor's "ad personalization" signal.
pub fn default_consent_ad_personalization() -> String {
    "ad_personalization".into()
}

/// Records problems under one table's key: `bad("url", why)` names
/// `<table>.url`.
pub fn reporter<'a>(
    table: &'a str,
    problems: &'a mut Vec<Problem>,
) -> impl FnMut(&str, String) + 'a {
    move |k, message| {
        problems.push(Problem {
            key: format!("{table}.{k}"),
            message,
        })
    }
}

pub fn is_consent_category(c: &str) -> bool {
    !c.is_empty()
        && c.len() <= 32
        && c.starts_with(|ch: char| ch.is_ascii_lowercase())
        && c.chars()
            .all(|ch| ch.is_ascii_lowercase() || ch.is_ascii_digit() || ch == '_')
}

/// `v<major>` or, `with_minor`, `v<major>.<minor>`.
pub fn is_api_version(v: &str, with_minor: bool) -> bool {
    let Some(rest) = v.strip_prefix('v') else {
        return false;
    };
    let mut parts = rest.split('.');
    let major_ok = parts
        .next()
        .is_some_and(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    let minor = parts.next();
    let minor_ok = match (with_minor, minor) {
        (true, Some(p)) => !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()),
        (false, None) => true,
        _ => false,
    };
    major_ok && minor_ok && parts.next().is_none()
}

/// The message never repeats the URL: one can carry a credential (user
/// info, a token in the query), and config errors go to logs and terminals.
pub fn check_url(u: &str) -> Result<(), String> {
    let rest = u
        .strip_prefix("https://")
        .or_else(|| u.strip_prefix("http://"))
        .ok_or_else(|| "must start with https:// or http://".to_string())?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err("has no host after the scheme".into());
    }
    Ok(())
}
