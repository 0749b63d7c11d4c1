//! Counters and histograms through proxy-wasm metrics (Envoy `/stats`, Prometheus output).

use std::cell::RefCell;
use std::collections::HashMap;

use proxy_wasm::hostcalls;
use proxy_wasm::types::MetricType;

use crate::flow::Event;

/// Every metric name starts with this.
pub const PREFIX: &str = "oidc_gate_";

/// Lazily defined metrics of one VM.
#[derive(Default)]
pub struct Metrics {
    ids: RefCell<HashMap<String, u32>>,
}

fn slug(reason: &str) -> String {
    reason
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

impl Metrics {
    fn id(&self, name: &str, kind: MetricType) -> Option<u32> {
        if let Some(id) = self.ids.borrow().get(name) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(kind, name).ok()?;
        self.ids.borrow_mut().insert(name.to_string(), id);
        Some(id)
    }

    /// Whether a counter whose name starts with `name` was counted in this VM (tests).
    #[cfg(test)]
    pub fn counted(&self, name: &str) -> bool {
        let full = format!("{PREFIX}{name}");
        self.ids.borrow().keys().any(|k| k.starts_with(&full))
    }

    /// Adds one to a counter.
    pub fn count(&self, name: &str) {
        let full = format!("{PREFIX}{name}");
        if let Some(id) = self.id(&full, MetricType::Counter) {
            let _ = hostcalls::increment_metric(id, 1);
        }
    }

    /// Records a value in a histogram.
    pub fn record(&self, name: &str, value: u64) {
        let full = format!("{PREFIX}{name}");
        if let Some(id) = self.id(&full, MetricType::Histogram) {
            let _ = hostcalls::record_metric(id, value);
        }
    }

    /// Counts an engine event.
    pub fn event(&self, event: Event) {
        match event {
            Event::LoginStarted => self.count("logins_started"),
            Event::LoginCompleted => self.count("logins_completed"),
            Event::LoginFailed(r) => self.count(&format!("logins_failed_{}", slug(r))),
            Event::RefreshCompleted => self.count("refreshes_completed"),
            Event::RefreshFailed(r) => self.count(&format!("refreshes_failed_{}", slug(r))),
            Event::BearerAccepted => self.count("bearer_accepted"),
            Event::BearerRejected(r) => self.count(&format!("bearer_rejected_{}", slug(r))),
            Event::SessionRejected(r) => self.count(&format!("sessions_rejected_{}", slug(r))),
            Event::Logout {
                dropped_an_ended_login,
            } => {
                self.count("logouts");
                if dropped_an_ended_login {
                    self.count("ended_logins_dropped");
                }
            }
        }
    }
}
