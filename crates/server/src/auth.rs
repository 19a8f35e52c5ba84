//! Identity for rooms: `?name=` in open mode; with a key configured, a JWT (HS256 or
//! RS256) from `?token=` or `Authorization: Bearer`, whose `name` (or `sub`) claim is the
//! user name. The token may also limit the rooms (`rooms`: a list of ids, `"*"` for any).
//! The server, never the client, decides who a user is.

use std::collections::HashMap;

use http::{HeaderMap, StatusCode};
use jsonwebtoken::{decode, Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use crate::config::Config;

/// How room connections are authenticated.
// One per server, behind an Arc: the size of the JWT variant costs nothing.
#[allow(clippy::large_enum_variant)]
pub(crate) enum Auth {
    Open,
    Jwt {
        key: DecodingKey,
        validation: Validation,
    },
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Open => "Auth::Open",
            Self::Jwt { .. } => "Auth::Jwt",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("reading the JWT public key {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("the JWT public key {path} is not an RSA public key in PEM: {source}")]
    Key {
        path: String,
        source: jsonwebtoken::errors::Error,
    },
    #[error("configure either jwt_secret or jwt_public_key_file, not both")]
    Both,
    #[error("rooms require tokens, so the HTTP API (which posts as any user) needs api_key too")]
    OpenApi,
}

impl Auth {
    pub(crate) fn from_config(config: &Config) -> Result<Self, AuthSetupError> {
        let tokens = config.jwt_secret.is_some() || config.jwt_public_key_file.is_some();
        if tokens && config.api_key.is_none() {
            return Err(AuthSetupError::OpenApi);
        }
        match (&config.jwt_secret, &config.jwt_public_key_file) {
            (None, None) => Ok(Self::Open),
            (Some(_), Some(_)) => Err(AuthSetupError::Both),
            (Some(secret), None) => Ok(Self::Jwt {
                key: DecodingKey::from_secret(secret.as_bytes()),
                validation: Validation::new(Algorithm::HS256),
            }),
            (None, Some(path)) => {
                let shown = path.display().to_string();
                let pem = std::fs::read(path).map_err(|source| AuthSetupError::Read {
                    path: shown.clone(),
                    source,
                })?;
                let key =
                    DecodingKey::from_rsa_pem(&pem).map_err(|source| AuthSetupError::Key {
                        path: shown,
                        source,
                    })?;
                Ok(Self::Jwt {
                    key,
                    validation: Validation::new(Algorithm::RS256),
                })
            }
        }
    }
}

#[derive(Debug, Deserialize)]
struct Claims {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    rooms: Option<Vec<String>>,
}

impl Claims {
    /// The one identity rule of every door: a token's user is its `name` claim, else its
    /// `sub` (`exp` is required by the validation).
    fn user(self) -> Option<String> {
        self.name.or(self.sub)
    }
}

/// Why a room connection was refused.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) status: StatusCode,
    pub(crate) message: String,
}

fn refused(status: StatusCode, message: impl Into<String>) -> Refused {
    Refused {
        status,
        message: message.into(),
    }
}

/// The user name for a room connection.
pub(crate) fn identify(
    auth: &Auth,
    room: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<String, Refused> {
    let (key, validation) = match auth {
        Auth::Open => {
            return query
                .get("name")
                .filter(|n| switchboard_engine::valid_user_name(n))
                .cloned()
                .ok_or_else(|| {
                    refused(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "join with ?name=NAME ({})",
                            switchboard_engine::USER_NAME_RULE
                        ),
                    )
                })
        }
        Auth::Jwt { key, validation } => (key, validation),
    };
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(token) = query.get("token").map(String::as_str).or(bearer) else {
        return Err(refused(
            StatusCode::UNAUTHORIZED,
            "a token is required: ?token=JWT or Authorization: Bearer JWT",
        ));
    };
    let claims = decode::<Claims>(token, key, validation)
        .map_err(|e| {
            refused(
                StatusCode::FORBIDDEN,
                format!("the token is not valid: {e}"),
            )
        })?
        .claims;
    if let Some(rooms) = &claims.rooms {
        if !rooms.iter().any(|r| r == "*" || r == room) {
            return Err(refused(
                StatusCode::FORBIDDEN,
                format!("the token does not allow room {room}"),
            ));
        }
    }
    claims
        .user()
        .filter(|n| switchboard_engine::valid_user_name(n))
        .ok_or_else(|| {
            refused(
                StatusCode::FORBIDDEN,
                "the token names no valid user (`name` or `sub`)",
            )
        })
}

/// A token the Centrifugo door was given (for the connection or a subscription).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct DoorClaims {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    /// Seconds since the epoch; required by the validation.
    pub(crate) exp: u64,
    /// What presence shows of this connection: any JSON.
    #[serde(default)]
    pub(crate) info: Option<Box<serde_json::value::RawValue>>,
    /// Channels the connection is subscribed to by the server at connect.
    #[serde(default)]
    pub(crate) channels: Vec<String>,
    /// The channel a subscription token is for.
    #[serde(default)]
    pub(crate) channel: Option<String>,
}

impl DoorClaims {
    /// The identity rule of every door (see [`Claims::user`]).
    pub(crate) fn user(&self) -> Option<&str> {
        self.name.as_deref().or(self.sub.as_deref())
    }
}

/// Why a token was not taken.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum TokenRefused {
    /// Valid but past its `exp`: the client may get a new one.
    Expired,
    /// Anything else: a bad signature, algorithm or payload, or no tokens configured.
    Invalid(String),
}

/// Checks `token` with the server's key (no leeway on `exp`).
pub(crate) fn verify(auth: &Auth, token: &str) -> Result<DoorClaims, TokenRefused> {
    let Auth::Jwt { key, validation } = auth else {
        return Err(TokenRefused::Invalid(
            "this server checks no tokens (no JWT key is configured)".into(),
        ));
    };
    let mut validation = validation.clone();
    validation.leeway = 0;
    match decode::<DoorClaims>(token, key, &validation) {
        Ok(data) => Ok(data.claims),
        Err(e) if matches!(e.kind(), jsonwebtoken::errors::ErrorKind::ExpiredSignature) => {
            Err(TokenRefused::Expired)
        }
        Err(e) => Err(TokenRefused::Invalid(e.to_string())),
    }
}

impl Auth {
    /// Whether connections must bring a token.
    pub(crate) fn requires_tokens(&self) -> bool {
        matches!(self, Self::Jwt { .. })
    }
}
