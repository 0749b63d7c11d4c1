//! A kustomize-free build of the kustomizations in `wasmplugin/`.
//!
//! kubectl and kustomize are not always at hand (CI here has neither), so this builds the
//! subset this repository uses and refuses everything else, rather than silently producing
//! something kustomize would not:
//! - `resources`: files (multi-document YAML) and directories holding a `kustomization.yaml`;
//! - `patches`: `path:` or inline `patch:` strategic-merge patches, target taken from `target`
//!   (`kind`, `name`) or from the patch's own `kind`/`metadata.name`;
//! - `namespace`: set on every resource.
//!
//! Patch semantics: for custom resources kustomize merges maps, deletes keys set to `null` and
//! replaces lists (RFC 7386 JSON merge patch). It merges lists of maps whose entries carry an
//! associative key such as `name` element by element, which a merge patch does not: patches
//! holding lists of maps are therefore rejected here.

use std::fs;
use std::path::{Path, PathBuf};

use serde_yaml_ng::{Mapping, Value};

use crate::Error;

const KUSTOMIZATION_FILES: [&str; 3] = ["kustomization.yaml", "kustomization.yml", "Kustomization"];
const SUPPORTED_FIELDS: [&str; 5] = ["apiVersion", "kind", "resources", "patches", "namespace"];

/// Finds the kustomization file of a directory.
pub fn kustomization_file(dir: &Path) -> Option<PathBuf> {
    KUSTOMIZATION_FILES
        .iter()
        .map(|f| dir.join(f))
        .find(|p| p.is_file())
}

/// One patch of a kustomization, resolved.
#[derive(Debug, Clone)]
pub struct Patch {
    /// The file it came from (`None` for an inline patch).
    pub file: Option<PathBuf>,
    /// The patch document.
    pub doc: Value,
    /// Target kind.
    pub kind: String,
    /// Target name (`None`: every resource of the kind).
    pub name: Option<String>,
}

/// Reads the patches a kustomization declares (without applying them).
pub fn patches(dir: &Path) -> Result<Vec<Patch>, Error> {
    let (_, kustomization) = read_kustomization(dir)?;
    let mut out = Vec::new();
    let Some(list) = kustomization.get("patches") else {
        return Ok(out);
    };
    let list = list
        .as_sequence()
        .ok_or_else(|| Error::new("`patches` must be a list"))?;
    for entry in list {
        let entry = entry
            .as_mapping()
            .ok_or_else(|| Error::new("a `patches` entry must be a map"))?;
        for key in entry.keys() {
            let key = key.as_str().unwrap_or_default();
            if !["path", "patch", "target"].contains(&key) {
                return Err(Error::new(format!(
                    "patches: field `{key}` is not supported by this renderer"
                )));
            }
        }
        let (file, text) = match (entry.get("path"), entry.get("patch")) {
            (Some(path), None) => {
                let path = dir.join(
                    path.as_str()
                        .ok_or_else(|| Error::new("patch `path` must be a string"))?,
                );
                let text = fs::read_to_string(&path)
                    .map_err(|e| Error::from(e).context(path.display()))?;
                (Some(path), text)
            }
            (None, Some(inline)) => (
                None,
                inline
                    .as_str()
                    .ok_or_else(|| Error::new("inline `patch` must be a string"))?
                    .to_owned(),
            ),
            _ => {
                return Err(Error::new(
                    "a patch needs exactly one of `path` and `patch`",
                ))
            }
        };
        let mut docs = crate::parse_yaml_documents(&text)?;
        if docs.len() != 1 || !docs[0].is_mapping() {
            return Err(Error::new(
                "a patch must be one strategic-merge document (JSON 6902 patches are not supported)",
            ));
        }
        let doc = docs.remove(0);
        reject_lists_of_maps(&doc, "")?;
        let target = entry.get("target");
        let kind = target
            .and_then(|t| t.get("kind"))
            .or_else(|| doc.get("kind"))
            .and_then(Value::as_str)
            .ok_or_else(|| Error::new("a patch needs a target kind"))?
            .to_owned();
        let name = target
            .and_then(|t| t.get("name"))
            .or_else(|| doc.get("metadata").and_then(|m| m.get("name")))
            .and_then(Value::as_str)
            .map(str::to_owned);
        out.push(Patch {
            file,
            doc,
            kind,
            name,
        });
    }
    Ok(out)
}

/// Builds the kustomization in `dir`: its resources (recursively), patched, namespaced.
pub fn build(dir: &Path) -> Result<Vec<Value>, Error> {
    build_inner(dir).map_err(|e| e.context(dir.display()))
}

