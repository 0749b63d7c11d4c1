//! Envoy bootstrap shaped like an Istio (>= 1.30) ingress gateway running oidc-gate as a WasmPlugin.
//!
//! Copied in shape from `/work/shared/reference/istio-gateway-envoy.yaml` (see `istio.md` there):
//! listener `0.0.0.0_8443` (HTTPS), the gateway HCM settings, the wasm filter under its Istio
//! ECDS/filter name in phase AUTHN, then `grpc_stats`, `fault`, `cors`, `router`; clusters named
//! `outbound|<port>||<fqdn>`. The plugin configuration is a `google.protobuf.StringValue` holding
//! compact JSON with sorted keys and numbers as doubles ([`istio_plugin_json`]), the way istiod
//! passes `pluginConfig`.
//!
//! Istio always delivers the filter over ECDS; [`Delivery::Ecds`] reproduces that with a file
//! `path_config_source` (type_urls Wasm and RBAC). [`Delivery::Inline`] (default) puts the same
//! `Wasm` message directly in the listener.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Map, Number, Value};
use url::Url;

use crate::tls::CertFiles;

/// Istio's listener name for the HTTPS gateway port.
pub const GATEWAY_LISTENER: &str = "0.0.0.0_8443";
/// WasmPlugin `istio-ingress/oidc-gate` after Istio 1.30's translation.
pub const PLUGIN_NAME: &str = "istio-ingress.oidc-gate~istio-translated-wasmplugin";
/// The HTTP filter name = ECDS resource name Istio uses for [`PLUGIN_NAME`].
pub const FILTER_NAME: &str =
    "extensions.istio.io/trafficextension/istio-ingress.oidc-gate~istio-translated-wasmplugin";
/// The upstream (app) cluster.
pub const UPSTREAM_CLUSTER: &str = "outbound|8000||httpbin.default.svc.cluster.local";
/// FQDN of the IdP service; its cluster is `outbound|<port>||idp.test.svc.cluster.local`.
pub const IDP_FQDN: &str = "idp.test.svc.cluster.local";
/// Envoy node id of an ingress gateway pod.
pub const NODE_ID: &str =
    "router~10.0.0.10~istio-ingressgateway-abc.istio-ingress~istio-ingress.svc.cluster.local";

const TYPE_WASM: &str = "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm";
const TYPE_RBAC: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";

/// Istio cluster name for the IdP service port.
pub fn idp_cluster_name(port: u16) -> String {
    format!("outbound|{port}||{IDP_FQDN}")
}

/// How the wasm filter reaches Envoy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Delivery {
    /// `typed_config` inline in the listener.
    #[default]
    Inline,
    /// `config_discovery` from a file (`ecds.json` next to the bootstrap), as Istio's ECDS.
    Ecds,
}

/// Everything that varies in the gateway bootstrap.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// The filter module.
    pub wasm: PathBuf,
    /// The exact `configuration` string (see [`istio_plugin_json`]); `None` = no pluginConfig
    /// (Istio then sends an empty configuration).
    pub plugin_config: Option<String>,
    /// `vm_config.environment_variables.key_values` (WasmPlugin `vmConfig.env` INLINE).
    pub env: BTreeMap<String, String>,
    /// `vm_config.environment_variables.host_env_keys` (WasmPlugin `vmConfig.env` HOST).
    pub host_env_keys: Vec<String>,
    /// `failure_policy`: `FAIL_CLOSED` (Istio's default), `FAIL_OPEN`, `FAIL_RELOAD`.
    pub failure_policy: String,
    /// `root_id` (WasmPlugin `pluginName`); empty by default.
    pub root_id: String,
    /// Wasm runtime; Istio always uses v8.
    pub runtime: String,
    /// Where the listener binds (port 0 = let Envoy pick; read back from admin).
    pub listener_port: u16,
    /// Upstream app endpoint port.
    pub upstream_port: u16,
    /// Speak HTTP/2 to the upstream app (as Istio does for a gRPC or `http2` Service port), so
    /// request trailers reach it.
    pub upstream_http2: bool,
    /// The port in the IdP cluster name (the Service port).
    pub idp_service_port: u16,
    /// Where the IdP cluster actually points (127.0.0.1:<port>).
    pub idp_endpoint_port: u16,
    /// Serving certificate.
    pub cert: CertFiles,
    /// Inline or ECDS.
    pub delivery: Delivery,
    /// Put the wasm filter in the chain (false = plain gateway, for harness self-tests).
    pub wasm_filter: bool,
    /// More clusters (full Envoy cluster objects).
    pub extra_clusters: Vec<Value>,
    /// More listeners (full Envoy listener objects).
    pub extra_listeners: Vec<Value>,
}

