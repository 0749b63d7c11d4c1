//! OpenID Provider metadata (OIDC Discovery 1.0 §3) and the checks before we trust it.

use crate::http::parse_url;
use serde::Deserialize;
use url::Url;

/// Largest discovery or JWKS document accepted.
pub const MAX_DOCUMENT_BYTES: usize = 512 * 1024;

/// The parts of the provider metadata the filter uses, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProviderMetadata {
    /// Equal to the configured issuer, byte for byte.
    pub issuer: String,
    /// Where browsers are sent to log in.
    pub authorization_endpoint: Url,
    /// Where codes and refresh tokens are exchanged (by callout).
    pub token_endpoint: Url,
    /// The signing keys (by callout).
    pub jwks_uri: Url,
    /// RP-initiated logout, if offered.
    pub end_session_endpoint: Option<Url>,
    /// RFC 9207: the provider promises an `iss` parameter in authorization responses.
    pub authorization_response_iss_parameter_supported: bool,
}

#[derive(Deserialize)]
struct RawMetadata {
    issuer: String,
    authorization_endpoint: String,
    token_endpoint: String,
    jwks_uri: String,
    #[serde(default)]
    end_session_endpoint: Option<String>,
    #[serde(default)]
    authorization_response_iss_parameter_supported: Option<bool>,
    #[serde(default)]
    code_challenge_methods_supported: Option<Vec<String>>,
}

/// Why a discovery document was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// Not JSON of the expected shape.
    #[error("discovery document is not valid provider metadata: {0}")]
    Malformed(String),
    /// OIDC Discovery §4.3: the issuer must be identical to the configured one.
    #[error("discovery issuer `{found}` is not the configured issuer `{expected}`")]
    IssuerMismatch {
        /// What the document says.
        found: String,
        /// What the configuration says.
        expected: String,
    },
    /// An endpoint is not a usable URL.
    #[error("`{field}` is not acceptable: {why}")]
    BadEndpoint {
        /// Which metadata field.
        field: &'static str,
        /// Why.
        why: String,
    },
    /// The document is too large.
    #[error("discovery document larger than {MAX_DOCUMENT_BYTES} bytes")]
    TooLarge,
}

impl ProviderMetadata {
    /// Parses and validates a discovery document for `configured_issuer`.
    pub fn parse(body: &[u8], configured_issuer: &str) -> Result<Self, DiscoveryError> {
        if body.len() > MAX_DOCUMENT_BYTES {
            return Err(DiscoveryError::TooLarge);
        }
        let raw: RawMetadata =
            serde_json::from_slice(body).map_err(|e| DiscoveryError::Malformed(e.to_string()))?;
        if raw.issuer != configured_issuer {
            return Err(DiscoveryError::IssuerMismatch {
                found: raw.issuer,
                expected: configured_issuer.to_string(),
            });
        }
        let issuer_url =
            parse_url(configured_issuer).map_err(|e| DiscoveryError::Malformed(e.to_string()))?;
        let browser_endpoint = |field: &'static str, v: &str| -> Result<Url, DiscoveryError> {
            let u = parse_url(v).map_err(|e| DiscoveryError::BadEndpoint {
                field,
                why: e.to_string(),
            })?;
            if !matches!(u.scheme(), "https" | "http") || u.host_str().is_none() {
                return Err(DiscoveryError::BadEndpoint {
                    field,
                    why: "not an absolute http(s) URL".into(),
                });
            }
            if u.scheme() == "http" && issuer_url.scheme() == "https" {
                return Err(DiscoveryError::BadEndpoint {
                    field,
                    why: "plain http for an https issuer".into(),
                });
            }
            Ok(u)
        };
        // Callouts all go through the one configured cluster, so they must target the issuer's
        // own origin; a document pointing them elsewhere is refused rather than followed.
        let callout_endpoint = |field: &'static str, v: &str| -> Result<Url, DiscoveryError> {
            let u = browser_endpoint(field, v)?;
            if u.origin() != issuer_url.origin() {
                return Err(DiscoveryError::BadEndpoint {
                    field,
                    why: "not on the issuer's origin (scheme, host and port); the idp_cluster cannot reach it".into(),
                });
            }
            Ok(u)
        };
        if let Some(methods) = &raw.code_challenge_methods_supported {
            if !methods.iter().any(|m| m == "S256") {
                return Err(DiscoveryError::BadEndpoint {
                    field: "code_challenge_methods_supported",
                    why: "the provider does not support PKCE S256".into(),
                });
            }
        }
        Ok(Self {
            authorization_endpoint: browser_endpoint(
                "authorization_endpoint",
                &raw.authorization_endpoint,
            )?,
            token_endpoint: callout_endpoint("token_endpoint", &raw.token_endpoint)?,
            jwks_uri: callout_endpoint("jwks_uri", &raw.jwks_uri)?,
            end_session_endpoint: match raw.end_session_endpoint.as_deref() {
                Some(e) if !e.is_empty() => Some(browser_endpoint("end_session_endpoint", e)?),
                _ => None,
            },
            authorization_response_iss_parameter_supported: raw
                .authorization_response_iss_parameter_supported
                .unwrap_or(false),
            issuer: raw.issuer,
        })
    }
}