fn build_inner(dir: &Path) -> Result<Vec<Value>, Error> {
    let (_, kustomization) = read_kustomization(dir)?;
    let mut resources = Vec::new();
    if let Some(list) = kustomization.get("resources") {
        let list = list
            .as_sequence()
            .ok_or_else(|| Error::new("`resources` must be a list"))?;
        for entry in list {
            let rel = entry
                .as_str()
                .ok_or_else(|| Error::new("a `resources` entry must be a string"))?;
            let path = dir.join(rel);
            if path.is_dir() {
                resources.extend(build(&path)?);
            } else {
                let text = fs::read_to_string(&path)
                    .map_err(|e| Error::from(e).context(path.display()))?;
                resources.extend(
                    crate::parse_yaml_documents(&text).map_err(|e| e.context(path.display()))?,
                );
            }
        }
    }
    for patch in patches(dir)? {
        let mut matched = 0;
        for resource in &mut resources {
            let kind_ok = resource.get("kind").and_then(Value::as_str) == Some(patch.kind.as_str());
            let name_ok = patch.name.as_deref().is_none_or(|n| {
                resource
                    .get("metadata")
                    .and_then(|m| m.get("name"))
                    .and_then(Value::as_str)
                    == Some(n)
            });
            if kind_ok && name_ok {
                merge_patch(resource, &patch.doc);
                matched += 1;
            }
        }
        if matched == 0 {
            return Err(Error::new(format!(
                "patch {} matches no resource (kind {}, name {})",
                patch
                    .file
                    .as_ref()
                    .map_or("(inline)".to_owned(), |f| f.display().to_string()),
                patch.kind,
                patch.name.as_deref().unwrap_or("*")
            )));
        }
    }
    if let Some(namespace) = kustomization.get("namespace").and_then(Value::as_str) {
        for resource in &mut resources {
            if let Some(meta) = resource.get_mut("metadata").and_then(Value::as_mapping_mut) {
                meta.insert("namespace".into(), namespace.into());
            }
        }
    }
    Ok(resources)
}

fn read_kustomization(dir: &Path) -> Result<(PathBuf, Mapping), Error> {
    let file = kustomization_file(dir)
        .ok_or_else(|| Error::new(format!("no kustomization.yaml in {}", dir.display())))?;
    let text = fs::read_to_string(&file).map_err(|e| Error::from(e).context(file.display()))?;
    let value: Value =
        serde_yaml_ng::from_str(&text).map_err(|e| Error::from(e).context(file.display()))?;
    let mapping = value
        .as_mapping()
        .cloned()
        .ok_or_else(|| Error::new(format!("{} is not a map", file.display())))?;
    for key in mapping.keys() {
        let key = key.as_str().unwrap_or_default();
        if !SUPPORTED_FIELDS.contains(&key) {
            return Err(Error::new(format!(
                "{}: field `{key}` is not supported by this renderer (only {})",
                file.display(),
                SUPPORTED_FIELDS.join(", ")
            )));
        }
    }
    Ok((file, mapping))
}

fn reject_lists_of_maps(value: &Value, path: &str) -> Result<(), Error> {
    match value {
        Value::Mapping(map) => {
            for (k, v) in map {
                let key = k.as_str().unwrap_or_default();
                if key.starts_with("$patch") || key.starts_with("$setElementOrder") {
                    return Err(Error::new(format!(
                        "{path}/{key}: strategic-merge directives are not supported"
                    )));
                }
                reject_lists_of_maps(v, &format!("{path}/{key}"))?;
            }
            Ok(())
        }
        Value::Sequence(items) if items.iter().any(Value::is_mapping) => Err(Error::new(format!(
            "{path}: a patch may not hold a list of maps (kustomize would merge it by key, \
             this renderer would replace it); patch the whole resource instead"
        ))),
        _ => Ok(()),
    }
}

/// RFC 7386 JSON merge patch on YAML values: maps merge, `null` deletes, the rest replaces.
pub fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Mapping(patch_map) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_mapping() {
        *target = Value::Mapping(Mapping::new());
    }
    if let Value::Mapping(target_map) = target {
        for (key, value) in patch_map {
            if value.is_null() {
                target_map.remove(key);
            } else {
                let slot = target_map
                    .entry(key.clone())
                    .or_insert_with(|| Value::Mapping(Mapping::new()));
                if value.is_mapping() {
                    merge_patch(slot, value);
                } else {
                    *slot = value.clone();
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn yaml(text: &str) -> Value {
        serde_yaml_ng::from_str(text).unwrap()
    }

    #[test]
    fn merge_patch_merges_maps_replaces_lists_and_deletes_nulls() {
        let mut target = yaml("a: {b: 1, c: 2}\nl: [1, 2]\nd: x\n");
        merge_patch(
            &mut target,
            &yaml("a: {b: 3}\nl: [9]\nd: null\nn: {m: 1}\n"),
        );
        assert_eq!(target, yaml("a: {b: 3, c: 2}\nl: [9]\nn: {m: 1}\n"));
    }

    #[test]
    fn rejects_lists_of_maps_in_patches() {
        assert!(reject_lists_of_maps(&yaml("spec: {env: [{name: A}]}"), "").is_err());
        assert!(reject_lists_of_maps(&yaml("spec: {hosts: [a, b]}"), "").is_ok());
        assert!(reject_lists_of_maps(&yaml("spec: {$patch: delete}"), "").is_err());
    }
}
