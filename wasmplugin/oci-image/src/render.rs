//! Rendering an overlay into applicable manifests: image, digest, hosts and issuer filled in,
//! and the IdP plumbing cross-checked.
//!
//! The checks catch what would otherwise only show at run time as 503s from the filter:
//! - `idp_cluster` must be an Istio cluster name `outbound|<port>|<subset>|<fqdn>`
//!   (`dispatch_http_call` takes a cluster, and Envoy answers `BadArgument` for unknown ones);
//! - with a `ServiceEntry` in the output (external IdP), it must list the cluster's host and
//!   port, a `DestinationRule` for that host must originate TLS (`SIMPLE`), and the callout's
//!   `:authority` (`idp_authority`, else the issuer's host) must be the IdP host, because
//!   Istio's `auto_sni`/`auto_san_validation` take SNI and the SAN check from it.

use std::fmt::Write as _;

use serde_yaml_ng::{Mapping, Value};

use crate::Error;

/// What the render step fills in.
#[derive(Debug, Clone, Default)]
pub struct Values {
    /// `registry/repository:tag` (an `oci://` prefix is accepted and kept once).
    pub image: String,
    /// Manifest digest, `sha256:<64 hex>` or bare hex.
    pub digest: String,
    /// Hosts the filter protects (`pluginConfig.hosts`); `None` keeps the overlay's.
    pub hosts: Option<Vec<String>>,
    /// OpenID issuer (`pluginConfig.issuer`); `None` keeps the overlay's.
    pub issuer: Option<String>,
}

/// Returns the 64 lowercase hex digits of a `sha256:<hex>` or `<hex>` digest.
pub fn digest_hex(digest: &str) -> Result<String, Error> {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::new(format!(
            "digest `{digest}` is not sha256:<64 hex digits>"
        )));
    }
    Ok(hex.to_ascii_lowercase())
}

/// `oci://registry/repository:tag` from an image reference.
pub fn oci_url(image: &str) -> Result<String, Error> {
    let reference = image.strip_prefix("oci://").unwrap_or(image);
    let (registry, rest) = reference.split_once('/').unwrap_or_default();
    let bad = reference.is_empty()
        || reference.contains("://")
        || reference
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        || registry.is_empty()
        || rest.is_empty();
    if bad {
        return Err(Error::new(format!(
            "image `{image}` is not registry/repository[:tag]"
        )));
    }
    Ok(format!("oci://{reference}"))
}

/// The host of an `http(s)://host[:port]/...` URL.
pub fn url_host(url: &str) -> Result<&str, Error> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| Error::new(format!("`{url}` is not an http(s) URL")))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
    if host.is_empty() || authority.contains('@') {
        return Err(Error::new(format!("`{url}` has no usable host")));
    }
    Ok(host)
}

/// An Istio cluster name `outbound|<port>|<subset>|<fqdn>`, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IstioCluster {
    /// Service (not target) port.
    pub port: u16,
    /// Subset, usually empty.
    pub subset: String,
    /// Service host.
    pub host: String,
}

/// Parses `outbound|<port>|<subset>|<fqdn>`.
pub fn parse_cluster(name: &str) -> Result<IstioCluster, Error> {
    let parts: Vec<&str> = name.split('|').collect();
    let bad = || {
        Error::new(format!(
            "idp_cluster `{name}` is not an Istio cluster name outbound|<port>|<subset>|<host>"
        ))
    };
    let [direction, port, subset, host] = parts.as_slice() else {
        return Err(bad());
    };
    if *direction != "outbound" || host.is_empty() {
        return Err(bad());
    }
    Ok(IstioCluster {
        port: port.parse().map_err(|_| bad())?,
        subset: (*subset).to_owned(),
        host: (*host).to_owned(),
    })
}

fn kind_of(doc: &Value) -> &str {
    doc.get("kind").and_then(Value::as_str).unwrap_or_default()
}

fn name_of(doc: &Value) -> &str {
    doc.get("metadata")
        .and_then(|m| m.get("name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
}

fn mapping_at<'a>(doc: &'a mut Value, path: &[&str]) -> Result<&'a mut Mapping, Error> {
    let mut node = doc;
    for key in path {
        node = node
            .get_mut(*key)
            .ok_or_else(|| Error::new(format!("missing `{}`", path.join("."))))?;
    }
    node.as_mapping_mut()
        .ok_or_else(|| Error::new(format!("`{}` is not a map", path.join("."))))
}