/// The discovery URL for an issuer (OIDC Discovery §4: append to the issuer, minding the slash).
pub fn discovery_url(issuer: &str) -> String {
    format!(
        "{}/.well-known/openid-configuration",
        issuer.trim_end_matches('/')
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const ISS: &str = "https://idp.example.com";

    fn doc(issuer: &str, token: &str) -> String {
        format!(
            r#"{{"issuer":"{issuer}","authorization_endpoint":"https://idp.example.com/auth","token_endpoint":"{token}","jwks_uri":"https://idp.example.com/keys","end_session_endpoint":"https://idp.example.com/logout","authorization_response_iss_parameter_supported":true}}"#
        )
    }

    #[test]
    fn accepts_matching_document() {
        let m = ProviderMetadata::parse(doc(ISS, "https://idp.example.com/token").as_bytes(), ISS)
            .unwrap();
        assert_eq!(m.token_endpoint.as_str(), "https://idp.example.com/token");
        assert!(m.authorization_response_iss_parameter_supported);
    }

    #[test]
    fn rejects_issuer_that_differs_in_any_way() {
        for other in [
            "https://idp.example.com/",
            "https://IDP.example.com",
            "https://idp.example.com1",
            "https://evil.example",
        ] {
            let e = ProviderMetadata::parse(
                doc(other, "https://idp.example.com/token").as_bytes(),
                ISS,
            )
            .unwrap_err();
            assert!(
                matches!(e, DiscoveryError::IssuerMismatch { .. }),
                "{other}"
            );
        }
    }

    #[test]
    fn rejects_callouts_off_origin_and_plain_http() {
        assert!(ProviderMetadata::parse(
            doc(ISS, "https://other.example.com/token").as_bytes(),
            ISS
        )
        .is_err());
        assert!(
            ProviderMetadata::parse(doc(ISS, "http://idp.example.com/token").as_bytes(), ISS)
                .is_err()
        );
    }

    #[test]
    fn rejects_garbage() {
        assert!(ProviderMetadata::parse(b"<html>", ISS).is_err());
        assert!(ProviderMetadata::parse(b"{\"issuer\":1}", ISS).is_err());
        assert!(ProviderMetadata::parse(&vec![b' '; MAX_DOCUMENT_BYTES + 1], ISS).is_err());
    }

    #[test]
    fn builds_discovery_url() {
        assert_eq!(
            discovery_url("https://a/b/"),
            "https://a/b/.well-known/openid-configuration"
        );
        assert_eq!(
            discovery_url("https://a"),
            "https://a/.well-known/openid-configuration"
        );
    }
}
