//! The control plane's metrics, named here only.

use prometheus::{Encoder, GaugeVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub epoch: IntGauge,
    operations: IntCounterVec,
    route_pushes: IntCounterVec,
    route_deltas: prometheus::IntCounter,
    failovers: IntCounterVec,
    replication_changes: IntCounterVec,
    wal_gaps: prometheus::IntCounter,
    /// The sampler's figures (`stats.rs`), by database and node.
    node_cpu: GaugeVec,
    node_memory: GaugeVec,
    node_swap: GaugeVec,
    node_connections: GaugeVec,
    node_lag_bytes: GaugeVec,
    node_lag_seconds: GaugeVec,
    database_size: GaugeVec,
    backup_age: GaugeVec,
    pitr_window: GaugeVec,
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
        let route_deltas = prometheus::IntCounter::new(
            "route_deltas_total",
            "Routing changes a proxy applied as what changed since the table it held",
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
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let vec = GaugeVec::new(Opts::new(name, help), labels).expect("metric");
            registry.register(Box::new(vec.clone())).expect("register");
            vec
        };
        let node = ["database", "node"];
        let node_value = ["database", "node", "value"];
        let node_cpu =
            gauge("node_cpu_percent", "CPU over the last sampling interval, % of one CPU", &node);
        let node_memory = gauge(
            "node_memory_bytes",
            "Memory of the node's container: current, highest since start, limit",
            &node_value,
        );
        let node_swap = gauge(
            "node_swap_bytes",
            "Swap of the node's container: current, highest since start, limit",
            &node_value,
        );
        let node_connections = gauge(
            "node_connections",
            "Client sessions open (open) and max_connections (max)",
            &node_value,
        );
        let node_lag_bytes =
            gauge("node_replication_lag_bytes", "WAL a standby has yet to replay", &node);
        let node_lag_seconds =
            gauge("node_replication_lag_seconds", "Age of a standby's last replayed commit", &node);
        let database_size = gauge(
            "database_size_bytes",
            "pg_database_size (logical) and the primary's files on disk (data, wal, other)",
            &["database", "kind"],
        );
        let backup_age = gauge(
            "database_last_backup_age_seconds",
            "Age of the last successful backup",
            &["database"],
        );
        let pitr_window = gauge(
            "database_pitr_window_seconds",
            "Length of the point-in-time recovery window",
            &["database"],
        );
        registry.register(Box::new(wal_gaps.clone())).expect("register");
        registry.register(Box::new(failovers.clone())).expect("register");
        registry.register(Box::new(replication_changes.clone())).expect("register");
        registry.register(Box::new(epoch.clone())).expect("register");
        registry.register(Box::new(operations.clone())).expect("register");
        registry.register(Box::new(route_pushes.clone())).expect("register");
        registry.register(Box::new(route_deltas.clone())).expect("register");
        Self {
            registry,
            epoch,
            operations,
            route_pushes,
            route_deltas,
            failovers,
            replication_changes,
            wal_gaps,
            node_cpu,
            node_memory,
            node_swap,
            node_connections,
            node_lag_bytes,
            node_lag_seconds,
            database_size,
            backup_age,
            pitr_window,
        }
    }

    /// Replaces the stats gauges with `all` (databases and nodes that are gone disappear).
    pub fn stats(&self, all: &[pgwarden_api::control::Stats]) {
        for vec in [
            &self.node_cpu,
            &self.node_memory,
            &self.node_swap,
            &self.node_connections,
            &self.node_lag_bytes,
            &self.node_lag_seconds,
            &self.database_size,
            &self.backup_age,
            &self.pitr_window,
        ] {
            vec.reset();
        }
        let set = |vec: &GaugeVec, labels: &[&str], value: Option<f64>| {
            if let Some(value) = value {
                vec.with_label_values(labels).set(value);
            }
        };
        let bytes = |v: Option<u64>| v.map(|v| v as f64);
        for stats in all {
            let db = stats.database.as_str();
            for node in &stats.nodes {
                let n = node.name.as_str();
                set(&self.node_cpu, &[db, n], node.cpu_percent);
                for (vec, usage) in
                    [(&self.node_memory, &node.memory), (&self.node_swap, &node.swap)]
                {
                    set(vec, &[db, n, "current"], bytes(usage.current));
                    set(vec, &[db, n, "highest"], bytes(usage.highest));
                    set(vec, &[db, n, "limit"], bytes(usage.limit));
                }
                if let Some(c) = &node.connections {
                    set(&self.node_connections, &[db, n, "open"], Some(c.open as f64));
                    set(&self.node_connections, &[db, n, "max"], Some(c.max as f64));
                }
                if let Some(lag) = &node.replication_lag {
                    set(&self.node_lag_bytes, &[db, n], Some(lag.bytes as f64));
                    set(&self.node_lag_seconds, &[db, n], Some(lag.seconds));
                }
            }
            set(&self.database_size, &[db, "logical"], bytes(stats.size.logical));
            if let Some(disk) = &stats.size.disk {
                for (kind, value) in [("data", disk.data), ("wal", disk.wal), ("other", disk.other)]
                {
                    set(&self.database_size, &[db, kind], Some(value as f64));
                }
            }
            set(&self.backup_age, &[db], bytes(stats.backups.last_backup_age_secs));
            let window = stats.pitr.as_ref().and_then(|w| {
                let parse = |t: &str| {
                    let rfc3339 = &time::format_description::well_known::Rfc3339;
                    time::OffsetDateTime::parse(t, rfc3339).ok()
                };
                Some((parse(&w.latest)? - parse(&w.earliest)?).as_seconds_f64())
            });
            set(&self.pitr_window, &[db], window);
        }
    }

    pub fn operation(&self, kind: &str, ok: bool) {
        self.operations.with_label_values(&[kind, if ok { "succeeded" } else { "failed" }]).inc();
    }

    pub fn route_push(&self, ok: bool) {
        self.route_pushes.with_label_values(&[if ok { "applied" } else { "failed" }]).inc();
    }

    pub fn route_delta(&self) {
        self.route_deltas.inc();
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
