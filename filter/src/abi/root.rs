//! The root context: configuration, and one stream context per request.

use std::cell::RefCell;
use std::rc::Rc;

use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::ContextType;

use super::cache::IdpCache;
use super::stream::Stream;
use crate::config::Config;
use crate::flow::Gate;

/// The per-VM root context.
#[derive(Default)]
pub struct Root {
    gate: Option<Rc<Gate>>,
    cache: Option<Rc<RefCell<IdpCache>>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_configure(&mut self, _plugin_configuration_size: usize) -> bool {
        let bytes = self.get_plugin_configuration().unwrap_or_default();
        match Config::parse(&bytes, &|name| std::env::var(name).ok()) {
            Ok(config) => {
                log::info!(
                    "oidc-gate: configured for issuer {} via cluster {} ({} host patterns)",
                    config.issuer,
                    config.idp_cluster,
                    config.hosts.len()
                );
                self.cache = Some(Rc::new(RefCell::new(IdpCache::new(
                    &config.issuer,
                    &config.idp_cluster,
                ))));
                self.gate = Some(Rc::new(Gate::new(config)));
                true
            }
            Err(e) => {
                log::error!("oidc-gate: {e}");
                self.gate = None;
                false
            }
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        // Without a valid configuration every stream fails closed (Stream answers 500).
        Some(Box::new(Stream::new(
            context_id,
            self.gate.clone(),
            self.cache.clone(),
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}
