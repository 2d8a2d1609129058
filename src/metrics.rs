//! Prometheus metrics for `/metrics` on the admin listener.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
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

/// What the audit writer reports for each group commit. Every request waits for its group, so
/// these say how much of a request's latency is the trail's, and what the disk's flush costs.
#[derive(Clone)]
pub struct AuditMetrics {
    /// Entries per committed group: the count is the number of commits, the sum the entries.
    group_entries: Histogram,
    /// How long a group stayed open after its first entry, for requests already on their way.
    group_wait: Histogram,
    /// From a closed group to its entries durable (or refused): the seal in the token, the
    /// insert, the commit.
    write: Histogram,
    /// Groups the store refused; each of their requests was answered 503.
    failed_groups: Counter,
}

impl AuditMetrics {
    fn new() -> Self {
        Self {
            group_entries: Histogram::new(exponential_buckets(1.0, 2.0, 10)),
            group_wait: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            write: Histogram::new(exponential_buckets(0.00005, 2.0, 16)),
            failed_groups: Counter::default(),
        }
    }

    /// One group: its size, how long it was held open, how long its write took and whether
    /// the store took it.
    pub fn group(&self, entries: usize, open: Duration, write: Duration, stored: bool) {
        self.group_wait.observe(open.as_secs_f64());
        self.write.observe(write.as_secs_f64());
        if stored {
            self.group_entries.observe(entries as f64);
        } else {
            self.failed_groups.inc();
        }
    }

    fn register(&self, registry: &mut Registry) {
        registry.register(
            "audit_group_entries",
            "Entries per committed audit group (count: commits, sum: entries)",
            self.group_entries.clone(),
        );
        registry.register(
            "audit_group_wait_seconds",
            "How long an audit group stayed open for requests on their way",
            self.group_wait.clone(),
        );
        registry.register(
            "audit_write_seconds",
            "Audit group write until durable: seal in the token, insert, commit",
            self.write.clone(),
        );
        registry.register(
            "audit_failed_groups",
            "Audit groups the store refused (their requests were answered 503)",
            self.failed_groups.clone(),
        );
    }
}

pub struct Metrics {
    registry: Registry,
    /// Handed to the audit writer at start.
    pub audit: AuditMetrics,
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
            Histogram::new(exponential_buckets(0.00005, 2.0, 16))
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
        let audit = AuditMetrics::new();
        audit.register(&mut registry);
        Self {
            registry,
            audit,
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
