//! Validation of custom resources against a CRD's `openAPIV3Schema`, as the API server does it
//! with `kubectl apply` (strict field validation, the default since Kubernetes 1.27).
//!
//! The structural schema is converted to JSON Schema (draft 7) and checked with the
//! `jsonschema` crate:
//! - `nullable: true` adds `"null"` to `type`; `format: int32`/`int64` become bounds;
//! - objects with `properties` and without `x-kubernetes-preserve-unknown-fields` get
//!   `additionalProperties: false` (the API server rejects unknown fields under strict
//!   validation and silently prunes them otherwise: either way a misspelt field never arrives);
//! - `x-kubernetes-int-or-string` already comes with an `anyOf`, kept as is;
//! - `apiVersion`, `kind` and `metadata`, implicit in every CRD, are added at the root.
//!
//! What JSON Schema cannot say is checked by a walk over the original schema:
//! `x-kubernetes-list-type: map` (unique keys) and `x-kubernetes-validations`. CEL rules are
//! translated by hand, looked up by their (whitespace-normalized) text; a rule without a
//! translation is reported as an error, so a changed CRD cannot pass unnoticed.

use std::collections::HashSet;

use serde_json::{json, Map, Value};

use crate::Error;

/// The schema of one served version of a CRD, ready to validate documents.
pub struct CrdSchema {
    api_version: String,
    kind: String,
    openapi: Value,
    full: jsonschema::Validator,
    partial: jsonschema::Validator,
}

impl std::fmt::Debug for CrdSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrdSchema")
            .field("api_version", &self.api_version)
            .field("kind", &self.kind)
            .finish_non_exhaustive()
    }
}

impl CrdSchema {
    /// Reads a `CustomResourceDefinition` (YAML) and picks the served version that is the
    /// storage version, or else the first served one.
    pub fn from_crd_yaml(text: &str) -> Result<Self, Error> {
        let docs = crate::parse_yaml_documents(text)?;
        let crd = docs
            .iter()
            .map(crate::yaml_to_json)
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .find(|d| d["kind"] == "CustomResourceDefinition")
            .ok_or_else(|| Error::new("no CustomResourceDefinition in the file"))?;
        let group = crd["spec"]["group"]
            .as_str()
            .ok_or_else(|| Error::new("CRD has no spec.group"))?;
        let kind = crd["spec"]["names"]["kind"]
            .as_str()
            .ok_or_else(|| Error::new("CRD has no spec.names.kind"))?;
        let served: Vec<&Value> = crd["spec"]["versions"]
            .as_array()
            .map(|v| v.iter().filter(|v| v["served"] == true).collect())
            .unwrap_or_default();
        let version = served
            .iter()
            .find(|v| v["storage"] == true)
            .or(served.first())
            .ok_or_else(|| Error::new("CRD has no served version"))?;
        let name = version["name"]
            .as_str()
            .ok_or_else(|| Error::new("CRD version has no name"))?;
        let openapi = version["schema"]["openAPIV3Schema"].clone();
        if !openapi.is_object() {
            return Err(Error::new(format!(
                "CRD version {name} has no schema.openAPIV3Schema"
            )));
        }
        let api_version = format!("{group}/{name}");
        let build = |partial: bool| {
            let schema = root_json_schema(&openapi, &api_version, kind, partial);
            jsonschema::draft7::new(&schema)
                .map_err(|e| Error::new(format!("converted schema does not compile: {e}")))
        };
        Ok(Self {
            full: build(false)?,
            partial: build(true)?,
            api_version,
            kind: kind.to_owned(),
            openapi,
        })
    }

    /// `<group>/<version>` the documents must carry.
    pub fn api_version(&self) -> &str {
        &self.api_version
    }

    /// The resource kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// Whether a document is of this CRD's kind (by `apiVersion` group and `kind`).
    pub fn matches(&self, doc: &Value) -> bool {
        let group = self.api_version.split('/').next().unwrap_or_default();
        doc["kind"] == self.kind.as_str()
            && doc["apiVersion"]
                .as_str()
                .is_some_and(|v| v.split('/').next() == Some(group))
    }

    /// Validates a complete resource. Returns every problem found, empty if valid.
    pub fn validate(&self, doc: &Value) -> Vec<String> {
        self.check(&self.full, doc)
    }

    /// Validates a patch (a partial resource): like [`validate`](Self::validate) but without
    /// `required`.
    pub fn validate_partial(&self, doc: &Value) -> Vec<String> {
        self.check(&self.partial, doc)
    }

    fn check(&self, validator: &jsonschema::Validator, doc: &Value) -> Vec<String> {
        let mut errors: Vec<String> = validator
            .iter_errors(doc)
            .map(|e| format!("{}: {e}", display_path(&e.instance_path().to_string())))
            .collect();
        if let Some(spec) = doc.get("spec") {
            if let Some(spec_schema) = self.openapi["properties"].get("spec") {
                walk(spec_schema, spec, "/spec", &mut errors);
            }
        }
        errors
    }
}