/// Fills `values` into every `WasmPlugin` of `docs` and runs the IdP checks. Returns warnings
/// (things that are valid but probably not meant).
pub fn apply(docs: &mut [Value], values: &Values) -> Result<Vec<String>, Error> {
    let url = oci_url(&values.image)?;
    let sha256 = digest_hex(&values.digest)?;
    if let Some(issuer) = &values.issuer {
        url_host(issuer)?;
    }
    if let Some(hosts) = &values.hosts {
        if hosts.is_empty() || hosts.iter().any(|h| h.is_empty() || h.contains('/')) {
            return Err(Error::new(format!(
                "hosts {hosts:?}: give bare host names, e.g. app.example.com"
            )));
        }
    }
    let mut plugins = 0;
    let mut warnings = Vec::new();
    for doc in docs.iter_mut().filter(|d| kind_of(d) == "WasmPlugin") {
        plugins += 1;
        let name = name_of(doc).to_owned();
        let spec = mapping_at(doc, &["spec"]).map_err(|e| e.context(&name))?;
        spec.insert("url".into(), url.clone().into());
        spec.insert("sha256".into(), sha256.clone().into());
        let config = mapping_at(doc, &["spec", "pluginConfig"]).map_err(|e| e.context(&name))?;
        if let Some(issuer) = &values.issuer {
            config.insert("issuer".into(), issuer.clone().into());
        }
        if let Some(hosts) = &values.hosts {
            let list = hosts.iter().map(|h| Value::from(h.as_str())).collect();
            config.insert("hosts".into(), Value::Sequence(list));
            let logout_target = config
                .get("post_logout_redirect_uri")
                .and_then(Value::as_str)
                .and_then(|u| url_host(u).ok());
            if let Some(target) = logout_target.filter(|t| !hosts.iter().any(|h| h == t)) {
                warnings.push(format!(
                    "{name}: post_logout_redirect_uri still points to {target}, which is not in --hosts; \
                     change it in the overlay if that is not meant"
                ));
            }
        }
    }
    if plugins == 0 {
        return Err(Error::new("the overlay has no WasmPlugin"));
    }
    check_idp_plumbing(docs)?;
    check_plugin_config(docs)?;
    Ok(warnings)
}

/// Runs each `WasmPlugin`'s `pluginConfig` through the filter's own parser, as the filter will
/// see it: Istio's JSON (numbers as doubles), with a stand-in value for every variable the
/// manifest passes into the VM (`vmConfig.env`, `valueFrom: HOST`) and none for any other. A
/// configuration the filter refuses is refused here, before running pods NACK it and new pods
/// answer 500 to every host.
pub fn check_plugin_config(docs: &[Value]) -> Result<(), Error> {
    for doc in docs.iter().filter(|d| kind_of(d) == "WasmPlugin") {
        let json = crate::yaml_to_json(doc)?;
        let passed: Vec<&str> = json["spec"]["vmConfig"]["env"]
            .as_array()
            .map(|vars| {
                vars.iter()
                    .filter(|v| v["valueFrom"] == "HOST")
                    .filter_map(|v| v["name"].as_str())
                    .collect()
            })
            .unwrap_or_default();
        // Valid as a client secret and as a cookie secret (base64 of 32 bytes).
        const STAND_IN: &str = "c3RhbmQtaW4gZm9yIGEgMzItYnl0ZSBzZWNyZXQgISE=";
        let env = |name: &str| passed.contains(&name).then(|| STAND_IN.to_owned());
        let config = serde_json::to_string(&as_istio_json(&json["spec"]["pluginConfig"]))?;
        oidc_filter::config::Config::parse(config.as_bytes(), &env).map_err(|e| {
            Error::new(format!(
                "{}: the filter would refuse this pluginConfig: {e}",
                name_of(doc)
            ))
        })?;
    }
    Ok(())
}

