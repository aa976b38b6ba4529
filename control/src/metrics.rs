//! The control plane's metrics, named here only.

use prometheus::{Encoder, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub epoch: IntGauge,
    operations: IntCounterVec,
    route_pushes: IntCounterVec,
    failovers: IntCounterVec,
    replication_changes: IntCounterVec,
    wal_gaps: prometheus::IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("pgwarden".into()), None).expect("prefix");
        let epoch = IntGauge::new("routing_epoch", "Epoch of the last routing table published")
            .expect("metric");
        let operations = IntCounterVec::new(
            Opts::new("operations_total", "Operations finished, by kind and result"),
            &["kind", "result"],
        )
        .expect("metric");
        let route_pushes = IntCounterVec::new(
            Opts::new("route_pushes_total", "Routing tables sent to proxies, by result"),
            &["result"],
        )
        .expect("metric");
        let failovers = IntCounterVec::new(
            Opts::new("failovers_total", "Primary changes attempted, by result"),
            &["result"],
        )
        .expect("metric");
        let replication_changes = IntCounterVec::new(
            Opts::new(
                "replication_mode_changes_total",
                "Switches between synchronous and asynchronous commits",
            ),
            &["mode"],
        )
        .expect("metric");
        let wal_gaps =
            prometheus::IntCounter::new("wal_gaps_total", "Missing WAL segments found in archives")
                .expect("metric");
        registry.register(Box::new(wal_gaps.clone())).expect("register");
        registry.register(Box::new(failovers.clone())).expect("register");
        registry.register(Box::new(replication_changes.clone())).expect("register");
        registry.register(Box::new(epoch.clone())).expect("register");
        registry.register(Box::new(operations.clone())).expect("register");
        registry.register(Box::new(route_pushes.clone())).expect("register");
        Self { registry, epoch, operations, route_pushes, failovers, replication_changes, wal_gaps }
    }

    pub fn operation(&self, kind: &str, ok: bool) {
        self.operations.with_label_values(&[kind, if ok { "succeeded" } else { "failed" }]).inc();
    }

    pub fn route_push(&self, ok: bool) {
        self.route_pushes.with_label_values(&[if ok { "applied" } else { "failed" }]).inc();
    }

    pub fn wal_gap(&self) {
        self.wal_gaps.inc();
    }

    pub fn failover(&self, ok: bool) {
        self.failovers
            .with_label_values(&[if ok { "promoted" } else { "refused_or_failed" }])
            .inc();
    }

    pub fn replication_mode(&self, synchronous: bool) {
        let mode = if synchronous { "synchronous" } else { "asynchronous" };
        self.replication_changes.with_label_values(&[mode]).inc();
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("encode");
        String::from_utf8(out).expect("utf-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
