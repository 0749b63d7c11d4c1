//! OCI image for istio-agent, written as an OCI image layout.
//!
//! What the agent accepts (`istio/istio:pkg/wasm/imagefetcher.go`, `PrepareFetch`): an OCI
//! manifest is first tried as the *compat* variant (the **last** layer must be
//! `application/vnd.oci.image.layer.v1.tar+gzip`, gzip-compressed tar, the first entry whose base
//! name is `plugin.wasm` is the module), then as the *oci* (wasm artifact) variant (**exactly two**
//! layers, the module is the raw layer of type `application/vnd.module.wasm.content.layer.v1+wasm`).
//! The `sha256` of a `WasmPlugin` is compared with the **manifest digest**.
//!
//! Reproducibility: every byte is a function of the module alone. The tar entry has mtime 0,
//! uid/gid 0, mode 0644, empty user/group names; the gzip header has mtime 0, no file name and
//! OS byte 255; JSON documents are serialized from structs with a fixed field order (so they do
//! not depend on serde_json's `preserve_order` feature being unified into the build).

use std::collections::BTreeMap;
use std::fs;
use std::io::{Read, Write};
use std::path::Path;
use std::str::FromStr;

use flate2::{Compression, GzBuilder};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::Error;

/// Media type of an OCI image manifest.
pub const MANIFEST_MEDIA_TYPE: &str = "application/vnd.oci.image.manifest.v1+json";
/// Media type of an OCI image index (the layout's `index.json`).
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.oci.image.index.v1+json";
/// Media type of an OCI image configuration (compat variant).
pub const IMAGE_CONFIG_MEDIA_TYPE: &str = "application/vnd.oci.image.config.v1+json";
/// Media type of the compat layer: gzip-compressed tar.
pub const TAR_GZIP_LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
/// Media type of the wasm artifact runtime configuration (solo-io wasm image spec).
pub const WASM_CONFIG_MEDIA_TYPE: &str = "application/vnd.module.wasm.config.v1+json";
/// Media type of the wasm artifact module layer: the raw module, not compressed.
pub const WASM_LAYER_MEDIA_TYPE: &str = "application/vnd.module.wasm.content.layer.v1+wasm";
/// File name the agent looks for inside the compat layer.
pub const PLUGIN_FILE_NAME: &str = "plugin.wasm";
/// Title of the runtime configuration layer in the wasm artifact variant.
pub const RUNTIME_CONFIG_FILE_NAME: &str = "runtime-config.json";
/// Annotation carrying the tag of a manifest in `index.json`.
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
/// Annotation carrying a layer's file name.
pub const TITLE_ANNOTATION: &str = "org.opencontainers.image.title";
/// Annotation the compat spec asks for on an OCI-typed compat image.
pub const VARIANT_ANNOTATION: &str = "module.wasm.image/variant";

/// `\0asm`: the agent rejects a module that does not start with it (`isValidWasmBinary`).
const WASM_MAGIC: &[u8; 4] = b"\0asm";
/// Fixed metadata of the single tar entry.
const TAR_MODE: u32 = 0o644;
const TAR_MTIME: u64 = 0;
/// gzip OS byte "unknown", so the header does not depend on where the image was built.
const GZIP_OS_UNKNOWN: u8 = 255;

/// Which image shape to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Variant {
    /// One `tar+gzip` layer with `/plugin.wasm`: what Istio's docs and samples use. Default.
    Compat,
    /// Raw wasm layer plus runtime-config layer (two layers, as the agent requires).
    WasmArtifact,
}

impl FromStr for Variant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self, Error> {
        match s {
            "compat" => Ok(Self::Compat),
            "wasm-artifact" => Ok(Self::WasmArtifact),
            other => Err(Error::new(format!(
                "unknown variant `{other}` (expected `compat` or `wasm-artifact`)"
            ))),
        }
    }
}

/// A content-addressed blob of the image.
#[derive(Debug, Clone)]
pub struct Blob {
    /// `sha256:<hex>`.
    pub digest: String,
    /// The bytes.
    pub bytes: Vec<u8>,
}