/// What Istio hands the filter: `pluginConfig` through a protobuf `Struct`, where every number
/// is a double.
fn as_istio_json(v: &serde_json::Value) -> serde_json::Value {
    use serde_json::Value as J;
    match v {
        J::Number(n) => n.as_f64().map_or(J::Null, J::from),
        J::Array(a) => J::Array(a.iter().map(as_istio_json).collect()),
        J::Object(o) => J::Object(
            o.iter()
                .map(|(k, v)| (k.clone(), as_istio_json(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The external-IdP consistency checks described in the module docs.
pub fn check_idp_plumbing(docs: &[Value]) -> Result<(), Error> {
    let service_entries: Vec<&Value> = docs
        .iter()
        .filter(|d| kind_of(d) == "ServiceEntry")
        .collect();
    for plugin in docs.iter().filter(|d| kind_of(d) == "WasmPlugin") {
        let name = name_of(plugin);
        let config = plugin
            .get("spec")
            .and_then(|s| s.get("pluginConfig"))
            .ok_or_else(|| Error::new(format!("{name}: no spec.pluginConfig")))?;
        let field = |key: &str| config.get(key).and_then(Value::as_str);
        let cluster_name = field("idp_cluster")
            .ok_or_else(|| Error::new(format!("{name}: pluginConfig.idp_cluster is missing")))?;
        let cluster = parse_cluster(cluster_name).map_err(|e| e.context(name))?;
        let issuer = field("issuer")
            .ok_or_else(|| Error::new(format!("{name}: pluginConfig.issuer is missing")))?;
        let issuer_host = url_host(issuer).map_err(|e| e.context(name))?;
        if service_entries.is_empty() {
            continue;
        }
        let listed = service_entries.iter().any(|se| {
            let spec = se.get("spec");
            let hosts_ok = spec
                .and_then(|s| s.get("hosts"))
                .and_then(Value::as_sequence)
                .is_some_and(|h| h.iter().any(|h| h.as_str() == Some(cluster.host.as_str())));
            let port_ok = spec
                .and_then(|s| s.get("ports"))
                .and_then(Value::as_sequence)
                .is_some_and(|p| {
                    p.iter().any(|p| {
                        p.get("number").and_then(Value::as_u64) == Some(u64::from(cluster.port))
                    })
                });
            hosts_ok && port_ok
        });
        if !listed {
            return Err(Error::new(format!(
                "{name}: no ServiceEntry lists host {} port {} of idp_cluster {cluster_name}; \
                 update the overlay's serviceentry.yaml",
                cluster.host, cluster.port
            )));
        }
        let tls_ok = docs
            .iter()
            .filter(|d| kind_of(d) == "DestinationRule")
            .filter_map(|d| d.get("spec"))
            .filter(|s| s.get("host").and_then(Value::as_str) == Some(cluster.host.as_str()))
            .any(|s| originates_tls(s, cluster.port));
        if !tls_ok {
            return Err(Error::new(format!(
                "{name}: no DestinationRule for {} originates TLS (trafficPolicy.tls.mode: SIMPLE); \
                 the filter's callout is plain HTTP",
                cluster.host
            )));
        }
        let authority = field("idp_authority").unwrap_or(issuer_host);
        let authority_host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        if authority_host != cluster.host {
            return Err(Error::new(format!(
                "{name}: the callout :authority `{authority}` (idp_authority, else the issuer's host) \
                 is not the IdP host {}; Istio derives SNI and the certificate check from it",
                cluster.host
            )));
        }
    }
    Ok(())
}

fn originates_tls(spec: &Value, port: u16) -> bool {
    let policy = spec.get("trafficPolicy");
    let mode_is_simple = |p: Option<&Value>| {
        p.and_then(|p| p.get("tls"))
            .and_then(|t| t.get("mode"))
            .and_then(Value::as_str)
            == Some("SIMPLE")
    };
    let port_level = policy
        .and_then(|p| p.get("portLevelSettings"))
        .and_then(Value::as_sequence)
        .and_then(|s| {
            s.iter().find(|s| {
                s.get("port")
                    .and_then(|p| p.get("number"))
                    .and_then(Value::as_u64)
                    == Some(u64::from(port))
            })
        });
    match port_level {
        Some(settings) if settings.get("tls").is_some() => mode_is_simple(Some(settings)),
        _ => mode_is_simple(policy),
    }
}

/// Multi-document YAML with a header saying where it came from.
pub fn to_yaml(docs: &[Value], source: &str) -> Result<String, Error> {
    let mut out = format!(
        "# Rendered by `oci-image render` from {source}. Do not edit; edit the overlay and render again.\n"
    );
    for doc in docs {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(doc)?);
    }
    Ok(out)
}

/// Splits a comma-separated host list.
pub fn split_hosts(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_owned)
        .collect()
}

/// A short human summary of what was filled in.
pub fn summary(docs: &[Value]) -> String {
    let mut out = String::new();
    for doc in docs {
        let _ = writeln!(out, "  {} {}", kind_of(doc), name_of(doc));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_digests() {
        let hex = "a".repeat(64);
        assert_eq!(digest_hex(&format!("sha256:{hex}")).unwrap(), hex);
        assert_eq!(digest_hex(&hex.to_uppercase()).unwrap(), hex);
        assert!(digest_hex("sha256:abc").is_err());
        assert!(digest_hex(&format!("sha512:{hex}")).is_err());
    }

    #[test]
    fn builds_oci_urls() {
        assert_eq!(
            oci_url("127.0.0.1:5000/oidc-gate/filter:v1").unwrap(),
            "oci://127.0.0.1:5000/oidc-gate/filter:v1"
        );
        assert_eq!(
            oci_url("oci://ghcr.io/acme/filter:v1").unwrap(),
            "oci://ghcr.io/acme/filter:v1"
        );
        assert!(oci_url("filter").is_err());
        assert!(oci_url("https://ghcr.io/acme/filter").is_err());
    }

    #[test]
    fn parses_istio_cluster_names() {
        assert_eq!(
            parse_cluster("outbound|5556||dex.demo.svc.cluster.local").unwrap(),
            IstioCluster {
                port: 5556,
                subset: String::new(),
                host: "dex.demo.svc.cluster.local".into()
            }
        );
        assert!(parse_cluster("dex.demo.svc.cluster.local:5556").is_err());
        assert!(parse_cluster("inbound|5556||dex").is_err());
        assert!(parse_cluster("outbound|x||dex").is_err());
    }

    #[test]
    fn finds_url_hosts() {
        assert_eq!(
            url_host("https://sso.example.com/realms/demo").unwrap(),
            "sso.example.com"
        );
        assert_eq!(url_host("http://127.0.0.1:8080").unwrap(), "127.0.0.1");
        assert!(url_host("sso.example.com").is_err());
    }

    #[test]
    fn splits_hosts() {
        assert_eq!(
            split_hosts(" a.example.com, b.example.com,,"),
            vec!["a.example.com", "b.example.com"]
        );
    }
}