fn display_path(pointer: &str) -> String {
    if pointer.is_empty() {
        "/".to_owned()
    } else {
        pointer.to_owned()
    }
}

/// The JSON Schema of a whole resource: the converted `openAPIV3Schema` plus the implicit
/// `apiVersion`, `kind` and `metadata`.
fn root_json_schema(openapi: &Value, api_version: &str, kind: &str, partial: bool) -> Value {
    let mut root = to_json_schema(openapi, partial);
    root["additionalProperties"] = json!(false);
    if !root["properties"].is_object() {
        root["properties"] = json!({});
    }
    let props = &mut root["properties"];
    props["apiVersion"] = json!({"const": api_version});
    props["kind"] = json!({"const": kind});
    props["metadata"] = json!({
        "type": "object",
        "properties": {
            // DNS-1123 subdomain (names) and label (namespaces), as the API server checks.
            "name": {
                "type": "string",
                "maxLength": 253,
                "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
            },
            "namespace": {
                "type": "string",
                "maxLength": 63,
                "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
            },
            "labels": {"type": "object", "additionalProperties": {"type": "string"}},
            "annotations": {"type": "object", "additionalProperties": {"type": "string"}}
        },
        "required": if partial { json!([]) } else { json!(["name"]) }
    });
    if !partial {
        let mut required = root["required"].as_array().cloned().unwrap_or_default();
        required.extend(["apiVersion", "kind", "metadata"].map(|k| json!(k)));
        root["required"] = Value::Array(required);
    }
    root
}

/// Converts one OpenAPI v3 structural schema node (and its children) to JSON Schema.
pub fn to_json_schema(node: &Value, partial: bool) -> Value {
    let Some(obj) = node.as_object() else {
        return node.clone();
    };
    let mut out = Map::new();
    let preserve = obj
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    for (key, value) in obj {
        match key.as_str() {
            k if k.starts_with("x-kubernetes-") => {}
            "nullable" | "description" => {}
            "required" if partial => {}
            "properties" => {
                let props = value
                    .as_object()
                    .map(|p| {
                        p.iter()
                            .map(|(k, v)| (k.clone(), to_json_schema(v, partial)))
                            .collect::<Map<_, _>>()
                    })
                    .unwrap_or_default();
                out.insert(key.clone(), Value::Object(props));
            }
            "items" | "additionalProperties" | "not" if value.is_object() => {
                out.insert(key.clone(), to_json_schema(value, partial));
            }
            "anyOf" | "allOf" | "oneOf" => {
                let list = value
                    .as_array()
                    .map(|l| l.iter().map(|v| to_json_schema(v, partial)).collect())
                    .unwrap_or_default();
                out.insert(key.clone(), Value::Array(list));
            }
            "format" => {
                match value.as_str() {
                    Some("int32") => {
                        out.insert("minimum".into(), json!(i32::MIN));
                        out.insert("maximum".into(), json!(i32::MAX));
                    }
                    Some("int64") => {
                        out.insert("minimum".into(), json!(i64::MIN));
                        out.insert("maximum".into(), json!(i64::MAX));
                    }
                    _ => {}
                }
                out.insert(key.clone(), value.clone());
            }
            _ => {
                out.insert(key.clone(), value.clone());
            }
        }
    }
    if obj.get("nullable").and_then(Value::as_bool) == Some(true) {
        if let Some(Value::String(t)) = out.get("type").cloned() {
            out.insert("type".into(), json!([t, "null"]));
        }
    }
    let is_object = obj.get("type").and_then(Value::as_str) == Some("object");
    if is_object && obj.contains_key("properties") && !preserve {
        out.entry("additionalProperties").or_insert(json!(false));
    }
    Value::Object(out)
}

/// Walks schema and value together for the checks JSON Schema cannot express.
fn walk(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    if let Some(rules) = schema
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
    {
        for rule in rules {
            let text = rule["rule"].as_str().unwrap_or_default();
            let message = rule["message"].as_str().unwrap_or("failed rule");
            match check_cel_rule(text, value) {
                Some(true) => {}
                Some(false) => errors.push(format!("{path}: {message}")),
                None => errors.push(format!(
                    "{path}: no hand translation of CEL rule `{}`",
                    normalize(text)
                )),
            }
        }
    }
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                for (key, child) in map {
                    if let Some(child_schema) = props.get(key) {
                        walk(child_schema, child, &format!("{path}/{key}"), errors);
                    }
                }
            } else if let Some(extra) = schema.get("additionalProperties").filter(|s| s.is_object())
            {
                for (key, child) in map {
                    walk(extra, child, &format!("{path}/{key}"), errors);
                }
            }
        }
        Value::Array(items) => {
            if schema["x-kubernetes-list-type"] == "map" {
                check_list_map_keys(schema, items, path, errors);
            }
            if schema["x-kubernetes-list-type"] == "set" {
                let mut seen = HashSet::new();
                for item in items {
                    if !seen.insert(item.to_string()) {
                        errors.push(format!("{path}: duplicate entry {item} in a list-type set"));
                    }
                }
            }
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    walk(item_schema, item, &format!("{path}/{i}"), errors);
                }
            }
        }
        _ => {}
    }
}

