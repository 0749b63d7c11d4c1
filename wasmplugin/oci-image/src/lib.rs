//! Istio delivery for oidc-gate: the OCI image and the `WasmPlugin` manifests.
//!
//! Three jobs, one module each, all pure functions over bytes and documents (the CLI in
//! `main.rs` does the file and process work around them):
//!
//! - [`oci`]: turns `oidc_filter.wasm` into an OCI image layout (`oci-layout`, `index.json`,
//!   `blobs/sha256/…`) in a format istio-agent accepts (`istio/istio:pkg/wasm/imagefetcher.go`):
//!   the *compat* variant (one `application/vnd.oci.image.layer.v1.tar+gzip` layer holding
//!   `plugin.wasm`) or the *wasm artifact* variant (a raw `application/vnd.module.wasm.content.layer.v1+wasm`
//!   layer next to a `application/vnd.module.wasm.config.v1+json` layer: the agent wants exactly
//!   two layers there). Byte-for-byte reproducible: the same module gives the same manifest
//!   digest, and that digest is what `WasmPlugin.spec.sha256` must hold.
//! - [`kustomize`]: builds a kustomization (the subset this repository uses: `resources`,
//!   `patches`, `namespace`) without kustomize, so rendering works where kubectl is missing.
//! - [`render`]: fills image, digest, hosts and issuer into a built overlay and checks that the
//!   IdP cluster, `ServiceEntry` and `DestinationRule` agree.
//! - [`crd`]: validates `WasmPlugin` documents against the real CRD's `openAPIV3Schema`
//!   (converted to JSON Schema) plus hand translations of its CEL rules.
#![warn(missing_docs)]

use std::fmt;

pub mod crd;
pub mod kustomize;
pub mod oci;
pub mod render;

/// Any failure of this crate: a message for a human, already carrying its context.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error(String);

impl Error {
    /// An error with the given message.
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }

    /// Prefixes the message with what was being done.
    #[must_use]
    pub fn context(self, what: impl fmt::Display) -> Self {
        Self(format!("{what}: {}", self.0))
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(e: std::io::Error) -> Self {
        Self(e.to_string())
    }
}

impl From<serde_json::Error> for Error {
    fn from(e: serde_json::Error) -> Self {
        Self(format!("JSON: {e}"))
    }
}

impl From<serde_yaml_ng::Error> for Error {
    fn from(e: serde_yaml_ng::Error) -> Self {
        Self(format!("YAML: {e}"))
    }
}

/// Parses every non-empty document of a multi-document YAML text.
pub fn parse_yaml_documents(text: &str) -> Result<Vec<serde_yaml_ng::Value>, Error> {
    use serde::Deserialize;
    let mut docs = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let value = serde_yaml_ng::Value::deserialize(doc)?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

/// Converts a YAML value to JSON (for schema validation). Fails on non-string keys and on
/// values JSON cannot hold.
pub fn yaml_to_json(value: &serde_yaml_ng::Value) -> Result<serde_json::Value, Error> {
    Ok(serde_json::to_value(value)?)
}