impl Blob {
    fn new(bytes: Vec<u8>) -> Self {
        Self {
            digest: sha256_digest(&bytes),
            bytes,
        }
    }
}

/// A built image: the manifest and every blob it references.
#[derive(Debug, Clone)]
pub struct Image {
    /// The manifest bytes exactly as pushed; their sha256 is the manifest digest.
    pub manifest: Blob,
    /// Config and layer blobs (deduplicated).
    pub blobs: Vec<Blob>,
}

impl Image {
    /// `sha256:<hex>` of the manifest: the value for `WasmPlugin.spec.sha256` (without the
    /// `sha256:` prefix) and what `skopeo inspect --raw … | sha256sum` prints.
    pub fn digest(&self) -> &str {
        &self.manifest.digest
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: &'static str,
    digest: String,
    size: u64,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<&'static str, String>,
}

impl Descriptor {
    fn of(media_type: &'static str, blob: &Blob) -> Self {
        Self {
            media_type,
            digest: blob.digest.clone(),
            size: blob.bytes.len() as u64,
            annotations: BTreeMap::new(),
        }
    }

    fn annotated(mut self, key: &'static str, value: &str) -> Self {
        self.annotations.insert(key, value.to_owned());
        self
    }
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    schema_version: u32,
    media_type: &'static str,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<&'static str, String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Index {
    schema_version: u32,
    media_type: &'static str,
    manifests: Vec<serde_json::Value>,
}

/// OCI image configuration of the compat variant. `wasi`/`wasm` is the platform Docker and
/// containerd use for wasm images; the agent never reads the config of a single manifest.
#[derive(Serialize)]
struct ImageConfig {
    architecture: &'static str,
    os: &'static str,
    rootfs: RootFs,
}

#[derive(Serialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: &'static str,
    diff_ids: Vec<String>,
}

/// Runtime configuration of the wasm artifact variant (solo-io `spec.md`: `type` is the only
/// required property). Istio does not read it.
#[derive(Serialize)]
struct WasmRuntimeConfig {
    #[serde(rename = "type")]
    kind: &'static str,
}

/// `sha256:<lowercase hex>` of some bytes.
pub fn sha256_digest(bytes: &[u8]) -> String {
    format!("sha256:{:x}", Sha256::digest(bytes))
}

/// Rejects what istio-agent would reject: fewer than 8 bytes or no `\0asm` magic.
pub fn check_wasm(module: &[u8]) -> Result<(), Error> {
    if module.len() < 8 || !module.starts_with(WASM_MAGIC) {
        return Err(Error::new(
            "not a wasm module (istio-agent wants at least 8 bytes starting with \\0asm)",
        ));
    }
    Ok(())
}

/// Builds the image for `module` in the given variant.
pub fn build_image(module: &[u8], variant: Variant) -> Result<Image, Error> {
    check_wasm(module)?;
    match variant {
        Variant::Compat => build_compat(module),
        Variant::WasmArtifact => build_wasm_artifact(module),
    }
}

fn build_compat(module: &[u8]) -> Result<Image, Error> {
    let tar = plugin_tar(module)?;
    let layer = Blob::new(gzip(&tar)?);
    let config = Blob::new(serde_json::to_vec(&ImageConfig {
        architecture: "wasm",
        os: "wasi",
        rootfs: RootFs {
            kind: "layers",
            diff_ids: vec![sha256_digest(&tar)],
        },
    })?);
    let manifest = Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE,
        config: Descriptor::of(IMAGE_CONFIG_MEDIA_TYPE, &config),
        layers: vec![Descriptor::of(TAR_GZIP_LAYER_MEDIA_TYPE, &layer)],
        annotations: BTreeMap::from([(VARIANT_ANNOTATION, "compat".to_owned())]),
    };
    Ok(Image {
        manifest: Blob::new(serde_json::to_vec(&manifest)?),
        blobs: vec![config, layer],
    })
}

