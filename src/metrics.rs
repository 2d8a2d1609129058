//! Prometheus metrics for `/metrics` on the admin listener.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub operation: &'static str,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    pub operation: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendErrorLabel {
    pub kind: &'static str,
}

/// Which figure of the backend's derived-key cache.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DerivedLabel {
    pub what: &'static str,
}

pub struct Metrics {
    registry: Registry,
    /// Derived-key cache: `held` (keys in the device now), `capacity`, `derivations` (since
    /// start). Read from the backend at scrape time.
    pub derived_keys: Family<DerivedLabel, Gauge>,
    pub requests: Family<RequestLabels, Counter>,
    pub latency: Family<OperationLabel, Histogram>,
    pub backend_errors: Family<BackendErrorLabel, Counter>,
    pub backend_ready: Gauge,
    pub keys: Gauge,
    pub policy_reloads: Family<OutcomeLabel, Counter>,
    pub tls_reloads: Family<OutcomeLabel, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tillkey");
        let requests = Family::<RequestLabels, Counter>::default();
        // 50 us .. ~1.6 s: HSM operations live at the low end, stalls at the high end.
        let latency = Family::<OperationLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.00005, 2.0, 16,
            ))
        });
        let backend_errors = Family::<BackendErrorLabel, Counter>::default();
        let backend_ready = Gauge::default();
        let keys = Gauge::default();
        let policy_reloads = Family::<OutcomeLabel, Counter>::default();
        let tls_reloads = Family::<OutcomeLabel, Counter>::default();
        let derived_keys = Family::<DerivedLabel, Gauge>::default();
        registry.register(
            "derived_keys",
            "Derived-key cache of the backend: held, capacity, derivations since start",
            derived_keys.clone(),
        );
        registry.register(
            "tls_reloads",
            "TLS material reloads by outcome",
            tls_reloads.clone(),
        );
        registry.register(
            "requests",
            "API requests by operation and outcome",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "API request latency by operation",
            latency.clone(),
        );
        registry.register(
            "backend_errors",
            "Backend failures by kind (unavailable, failed)",
            backend_errors.clone(),
        );
        registry.register(
            "backend_ready",
            "1 while the key backend answers",
            backend_ready.clone(),
        );
        registry.register("keys", "Keys in the registry", keys.clone());
        registry.register(
            "policy_reloads",
            "Policy reloads by outcome",
            policy_reloads.clone(),
        );
        Self {
            registry,
            derived_keys,
            requests,
            latency,
            backend_errors,
            backend_ready,
            keys,
            policy_reloads,
            tls_reloads,
        }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        // Encoding into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