impl GatewayConfig {
    /// Defaults for everything but the ports, module and certificate.
    pub fn new(wasm: PathBuf, cert: CertFiles, upstream_port: u16, idp_port: u16) -> Self {
        Self {
            wasm,
            plugin_config: None,
            env: BTreeMap::new(),
            host_env_keys: Vec::new(),
            failure_policy: "FAIL_CLOSED".into(),
            root_id: String::new(),
            runtime: "envoy.wasm.runtime.v8".into(),
            listener_port: 0,
            upstream_port,
            upstream_http2: false,
            idp_service_port: idp_port,
            idp_endpoint_port: idp_port,
            cert,
            delivery: Delivery::Inline,
            wasm_filter: true,
            extra_clusters: Vec::new(),
            extra_listeners: Vec::new(),
        }
    }

    /// The IdP cluster name as the filter must use it.
    pub fn idp_cluster(&self) -> String {
        idp_cluster_name(self.idp_service_port)
    }

    /// The `envoy.extensions.filters.http.wasm.v3.Wasm` message (with `@type`).
    pub fn wasm_typed_config(&self) -> Value {
        let mut env = json!({});
        if !self.env.is_empty() {
            env["key_values"] = json!(self.env);
        }
        if !self.host_env_keys.is_empty() {
            env["host_env_keys"] = json!(self.host_env_keys);
        }
        let mut config = json!({
            "name": PLUGIN_NAME,
            "root_id": self.root_id,
            "failure_policy": self.failure_policy,
            "vm_config": {
                "runtime": self.runtime,
                "code": { "local": { "filename": self.wasm.to_string_lossy() } },
            },
        });
        if env.as_object().is_some_and(|m| !m.is_empty()) {
            config["vm_config"]["environment_variables"] = env;
        }
        if let Some(pc) = &self.plugin_config {
            config["configuration"] = json!({
                "@type": "type.googleapis.com/google.protobuf.StringValue",
                "value": pc,
            });
        }
        json!({ "@type": TYPE_WASM, "config": config })
    }

    /// The ECDS `DiscoveryResponse` (file form) carrying the Wasm filter under [`FILTER_NAME`].
    pub fn ecds_resource(&self, version: u64) -> Value {
        self.ecds_resource_with(version, self.wasm_typed_config())
    }

    /// An ECDS `DiscoveryResponse` with any typed_config (e.g. Istio's deny-all RBAC fallback).
    pub fn ecds_resource_with(&self, version: u64, typed_config: Value) -> Value {
        json!({
            "version_info": version.to_string(),
            "resources": [{
                "@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                "name": FILTER_NAME,
                "typed_config": typed_config,
            }],
        })
    }

    /// The deny-all RBAC istio-agent substitutes when the module download fails (FAIL_CLOSE).
    pub fn rbac_deny_all() -> Value {
        json!({ "@type": TYPE_RBAC, "rules": {}, "rules_stat_prefix": "wasm-default-deny" })
    }

    /// The wasm entry in `http_filters`.
    pub fn wasm_http_filter(&self, ecds_path: Option<&Path>) -> Value {
        match (self.delivery, ecds_path) {
            (Delivery::Ecds, Some(path)) => json!({
                "name": FILTER_NAME,
                "config_discovery": {
                    "config_source": {
                        "path_config_source": { "path": path.to_string_lossy() },
                        "resource_api_version": "V3",
                        "initial_fetch_timeout": "0s",
                    },
                    "type_urls": [TYPE_WASM, TYPE_RBAC],
                },
            }),
            _ => json!({ "name": FILTER_NAME, "typed_config": self.wasm_typed_config() }),
        }
    }