fn build_wasm_artifact(module: &[u8]) -> Result<Image, Error> {
    let runtime_config = Blob::new(serde_json::to_vec(&WasmRuntimeConfig {
        kind: "envoy_proxy",
    })?);
    let wasm = Blob::new(module.to_vec());
    let manifest = Manifest {
        schema_version: 2,
        media_type: MANIFEST_MEDIA_TYPE,
        config: Descriptor::of(WASM_CONFIG_MEDIA_TYPE, &runtime_config),
        // istio-agent: "number of layers must be 2"; the module is found by media type.
        layers: vec![
            Descriptor::of(WASM_CONFIG_MEDIA_TYPE, &runtime_config)
                .annotated(TITLE_ANNOTATION, RUNTIME_CONFIG_FILE_NAME),
            Descriptor::of(WASM_LAYER_MEDIA_TYPE, &wasm)
                .annotated(TITLE_ANNOTATION, PLUGIN_FILE_NAME),
        ],
        annotations: BTreeMap::new(),
    };
    Ok(Image {
        manifest: Blob::new(serde_json::to_vec(&manifest)?),
        blobs: vec![runtime_config, wasm],
    })
}

/// A tar archive with the single entry `plugin.wasm` (fixed metadata).
fn plugin_tar(module: &[u8]) -> Result<Vec<u8>, Error> {
    let mut header = tar::Header::new_ustar();
    header.set_path(PLUGIN_FILE_NAME)?;
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(module.len() as u64);
    header.set_mode(TAR_MODE);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(TAR_MTIME);
    header.set_cksum();
    let mut builder = tar::Builder::new(Vec::new());
    builder.append(&header, module)?;
    Ok(builder.into_inner()?)
}

/// gzip with a fixed header (mtime 0, no name, OS unknown) and a fixed level.
fn gzip(bytes: &[u8]) -> Result<Vec<u8>, Error> {
    let mut encoder = GzBuilder::new()
        .mtime(0)
        .operating_system(GZIP_OS_UNKNOWN)
        .write(Vec::new(), Compression::best());
    encoder.write_all(bytes)?;
    Ok(encoder.finish()?)
}

/// Extracts the module from a compat layer the way istio-agent does: gunzip, then the first
/// tar entry whose base name is `plugin.wasm`.
pub fn plugin_from_compat_layer(layer: &[u8]) -> Result<Vec<u8>, Error> {
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(layer));
    for entry in archive
        .entries()
        .map_err(|e| Error::new(format!("layer is not tar+gzip: {e}")))?
    {
        let mut entry = entry?;
        let is_plugin = entry
            .path()?
            .file_name()
            .is_some_and(|name| name == PLUGIN_FILE_NAME);
        if is_plugin {
            let mut module = Vec::new();
            entry.read_to_end(&mut module)?;
            return Ok(module);
        }
    }
    Err(Error::new(format!(
        "{PLUGIN_FILE_NAME} not found in the layer"
    )))
}

/// Checks an OCI tag (`[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`, the distribution spec's grammar).
pub fn check_tag(tag: &str) -> Result<(), Error> {
    let mut chars = tag.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first_ok || !rest_ok || tag.len() > 128 {
        return Err(Error::new(format!(
            "invalid tag `{tag}` (expected [A-Za-z0-9_][A-Za-z0-9._-]{{0,127}})"
        )));
    }
    Ok(())
}

