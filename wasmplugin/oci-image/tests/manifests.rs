//! The manifests under `wasmplugin/` against Istio's real WasmPlugin CRD, and the rules the
//! delivery depends on (secrets only from the pod environment, IdP plumbing, gateway patch).

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use oci_image::crd::CrdSchema;
use oci_image::{kustomize, parse_yaml_documents, render, yaml_to_json};
use serde_json::{json, Value};

const DIGEST: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
const IMAGE: &str = "registry.example.com/oidc-gate/filter:v1";

fn yaml_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if !(name.starts_with('.') || name == "out" || name == "target") {
                yaml_files(&path, out);
            }
        } else if name.ends_with(".yaml") || name.ends_with(".yml") {
            out.push(path);
        }
    }
}

fn overlays() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = fs::read_dir(common::wasmplugin_dir().join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| kustomize::kustomization_file(p).is_some())
        .collect();
    dirs.sort();
    dirs
}

fn base_plugin() -> Value {
    let text = fs::read_to_string(common::wasmplugin_dir().join("base/wasmplugin.yaml")).unwrap();
    let docs = parse_yaml_documents(&text).unwrap();
    yaml_to_json(&docs[0]).unwrap()
}

fn render_overlay(dir: &Path, values: &render::Values) -> Vec<Value> {
    let mut docs = kustomize::build(dir).unwrap();
    render::apply(&mut docs, values).unwrap();
    docs.iter().map(|d| yaml_to_json(d).unwrap()).collect()
}

fn values() -> render::Values {
    render::Values {
        image: IMAGE.into(),
        digest: DIGEST.into(),
        hosts: None,
        issuer: None,
    }
}

fn assert_valid(schema: &CrdSchema, doc: &Value, what: &str) {
    let errors = schema.validate(doc);
    assert!(
        errors.is_empty(),
        "{what} is invalid:\n  {}",
        errors.join("\n  ")
    );
}

fn assert_invalid(schema: &CrdSchema, doc: &Value, expect: &str) {
    let errors = schema.validate(doc);
    assert!(
        errors.iter().any(|e| e.contains(expect)),
        "expected an error containing `{expect}`, got {errors:?}"
    );
}

#[test]
fn every_wasmplugin_manifest_validates_against_the_crd() {
    let schema = common::crd();
    let root = common::wasmplugin_dir();
    let mut kustomization_dirs = vec![root.join("base")];
    kustomization_dirs.extend(overlays());
    let patch_files: BTreeSet<PathBuf> = kustomization_dirs
        .iter()
        .flat_map(|d| kustomize::patches(d).unwrap())
        .filter_map(|p| p.file.map(|f| f.canonicalize().unwrap()))
        .collect();

    let mut files = Vec::new();
    yaml_files(&root, &mut files);
    let (mut full, mut partial) = (0, 0);
    for file in files {
        let text = fs::read_to_string(&file).unwrap();
        for doc in parse_yaml_documents(&text).unwrap() {
            let doc = yaml_to_json(&doc).unwrap();
            if !schema.matches(&doc) {
                continue;
            }
            let is_patch = patch_files.contains(&file.canonicalize().unwrap());
            let errors = if is_patch {
                partial += 1;
                schema.validate_partial(&doc)
            } else {
                full += 1;
                schema.validate(&doc)
            };
            assert!(
                errors.is_empty(),
                "{} is invalid:\n  {}",
                file.display(),
                errors.join("\n  ")
            );
        }
    }
    assert!(
        full >= 1,
        "no complete WasmPlugin found under {}",
        root.display()
    );
    assert!(partial >= 2, "expected a WasmPlugin patch per overlay");
}

#[test]
fn every_rendered_overlay_validates_against_the_crd() {
    let schema = common::crd();
    let overlays = overlays();
    assert!(
        overlays.len() >= 2,
        "expected the dex and external-idp overlays"
    );
    for overlay in overlays {
        let docs = render_overlay(&overlay, &values());
        let plugins: Vec<&Value> = docs.iter().filter(|d| schema.matches(d)).collect();
        assert_eq!(plugins.len(), 1, "{}", overlay.display());
        let plugin = plugins[0];
        assert_valid(&schema, plugin, &format!("rendered {}", overlay.display()));
        assert_eq!(plugin["spec"]["url"], format!("oci://{IMAGE}"));
        assert_eq!(
            plugin["spec"]["sha256"],
            DIGEST.trim_start_matches("sha256:")
        );
    }
}