    /// The gateway listener `0.0.0.0_8443`.
    pub fn gateway_listener(&self, ecds_path: Option<&Path>, access_log: &Path) -> Value {
        let mut filters = Vec::new();
        if self.wasm_filter {
            filters.push(self.wasm_http_filter(ecds_path));
        }
        filters.extend(gateway_tail_filters());
        json!({
            "name": GATEWAY_LISTENER,
            "address": { "socket_address": { "address": "127.0.0.1", "port_value": self.listener_port } },
            "traffic_direction": "OUTBOUND",
            "listener_filters": [{
                "name": "envoy.filters.listener.tls_inspector",
                "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" },
            }],
            "filter_chains": [{
                "transport_socket": downstream_tls(&self.cert, &["h2", "http/1.1"]),
                "filters": [{
                    "name": "envoy.filters.network.http_connection_manager",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": "outbound_0.0.0.0_8443",
                        "codec_type": "AUTO",
                        "use_remote_address": true,
                        "xff_num_trusted_hops": 0,
                        "forward_client_cert_details": "SANITIZE_SET",
                        "set_current_client_cert_details": { "subject": true, "cert": true, "dns": true, "uri": true },
                        "normalize_path": true,
                        "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
                        "stream_idle_timeout": "0s",
                        "http_protocol_options": {},
                        "upgrade_configs": [{ "upgrade_type": "websocket" }],
                        "request_id_extension": {
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                                "use_request_id_for_trace_sampling": true,
                            },
                        },
                        "access_log": [{
                            "name": "envoy.access_loggers.file",
                            "typed_config": {
                                "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
                                "path": access_log.to_string_lossy(),
                            },
                        }],
                        "route_config": {
                            "name": "https.443.https.istio-ingressgateway.istio-ingress",
                            "virtual_hosts": [{
                                "name": "*:443",
                                "domains": ["*"],
                                "routes": [{
                                    "match": { "prefix": "/" },
                                    "route": { "cluster": UPSTREAM_CLUSTER, "timeout": "0s" },
                                }],
                            }],
                        },
                        "http_filters": filters,
                    },
                }],
            }],
        })
    }

    /// The whole bootstrap.
    pub fn bootstrap(&self, ecds_path: Option<&Path>, access_log: &Path) -> Value {
        let mut listeners = vec![self.gateway_listener(ecds_path, access_log)];
        listeners.extend(self.extra_listeners.iter().cloned());
        let mut upstream = static_cluster(UPSTREAM_CLUSTER, self.upstream_port);
        if self.upstream_http2 {
            upstream["typed_extension_protocol_options"] = json!({
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                    "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                    "explicit_http_config": { "http2_protocol_options": {} },
                },
            });
        }
        let mut clusters = vec![
            upstream,
            static_cluster(&self.idp_cluster(), self.idp_endpoint_port),
        ];
        clusters.extend(self.extra_clusters.iter().cloned());
        json!({
            "node": { "id": NODE_ID, "cluster": "istio-ingressgateway.istio-ingress" },
            "admin": { "address": { "socket_address": { "address": "127.0.0.1", "port_value": 0 } } },
            "static_resources": { "listeners": listeners, "clusters": clusters },
        })
    }

    /// Write `envoy.json` (and `ecds.json` for [`Delivery::Ecds`]) into `dir`; returns the bootstrap path.
    pub fn write(&self, dir: &Path) -> PathBuf {
        let ecds = dir.join("ecds.json");
        let ecds_path = match self.delivery {
            Delivery::Ecds if self.wasm_filter => {
                write_atomic(&ecds, &self.ecds_resource(1));
                Some(ecds.as_path())
            }
            _ => None,
        };
        let path = dir.join("envoy.json");
        write_atomic(&path, &self.bootstrap(ecds_path, &dir.join("access.log")));
        path
    }
}

/// The filters Istio puts after the wasm plugins at a gateway (upstream Envoy has no
/// `istio.alpn`/`istio.stats`): grpc_stats, fault, cors, router.
pub fn gateway_tail_filters() -> Vec<Value> {
    vec![
        json!({
            "name": "envoy.filters.http.grpc_stats",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
                "emit_filter_state": true,
                "stats_for_all_methods": false,
            },
        }),
        json!({
            "name": "envoy.filters.http.fault",
            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault" },
        }),
        json!({
            "name": "envoy.filters.http.cors",
            "typed_config": { "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors" },
        }),
        json!({
            "name": "envoy.filters.http.router",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
                "start_child_span": false,
                "suppress_envoy_headers": false,
            },
        }),
    ]
}

/// A listener's TLS transport socket serving `cert`, offering `alpn` (may be empty).
pub fn downstream_tls(cert: &CertFiles, alpn: &[&str]) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
            "common_tls_context": {
                "alpn_protocols": alpn,
                "tls_certificates": [{
                    "certificate_chain": { "filename": cert.cert.to_string_lossy() },
                    "private_key": { "filename": cert.key.to_string_lossy() },
                }],
            },
        },
    })
}