fn check_list_map_keys(schema: &Value, items: &[Value], path: &str, errors: &mut Vec<String>) {
    let keys: Vec<&str> = schema["x-kubernetes-list-map-keys"]
        .as_array()
        .map(|k| k.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let mut seen = HashSet::new();
    for item in items {
        let id: Vec<String> = keys.iter().map(|k| item[*k].to_string()).collect();
        if !seen.insert(id.clone()) {
            errors.push(format!(
                "{path}: duplicate entry with {} = {} in a list-type map",
                keys.join(","),
                id.join(",")
            ));
        }
    }
}

fn normalize(rule: &str) -> String {
    rule.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Hand translations of the CEL rules in the WasmPlugin CRD (istio `crd-all.gen.yaml`).
/// `None`: the rule is unknown here.
fn check_cel_rule(rule: &str, value: &Value) -> Option<bool> {
    let has = |field: &str| value.get(field).is_some_and(|v| !v.is_null());
    let keys = || value.as_object().into_iter().flat_map(|m| m.keys());
    let text = value.as_str().unwrap_or_default();
    let ok = match normalize(rule).as_str() {
        // selector.matchLabels values
        r#"!self.contains("*")"# => !text.contains('*'),
        // selector.matchLabels keys
        r#"self.all(key, !key.contains("*"))"# => keys().all(|k| !k.contains('*')),
        "self.all(key, key.size() != 0)" => keys().all(|k| !k.is_empty()),
        // targetRef(s).namespace
        "self.size() == 0" => text.is_empty(),
        // vmConfig.env[]
        r#"(has(self.valueFrom) ? self.valueFrom : "") != "HOST" || !has(self.value)"# => {
            value.get("valueFrom").and_then(Value::as_str) != Some("HOST") || !has("value")
        }
        // spec
        "(has(self.selector) ? 1 : 0) + (has(self.targetRef) ? 1 : 0) + (has(self.targetRefs) ? 1 : 0) <= 1" => {
            ["selector", "targetRef", "targetRefs"]
                .iter()
                .filter(|f| has(f))
                .count()
                <= 1
        }
        // spec.url
        r#"isURL(self) ? (url(self).getScheme() in ["", "http", "https", "oci", "file"]) : (isURL("http://" + self) && url("http://" + self).getScheme() in ["", "http", "https", "oci", "file"])"# => {
            url_scheme_allowed(text)
        }
        _ => return None,
    };
    Some(ok)
}

/// The url rule. Kubernetes' `isURL` is Go's `url.ParseRequestURI`: a string that starts with
/// `<letter>[letters digits + - .]*:` has that scheme (lowercased) even without `//`, so
/// `localhost:5000/repo:tag` has scheme `localhost` and is **rejected**; a string without a
/// scheme is tried again as `http://<it>` and accepted if it parses.
fn url_scheme_allowed(url: &str) -> bool {
    if url.is_empty() || url.chars().any(|c| c.is_ascii_control() || c == ' ') {
        return false;
    }
    let scheme = url.find(':').map(|i| &url[..i]).filter(|s| {
        let mut chars = s.chars();
        chars.next().is_some_and(|c| c.is_ascii_alphabetic())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
    });
    match scheme {
        Some(s) => ["http", "https", "oci", "file"].contains(&s.to_ascii_lowercase().as_str()),
        None => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_rule_follows_go_parse_request_uri() {
        assert!(url_scheme_allowed(
            "oci://registry.example.com/oidc-gate/filter:v1"
        ));
        assert!(url_scheme_allowed(
            "registry.example.com/oidc-gate/filter:v1"
        ));
        assert!(url_scheme_allowed("https://example.com/filter.wasm"));
        assert!(url_scheme_allowed("file:///opt/filter.wasm"));
        assert!(!url_scheme_allowed("ftp://example.com/filter.wasm"));
        assert!(!url_scheme_allowed("localhost:5000/oidc-gate/filter:v1"));
        assert!(!url_scheme_allowed(""));
    }

    #[test]
    fn nullable_and_int32_are_translated() {
        let schema = to_json_schema(
            &json!({"type": "integer", "format": "int32", "nullable": true}),
            false,
        );
        assert_eq!(schema["type"], json!(["integer", "null"]));
        assert_eq!(schema["maximum"], json!(i32::MAX));
    }

    #[test]
    fn unknown_cel_rules_are_reported() {
        assert_eq!(check_cel_rule("self.foo()", &json!(1)), None);
    }
}