#[test]
fn the_plugin_is_an_authn_gate_on_the_ingress_gateway() {
    let plugin = base_plugin();
    let spec = &plugin["spec"];
    assert_eq!(spec["phase"], "AUTHN");
    assert_eq!(spec["failStrategy"], "FAIL_CLOSE");
    assert_eq!(
        spec["selector"],
        json!({"matchLabels": {"istio": "ingressgateway"}})
    );
    assert!(spec["url"].as_str().unwrap().starts_with("oci://"));
}

#[test]
fn secrets_come_only_from_the_gateway_pod_environment() {
    let schema = common::crd();
    for overlay in overlays() {
        for doc in render_overlay(&overlay, &values()) {
            if !schema.matches(&doc) {
                continue;
            }
            let config = &doc["spec"]["pluginConfig"];
            for inline in ["client_secret", "cookie_secret"] {
                assert!(
                    config.get(inline).is_none(),
                    "{inline} inline in {}",
                    overlay.display()
                );
            }
            let env: Vec<&Value> = doc["spec"]["vmConfig"]["env"]
                .as_array()
                .unwrap()
                .iter()
                .collect();
            for (key, var) in [
                ("client_secret_env", "OIDC_CLIENT_SECRET"),
                ("cookie_secret_env", "OIDC_COOKIE_SECRET"),
            ] {
                assert_eq!(config[key], var);
                let entry = env.iter().find(|e| e["name"] == var).unwrap_or_else(|| {
                    panic!("{var} missing from vmConfig.env in {}", overlay.display())
                });
                assert_eq!(entry["valueFrom"], "HOST");
                assert!(entry.get("value").is_none());
            }
        }
    }
}

// Unknown keys (typos) are caught by `plugin_config_is_accepted_by_the_filter`, with the
// filter's own parser, which refuses them.
#[test]
fn plugin_config_names_what_every_overlay_needs() {
    let schema = common::crd();
    for overlay in overlays() {
        for doc in render_overlay(&overlay, &values()) {
            if !schema.matches(&doc) {
                continue;
            }
            let config = doc["spec"]["pluginConfig"].as_object().unwrap();
            for key in ["issuer", "idp_cluster", "client_id", "hosts"] {
                assert!(config.contains_key(key), "pluginConfig.{key} missing");
            }
            for list in ["hosts", "scopes", "skip_paths"] {
                assert!(
                    config[list].is_array(),
                    "pluginConfig.{list} must be a list"
                );
            }
            assert!(["access_token", "id_token", "none"]
                .contains(&config["upstream_authorization"].as_str().unwrap()));
        }
    }
}

#[test]
fn dex_overlay_calls_dex_inside_the_mesh() {
    let docs = render_overlay(&common::wasmplugin_dir().join("overlays/dex"), &values());
    let config = &docs[0]["spec"]["pluginConfig"];
    assert_eq!(
        config["idp_cluster"],
        "outbound|5556||dex.demo.svc.cluster.local"
    );
    assert_eq!(config["issuer"], "https://dex.example.com");
    assert_eq!(config["redirect_path"], "/oauth2/callback");
    assert!(docs.iter().all(|d| d["kind"] != "ServiceEntry"));
}