/// Makes `cluster` what Istio generates for a `DestinationRule` with `tls.mode: SIMPLE` and no
/// `sni`: TLS to the endpoint, with SNI and the certificate's name check taken from each
/// request's `:authority`, against the CAs in `trusted_ca` (a PEM file).
pub fn add_upstream_tls(cluster: &mut Value, trusted_ca: &str) {
    cluster["transport_socket"] = json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "common_tls_context": {
                "validation_context": { "trusted_ca": { "filename": trusted_ca } },
            },
        },
    });
    cluster["typed_extension_protocol_options"] = json!({
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "upstream_http_protocol_options": { "auto_sni": true, "auto_san_validation": true },
            "explicit_http_config": { "http_protocol_options": {} },
        },
    });
}

/// A STATIC cluster on 127.0.0.1:`port`, as Istio's EDS cluster would resolve on loopback.
pub fn static_cluster(name: &str, port: u16) -> Value {
    json!({
        "name": name,
        "type": "STATIC",
        "connect_timeout": "10s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": "127.0.0.1", "port_value": port }
            } } }] }],
        },
    })
}

/// Write JSON to `path` via a temp file and rename (Envoy's file watcher sees a move, as with
/// Kubernetes ConfigMaps).
pub fn write_atomic(path: &Path, v: &Value) {
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(v).expect("serialize")).expect("write config");
    std::fs::rename(&tmp, path).expect("rename config");
}

/// `pluginConfig` as istiod passes it: compact JSON, object keys sorted, every number a double
/// (`600` becomes `600.0`; golang/protobuf `structpb` has only `number_value`).
pub fn istio_plugin_json(v: &Value) -> String {
    serde_json::to_string(&istio_normalize(v)).expect("serialize plugin config")
}

/// Sort keys (independent of serde_json's `preserve_order`) and turn integers into doubles.
pub fn istio_normalize(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                out.insert(k.clone(), istio_normalize(&m[k]));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(istio_normalize).collect()),
        Value::Number(n) if !n.is_f64() => n
            .as_f64()
            .and_then(Number::from_f64)
            .map(Value::Number)
            .unwrap_or_else(|| v.clone()),
        _ => v.clone(),
    }
}

/// Sort keys only (numbers kept as given).
pub fn istio_normalize_keys_only(v: &Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort();
            let mut out = Map::new();
            for k in keys {
                out.insert(k.clone(), istio_normalize_keys_only(&m[k]));
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.iter().map(istio_normalize_keys_only).collect()),
        _ => v.clone(),
    }
}

/// Merge `patch` into `base` (RFC 7386 JSON merge patch: `null` removes a key).
pub fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    b.remove(k);
                } else {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

/// An Istio-named cluster for an external issuer, as the demo's `--issuer` builds it: STRICT_DNS,
/// and for https TLS with SNI and SAN checks against `ca_bundle`.
pub fn external_issuer_cluster(issuer: &Url, ca_bundle: &str) -> Result<(String, Value), String> {
    let host = issuer
        .host_str()
        .ok_or("--issuer has no host")?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = issuer
        .port_or_known_default()
        .ok_or("--issuer has no port")?;
    let name = format!("outbound|{port}||{host}");
    let mut cluster = json!({
        "name": name,
        "type": "STRICT_DNS",
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": "10s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{ "lb_endpoints": [{ "endpoint": { "address": {
                "socket_address": { "address": host, "port_value": port }
            } } }] }],
        },
    });
    if issuer.scheme() == "https" {
        if !Path::new(ca_bundle).is_file() {
            return Err(format!(
                "{ca_bundle} is missing: install the ca-certificates package"
            ));
        }
        add_upstream_tls(&mut cluster, ca_bundle);
    }
    Ok((name, cluster))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_json_is_sorted_compact_with_doubles() {
        let v = json!({"z": 1, "a": {"y": [600, 1.5], "b": "s"}, "m": true});
        assert_eq!(
            istio_plugin_json(&v),
            r#"{"a":{"b":"s","y":[600.0,1.5]},"m":true,"z":1.0}"#
        );
    }

    #[test]
    fn merge_patch_replaces_and_removes() {
        let mut v = json!({"a": 1, "b": {"c": 2, "d": 3}});
        merge(&mut v, &json!({"a": null, "b": {"c": 5}, "e": [1]}));
        assert_eq!(v, json!({"b": {"c": 5, "d": 3}, "e": [1]}));
    }
}
