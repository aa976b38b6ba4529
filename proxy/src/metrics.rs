//! Every metric the proxy exports, named in this file only. Label values come from closed enums.

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// Why a pooled client is pinned to its server connection, as counted in
/// `pgwarden_proxy_pool_pins_total{reason}`: session state the pool cannot carry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pin {
    Set,
    Listen,
    PreparedStatement,
    AdvisoryLock,
    TemporaryTable,
    CursorWithHold,
    Load,
    FunctionCall,
}

impl Pin {
    const ALL: [Pin; 8] = [
        Self::Set,
        Self::Listen,
        Self::PreparedStatement,
        Self::AdvisoryLock,
        Self::TemporaryTable,
        Self::CursorWithHold,
        Self::Load,
        Self::FunctionCall,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::Set => "set",
            Self::Listen => "listen",
            Self::PreparedStatement => "prepared_statement",
            Self::AdvisoryLock => "advisory_lock",
            Self::TemporaryTable => "temporary_table",
            Self::CursorWithHold => "cursor_with_hold",
            Self::Load => "load",
            Self::FunctionCall => "function_call",
        }
    }
}

/// Why a client connection was refused or dropped before its session started.
#[derive(Clone, Copy, Debug)]
pub enum Rejection {
    TooManyClients,
    HandshakeTimeout,
    Malformed,
    UnknownDatabase,
    TlsRequired,
    TlsFailed,
    NoPrimary,
    ShuttingDown,
    ClientGone,
    HoldTimeout,
    NodeTimeout,
    BadPassword,
    NodeLogin,
    NodeTls,
    TooManyStarting,
    Evicted,
    /// A client of the pool address that cannot be pooled (no verifiers, replication...).
    NotPoolable,
    /// A database's own limits (`tenants.rs`).
    DatabaseClients,
    DatabaseRate,
}

impl Rejection {
    const ALL: [Rejection; 19] = [
        Self::TooManyClients,
        Self::HandshakeTimeout,
        Self::Malformed,
        Self::UnknownDatabase,
        Self::TlsRequired,
        Self::TlsFailed,
        Self::NoPrimary,
        Self::ShuttingDown,
        Self::ClientGone,
        Self::HoldTimeout,
        Self::NodeTimeout,
        Self::BadPassword,
        Self::NodeLogin,
        Self::NodeTls,
        Self::TooManyStarting,
        Self::Evicted,
        Self::NotPoolable,
        Self::DatabaseClients,
        Self::DatabaseRate,
    ];

    fn label(self) -> &'static str {
        match self {
            Self::TooManyClients => "too_many_clients",
            Self::HandshakeTimeout => "handshake_timeout",
            Self::Malformed => "malformed_startup",
            Self::UnknownDatabase => "unknown_database",
            Self::TlsRequired => "tls_required",
            Self::TlsFailed => "tls_failed",
            Self::NoPrimary => "no_primary",
            Self::ShuttingDown => "shutting_down",
            Self::ClientGone => "client_gone",
            Self::HoldTimeout => "hold_timeout",
            Self::BadPassword => "bad_password",
            Self::NodeLogin => "node_login_failed",
            Self::NodeTls => "node_tls_failed",
            Self::TooManyStarting => "too_many_starting_from_source",
            Self::Evicted => "evicted_while_starting",
            Self::NodeTimeout => "node_timeout",
            Self::NotPoolable => "not_poolable",
            Self::DatabaseClients => "database_client_limit",
            Self::DatabaseRate => "database_connection_rate",
        }
    }
}

#[derive(Clone, Copy, Debug)]
pub enum RouteUpdate {
    Applied,
    Stale,
    Invalid,
    Unauthorized,
}

#[derive(Clone, Copy, Debug)]
pub enum CancelResult {
    Forwarded,
    UnknownKey,
    Failed,
}

#[derive(Clone, Copy, Debug)]
pub enum Termination {
    PrimaryMoved,
    Shutdown,
}