#[test]
fn external_overlay_originates_tls_to_the_idp_host() {
    let docs = render_overlay(
        &common::wasmplugin_dir().join("overlays/external-idp"),
        &values(),
    );
    let by_kind = |kind: &str| docs.iter().find(|d| d["kind"] == kind).unwrap();
    let config = &by_kind("WasmPlugin")["spec"]["pluginConfig"];
    let se = &by_kind("ServiceEntry")["spec"];
    let dr = &by_kind("DestinationRule")["spec"];
    assert_eq!(config["idp_cluster"], "outbound|443||sso.example.com");
    assert_eq!(se["hosts"], json!(["sso.example.com"]));
    assert_eq!(se["ports"][0]["number"], 443);
    assert_eq!(se["resolution"], "DNS");
    assert_eq!(dr["host"], "sso.example.com");
    assert_eq!(dr["trafficPolicy"]["tls"]["mode"], "SIMPLE");
    assert!(
        dr["trafficPolicy"]["tls"].get("sni").is_none(),
        "auto_sni needs sni unset"
    );
    // No idp_authority: the issuer's host is the :authority, hence SNI and SAN.
    assert!(config.get("idp_authority").is_none());
}

#[test]
fn render_fills_hosts_and_issuer_and_rejects_a_mismatched_idp_host() {
    let dex = common::wasmplugin_dir().join("overlays/dex");
    let mut v = values();
    v.hosts = Some(vec!["a.example.com".into(), "b.example.com".into()]);
    v.issuer = Some("https://login.example.com".into());
    let docs = render_overlay(&dex, &v);
    let config = &docs[0]["spec"]["pluginConfig"];
    assert_eq!(config["hosts"], json!(["a.example.com", "b.example.com"]));
    assert_eq!(config["issuer"], "https://login.example.com");

    // External IdP: the issuer moves to a host the ServiceEntry does not cover.
    let external = common::wasmplugin_dir().join("overlays/external-idp");
    let mut docs = kustomize::build(&external).unwrap();
    let mut v = values();
    v.issuer = Some("https://other.example.com".into());
    let err = render::apply(&mut docs, &v).unwrap_err();
    assert!(err.to_string().contains(":authority"), "{err}");

    let mut docs = kustomize::build(&dex).unwrap();
    let mut v = values();
    v.digest = "sha256:1234".into();
    assert!(render::apply(&mut docs, &v).is_err());
}

#[test]
fn kustomizations_are_valid_kustomize_files() {
    let root = common::wasmplugin_dir();
    let mut dirs = vec![root.join("base")];
    dirs.extend(overlays());
    for dir in dirs {
        let file = kustomize::kustomization_file(&dir).unwrap();
        let doc = parse_yaml_documents(&fs::read_to_string(&file).unwrap()).unwrap();
        let doc = yaml_to_json(&doc[0]).unwrap();
        assert_eq!(
            doc["apiVersion"],
            "kustomize.config.k8s.io/v1beta1",
            "{}",
            file.display()
        );
        assert_eq!(doc["kind"], "Kustomization", "{}", file.display());
        assert!(!kustomize::build(&dir).unwrap().is_empty());
    }
}

#[test]
fn gateway_patch_feeds_the_env_the_plugin_reads_from_a_secret() {
    let path = common::wasmplugin_dir().join("gateway/ingressgateway-secret-env.yaml");
    let patch = yaml_to_json(&parse_yaml_documents(&fs::read_to_string(path).unwrap()).unwrap()[0])
        .unwrap();
    let containers = patch["spec"]["template"]["spec"]["containers"]
        .as_array()
        .unwrap();
    let proxy = containers
        .iter()
        .find(|c| c["name"] == "istio-proxy")
        .unwrap();
    let env = proxy["env"].as_array().unwrap();
    let plugin = base_plugin();
    for host_var in plugin["spec"]["vmConfig"]["env"].as_array().unwrap() {
        let name = host_var["name"].as_str().unwrap();
        let entry = env
            .iter()
            .find(|e| e["name"] == name)
            .unwrap_or_else(|| panic!("the gateway patch does not set {name}"));
        let secret_ref = &entry["valueFrom"]["secretKeyRef"];
        assert_eq!(secret_ref["name"], "oidc-gate");
        assert!(secret_ref["key"].is_string());
        assert!(entry.get("value").is_none(), "{name} must not be inline");
    }
}

// ---- negative cases: what the API server would refuse ----

fn mutated(f: impl FnOnce(&mut Value)) -> Value {
    let mut doc = base_plugin();
    f(&mut doc);
    doc
}