/// Writes `image` into the OCI image layout at `dir` under `tag`: blobs, `oci-layout`, and
/// `index.json` (an existing entry with the same tag is replaced, other tags are kept).
pub fn write_layout(image: &Image, dir: &Path, tag: &str) -> Result<(), Error> {
    check_tag(tag)?;
    let blob_dir = dir.join("blobs").join("sha256");
    fs::create_dir_all(&blob_dir).map_err(|e| Error::from(e).context(blob_dir.display()))?;
    for blob in image.blobs.iter().chain([&image.manifest]) {
        let hex = blob.digest.trim_start_matches("sha256:");
        let path = blob_dir.join(hex);
        fs::write(&path, &blob.bytes).map_err(|e| Error::from(e).context(path.display()))?;
    }
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)?;

    let index_path = dir.join("index.json");
    let mut manifests: Vec<serde_json::Value> = match fs::read(&index_path) {
        Ok(bytes) => {
            let index: serde_json::Value = serde_json::from_slice(&bytes)
                .map_err(|e| Error::from(e).context(index_path.display()))?;
            index["manifests"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .into_iter()
                .filter(|m| m["annotations"][REF_NAME_ANNOTATION] != tag)
                .collect()
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(Error::from(e).context(index_path.display())),
    };
    manifests.push(serde_json::to_value(
        Descriptor::of(MANIFEST_MEDIA_TYPE, &image.manifest).annotated(REF_NAME_ANNOTATION, tag),
    )?);
    let index = Index {
        schema_version: 2,
        media_type: INDEX_MEDIA_TYPE,
        manifests,
    };
    fs::write(&index_path, serde_json::to_vec_pretty(&index)?)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &[u8] = b"\0asm\x01\0\0\0";

    #[test]
    fn rejects_non_wasm() {
        assert!(build_image(b"\0asm", Variant::Compat).is_err());
        assert!(build_image(b"hello world!", Variant::WasmArtifact).is_err());
    }

    #[test]
    fn compat_layer_round_trips_through_istio_extraction() {
        let image = build_image(TINY, Variant::Compat).unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&image.manifest.bytes).unwrap();
        assert_eq!(manifest["mediaType"], MANIFEST_MEDIA_TYPE);
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 1);
        assert_eq!(layers[0]["mediaType"], TAR_GZIP_LAYER_MEDIA_TYPE);
        let layer = image
            .blobs
            .iter()
            .find(|b| b.digest == layers[0]["digest"])
            .unwrap();
        assert_eq!(plugin_from_compat_layer(&layer.bytes).unwrap(), TINY);
    }

    #[test]
    fn tar_entry_and_gzip_header_are_fixed() {
        let tar = plugin_tar(TINY).unwrap();
        let mut archive = tar::Archive::new(tar.as_slice());
        let entry = archive.entries().unwrap().next().unwrap().unwrap();
        let header = entry.header();
        assert_eq!(header.mtime().unwrap(), 0);
        assert_eq!(header.uid().unwrap(), 0);
        assert_eq!(header.gid().unwrap(), 0);
        assert_eq!(header.mode().unwrap(), 0o644);
        let gz = gzip(&tar).unwrap();
        // ID1 ID2 CM FLG MTIME(4) XFL OS: no FNAME flag, zero mtime, OS 255.
        assert_eq!(&gz[..8], &[0x1f, 0x8b, 8, 0, 0, 0, 0, 0]);
        assert_eq!(gz[9], GZIP_OS_UNKNOWN);
    }

    #[test]
    fn wasm_artifact_has_two_layers_and_raw_module() {
        let image = build_image(TINY, Variant::WasmArtifact).unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&image.manifest.bytes).unwrap();
        assert_eq!(manifest["config"]["mediaType"], WASM_CONFIG_MEDIA_TYPE);
        let layers = manifest["layers"].as_array().unwrap();
        assert_eq!(layers.len(), 2);
        let wasm = layers
            .iter()
            .find(|l| l["mediaType"] == WASM_LAYER_MEDIA_TYPE)
            .unwrap();
        assert_eq!(wasm["digest"], sha256_digest(TINY));
    }

    #[test]
    fn checks_tags() {
        assert!(check_tag("v1").is_ok());
        assert!(check_tag("0.1.0-rc_1").is_ok());
        assert!(check_tag("").is_err());
        assert!(check_tag(".v1").is_err());
        assert!(check_tag("v1:latest").is_err());
        assert!(check_tag(&"a".repeat(129)).is_err());
    }

    #[test]
    fn parses_variants() {
        assert_eq!("compat".parse::<Variant>().unwrap(), Variant::Compat);
        assert_eq!(
            "wasm-artifact".parse::<Variant>().unwrap(),
            Variant::WasmArtifact
        );
        assert!("oci".parse::<Variant>().is_err());
    }
}