pub struct Metrics {
    registry: Registry,
    pub client_connections: IntGauge,
    pub accepted: IntCounter,
    rejected: IntCounterVec,
    tls_handshakes: IntCounterVec,
    pub backend_connect_seconds: Histogram,
    pub bytes_from_clients: IntCounter,
    pub bytes_to_clients: IntCounter,
    pub epoch: IntGauge,
    /// 1 while the proxy, cut off from etcd, holds every database.
    pub fenced: IntGauge,
    route_updates: IntCounterVec,
    cancel_requests: IntCounterVec,
    terminated: IntCounterVec,
    role: IntGaugeVec,
    /// Transaction pooling: clients connected to the pool address.
    pub pooled_clients: IntGauge,
    /// Server connections the pools hold open (idle or running a transaction).
    pub pool_server_connections: IntGauge,
    /// Transactions waiting for a server connection.
    pub pool_waiting: IntGauge,
    /// How long transactions waited for a server connection.
    pub pool_wait_seconds: Histogram,
    /// Clients pinned to their server connection, by the session state that pinned them.
    pins: IntCounterVec,
    /// Batches run again after `cached plan must not change result type`.
    pub stale_plans_healed: IntCounter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("pgwarden_proxy".into()), None).expect("prefix");
        let bytes = IntCounterVec::new(
            Opts::new("bytes_total", "Bytes relayed, by direction"),
            &["direction"],
        )
        .expect("metric");
        let m = Self {
            client_connections: IntGauge::new("client_connections", "Client connections open")
                .expect("metric"),
            accepted: IntCounter::new("connections_accepted_total", "Client connections accepted")
                .expect("metric"),
            rejected: IntCounterVec::new(
                Opts::new("connections_rejected_total", "Client connections refused, by reason"),
                &["reason"],
            )
            .expect("metric"),
            tls_handshakes: IntCounterVec::new(
                Opts::new("tls_handshakes_total", "Client TLS handshakes, by result"),
                &["result"],
            )
            .expect("metric"),
            backend_connect_seconds: Histogram::with_opts(
                HistogramOpts::new("backend_connect_seconds", "Time to connect to a node").buckets(
                    vec![0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0],
                ),
            )
            .expect("metric"),
            bytes_from_clients: bytes.with_label_values(&["client_to_backend"]),
            bytes_to_clients: bytes.with_label_values(&["backend_to_client"]),
            epoch: IntGauge::new("epoch", "Epoch of the routing table in use").expect("metric"),
            fenced: IntGauge::new(
                "fenced",
                "1 while the proxy is cut off from etcd and holds every database",
            )
            .expect("metric"),
            route_updates: IntCounterVec::new(
                Opts::new("route_updates_total", "Routing table updates, by result"),
                &["result"],
            )
            .expect("metric"),
            cancel_requests: IntCounterVec::new(
                Opts::new("cancel_requests_total", "Cancel requests, by result"),
                &["result"],
            )
            .expect("metric"),
            terminated: IntCounterVec::new(
                Opts::new("sessions_terminated_total", "Sessions ended by the proxy, by reason"),
                &["reason"],
            )
            .expect("metric"),
            role: IntGaugeVec::new(Opts::new("role", "1 for the role this proxy has"), &["role"])
                .expect("metric"),
            pooled_clients: IntGauge::new(
                "pooled_client_connections",
                "Client connections in transaction pooling",
            )
            .expect("metric"),
            pool_server_connections: IntGauge::new(
                "pool_server_connections",
                "Server connections open for transaction pooling",
            )
            .expect("metric"),
            pool_waiting: IntGauge::new(
                "pool_waiting_transactions",
                "Transactions waiting for a pooled server connection",
            )
            .expect("metric"),
            pool_wait_seconds: Histogram::with_opts(
                HistogramOpts::new(
                    "pool_wait_seconds",
                    "Time a transaction waited for a pooled server connection",
                )
                .buckets(vec![0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0]),
            )
            .expect("metric"),
            pins: IntCounterVec::new(
                Opts::new(
                    "pool_pins_total",
                    "Pooled clients pinned to their server connection, by reason",
                ),
                &["reason"],
            )
            .expect("metric"),
            stale_plans_healed: IntCounter::new(
                "pool_stale_plans_healed_total",
                "Pooled batches run again on statements prepared anew after a stale plan",
            )
            .expect("metric"),
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.client_connections.clone())).expect("register");
        r.register(Box::new(m.accepted.clone())).expect("register");
        r.register(Box::new(m.rejected.clone())).expect("register");
        r.register(Box::new(m.tls_handshakes.clone())).expect("register");
        r.register(Box::new(m.backend_connect_seconds.clone())).expect("register");
        r.register(Box::new(bytes)).expect("register");
        r.register(Box::new(m.epoch.clone())).expect("register");
        r.register(Box::new(m.fenced.clone())).expect("register");
        r.register(Box::new(m.route_updates.clone())).expect("register");
        r.register(Box::new(m.cancel_requests.clone())).expect("register");
        r.register(Box::new(m.terminated.clone())).expect("register");
        r.register(Box::new(m.role.clone())).expect("register");
        r.register(Box::new(m.pooled_clients.clone())).expect("register");
        r.register(Box::new(m.pool_server_connections.clone())).expect("register");
        r.register(Box::new(m.pool_waiting.clone())).expect("register");
        r.register(Box::new(m.pool_wait_seconds.clone())).expect("register");
        r.register(Box::new(m.pins.clone())).expect("register");
        r.register(Box::new(m.stale_plans_healed.clone())).expect("register");
        for reason in Pin::ALL {
            m.pins.with_label_values(&[reason.label()]);
        }
        // Make every labelled series visible from the start, at zero.
        for reason in Rejection::ALL {
            m.rejected.with_label_values(&[reason.label()]);
        }
        for result in ["ok", "error"] {
            m.tls_handshakes.with_label_values(&[result]);
        }
        m.role.with_label_values(&["active"]).set(1);
        m.role.with_label_values(&["standby"]).set(0);
        m
    }

    pub fn set_role(&self, active: bool) {
        self.role.with_label_values(&["active"]).set(i64::from(active));
        self.role.with_label_values(&["standby"]).set(i64::from(!active));
    }

    pub fn rejected(&self, why: Rejection) {
        self.rejected.with_label_values(&[why.label()]).inc();
    }

    pub fn tls_handshake(&self, ok: bool) {
        self.tls_handshakes.with_label_values(&[if ok { "ok" } else { "error" }]).inc();
    }

    pub fn route_update(&self, result: RouteUpdate) {
        let label = match result {
            RouteUpdate::Applied => "applied",
            RouteUpdate::Stale => "stale_epoch",
            RouteUpdate::Invalid => "invalid",
            RouteUpdate::Unauthorized => "unauthorized",
        };
        self.route_updates.with_label_values(&[label]).inc();
    }

    pub fn cancel_request(&self, result: CancelResult) {
        let label = match result {
            CancelResult::Forwarded => "forwarded",
            CancelResult::UnknownKey => "unknown_key",
            CancelResult::Failed => "failed",
        };
        self.cancel_requests.with_label_values(&[label]).inc();
    }

    pub fn terminated(&self, why: Termination) {
        let label = match why {
            Termination::PrimaryMoved => "primary_moved",
            Termination::Shutdown => "shutdown",
        };
        self.terminated.with_label_values(&[label]).inc();
    }

    pub fn pinned(&self, reason: Pin) {
        self.pins.with_label_values(&[reason.label()]).inc();
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("encode");
        String::from_utf8(out).expect("utf-8")
    }
}

/// Counts one open client connection for as long as it lives.
pub struct ConnectionGauge(IntGauge);

impl ConnectionGauge {
    pub fn new(gauge: &IntGauge) -> Self {
        gauge.inc();
        Self(gauge.clone())
    }
}

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}