#[test]
fn crd_rejects_a_bad_phase_and_fail_strategy() {
    let schema = common::crd();
    assert_invalid(
        &schema,
        &mutated(|d| d["spec"]["phase"] = json!("AUTHENTICATION")),
        "/spec/phase",
    );
    assert_invalid(
        &schema,
        &mutated(|d| d["spec"]["failStrategy"] = json!("FAIL_CLOSED")),
        "/spec/failStrategy",
    );
}

#[test]
fn crd_rejects_a_sha256_that_is_not_64_lowercase_hex() {
    let schema = common::crd();
    assert_invalid(
        &schema,
        &mutated(|d| d["spec"]["sha256"] = json!("abc")),
        "/spec/sha256",
    );
    assert_invalid(
        &schema,
        &mutated(|d| d["spec"]["sha256"] = json!(DIGEST)),
        "/spec/sha256",
    );
    let upper = DIGEST.trim_start_matches("sha256:").replace('1', "A");
    assert_invalid(
        &schema,
        &mutated(|d| d["spec"]["sha256"] = json!(upper)),
        "/spec/sha256",
    );
    // Empty means "no check": allowed by the schema.
    assert_valid(
        &schema,
        &mutated(|d| d["spec"]["sha256"] = json!("")),
        "empty sha256",
    );
}

#[test]
fn crd_rejects_a_value_next_to_value_from_host() {
    let schema = common::crd();
    let doc = mutated(|d| d["spec"]["vmConfig"]["env"][0]["value"] = json!("s3cret"));
    assert_invalid(
        &schema,
        &doc,
        "value may only be set when valueFrom is INLINE",
    );
    let inline = mutated(|d| {
        d["spec"]["vmConfig"]["env"][0] = json!({"name": "X", "value": "1", "valueFrom": "INLINE"})
    });
    assert_valid(&schema, &inline, "INLINE env with value");
    let too_long = mutated(|d| {
        d["spec"]["vmConfig"]["env"][0] = json!({"name": "X", "value": "v".repeat(2049)})
    });
    assert_invalid(&schema, &too_long, "/spec/vmConfig/env/0/value");
}

#[test]
fn crd_rejects_duplicate_env_names_and_unknown_fields() {
    let schema = common::crd();
    let dup = mutated(|d| d["spec"]["vmConfig"]["env"][1]["name"] = json!("OIDC_CLIENT_SECRET"));
    assert_invalid(&schema, &dup, "duplicate entry");
    assert_invalid(
        &schema,
        &mutated(|d| d["spec"]["pluginconfig"] = json!({})),
        "'pluginconfig' was unexpected",
    );
    assert_invalid(
        &schema,
        &mutated(|d| d["spec"]["vmConfig"]["envs"] = json!([])),
        "'envs' was unexpected",
    );
    // pluginConfig is free-form (x-kubernetes-preserve-unknown-fields).
    assert_valid(
        &schema,
        &mutated(|d| d["spec"]["pluginConfig"]["anything"] = json!({"x": [1]})),
        "free pluginConfig",
    );
}

#[test]
fn crd_rejects_selector_together_with_target_refs() {
    let schema = common::crd();
    let doc = mutated(|d| {
        d["spec"]["targetRefs"] =
            json!([{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "gw"}])
    });
    assert_invalid(
        &schema,
        &doc,
        "only one of targetRefs or selector can be set",
    );
    let wildcard = mutated(|d| d["spec"]["selector"]["matchLabels"]["istio"] = json!("ingress*"));
    assert_invalid(
        &schema,
        &wildcard,
        "wildcard not allowed in label value match",
    );
}

