//! Helpers shared by the integration tests.
#![allow(dead_code)] // each test crate uses its own subset

use std::path::{Path, PathBuf};

use oci_image::crd::CrdSchema;

/// The repository root (`wasmplugin/oci-image/../..`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root")
}

/// `wasmplugin/` of the repository.
pub fn wasmplugin_dir() -> PathBuf {
    repo_root().join("wasmplugin")
}

/// The real WasmPlugin CRD: Istio's own, kept in `tests/data/` (with the commit it comes from),
/// or `$WASMPLUGIN_CRD`. Missing is a failure, not a skip.
pub fn crd_path() -> PathBuf {
    let path = std::env::var_os("WASMPLUGIN_CRD")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/wasmplugin-crd.yaml")
        });
    assert!(
        path.is_file(),
        "WasmPlugin CRD not found at {}: the manifest tests validate against Istio's real CRD",
        path.display()
    );
    path
}

/// The parsed CRD schema.
pub fn crd() -> CrdSchema {
    let path = crd_path();
    let text = std::fs::read_to_string(&path).expect("read CRD");
    CrdSchema::from_crd_yaml(&text)
        .unwrap_or_else(|e| panic!("cannot use {} as a CRD: {e}", path.display()))
}

/// The built `oci-image` binary.
pub fn tool() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_oci-image"))
}

/// The smallest valid wasm module: magic and version.
pub const TINY_WASM: &[u8] = b"\0asm\x01\0\0\0";