#[test]
fn crd_rejects_bad_urls_and_missing_required_fields() {
    let schema = common::crd();
    assert_invalid(
        &schema,
        &mutated(|d| d["spec"]["url"] = json!("ftp://example.com/x.wasm")),
        "url must have schema",
    );
    assert_invalid(
        &schema,
        &mutated(|d| d["spec"]["url"] = json!("localhost:5000/oidc-gate/filter:v1")),
        "url must have schema",
    );
    assert_invalid(
        &schema,
        &mutated(|d| d["spec"]["url"] = json!("")),
        "/spec/url",
    );
    let no_url = mutated(|d| {
        d["spec"].as_object_mut().unwrap().remove("url");
    });
    assert_invalid(&schema, &no_url, "\"url\" is a required property");
    assert_invalid(
        &schema,
        &mutated(|d| d["apiVersion"] = json!("extensions.istio.io/v1")),
        "/apiVersion",
    );
    assert_invalid(
        &schema,
        &mutated(|d| d["metadata"]["name"] = json!("OIDC_Gate")),
        "/metadata/name",
    );
    assert_invalid(
        &schema,
        &mutated(|d| d["spec"]["priority"] = json!("high")),
        "/spec/priority",
    );
    assert_valid(
        &schema,
        &mutated(|d| d["spec"]["priority"] = Value::Null),
        "null priority (nullable)",
    );
    assert_invalid(
        &schema,
        &mutated(|d| d["spec"]["priority"] = json!(1_u64 << 31)),
        "/spec/priority",
    );
}

#[test]
fn validate_command_reports_invalid_files() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    let doc = mutated(|d| d["spec"]["phase"] = json!("NOPE"));
    fs::write(&bad, serde_yaml_ng::to_string(&doc).unwrap()).unwrap();
    let out = std::process::Command::new(common::tool())
        .arg("validate")
        .arg("--crd")
        .arg(common::crd_path())
        .arg(common::wasmplugin_dir().join("base/wasmplugin.yaml"))
        .arg(&bad)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{stdout}");
    assert!(
        stdout.contains("base/wasmplugin.yaml: WasmPlugin oidc-gate: valid"),
        "{stdout}"
    );
    assert!(
        stdout.contains("bad.yaml: WasmPlugin oidc-gate: INVALID"),
        "{stdout}"
    );
}

/// What Istio hands the filter: the pluginConfig as compact JSON with sorted keys and numbers as
/// doubles. Each rendered WasmPlugin must be accepted by the filter's own parser, with the
/// secrets coming from the environment variables the manifest names.
#[test]
fn plugin_config_is_accepted_by_the_filter() {
    let mut plugins = vec![base_plugin()];
    for overlay in overlays() {
        plugins.extend(
            render_overlay(&overlay, &values())
                .into_iter()
                .filter(|d| d["kind"] == "WasmPlugin"),
        );
    }
    assert!(plugins.len() >= 3, "base and at least two overlays");
    for plugin in plugins {
        let doc: serde_yaml_ng::Value = serde_json::from_value(plugin.clone()).unwrap();
        if let Err(e) = oci_image::render::check_plugin_config(&[doc]) {
            panic!("{}: {e}", plugin["metadata"]["name"]);
        }
    }
}

/// A configuration the filter would refuse is refused at render and validate time: a typo'd
/// key, a wrong type, a secret variable the manifest does not pass into the VM.
#[test]
fn a_plugin_config_the_filter_refuses_is_refused_before_it_is_applied() {
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut plugin = base_plugin();
        edit(&mut plugin);
        serde_json::from_value::<serde_yaml_ng::Value>(plugin).unwrap()
    };
    let typo = with(&|p| p["spec"]["pluginConfig"]["isuer"] = json!("https://x"));
    let wrong_type = with(&|p| p["spec"]["pluginConfig"]["hosts"] = json!("app.example.com"));
    let env_not_passed = with(&|p| {
        p["spec"]["vmConfig"]["env"] = json!([{"name": "OIDC_CLIENT_SECRET", "valueFrom": "HOST"}])
    });
    for (what, doc, field) in [
        ("typo", typo, "isuer"),
        ("wrong type", wrong_type, "hosts"),
        ("variable not passed", env_not_passed, "cookie_secret_env"),
    ] {
        let e = oci_image::render::check_plugin_config(&[doc])
            .expect_err(what)
            .to_string();
        assert!(e.contains(&format!("field `{field}`")), "{what}: {e}");
    }
    assert!(oci_image::render::check_plugin_config(&[with(&|_| {})]).is_ok());
}
