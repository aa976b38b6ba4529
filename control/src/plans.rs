//! The plan catalogue (SPEC §3) and the PostgreSQL parameters each plan sets.

use pgwarden_api::control::Plan;

/// The built-in catalogue.
pub fn catalogue() -> Vec<Plan> {
    let mut plans = vec![Plan {
        name: "postgresql-sandbox".into(),
        nodes: 1,
        memory_mib: 256,
        max_connections: 30,
        daily_backups: 0,
        weekly_backups: 0,
        monthly_backups: 0,
        manual_backups_max: 0,
        pitr: false,
    }];
    for (memory_mib, max_connections) in [(512, 60), (1024, 80), (2048, 120)] {
        plans.push(Plan {
            name: format!("postgresql-starter-{memory_mib}"),
            nodes: 1,
            memory_mib,
            max_connections,
            daily_backups: 7,
            weekly_backups: 4,
            monthly_backups: 0,
            manual_backups_max: 10,
            pitr: true,
        });
    }
    for (memory_mib, max_connections) in [(512, 60), (1024, 80), (2048, 120)] {
        plans.push(Plan {
            name: format!("postgresql-business-{memory_mib}"),
            nodes: 2,
            memory_mib,
            max_connections,
            daily_backups: 7,
            weekly_backups: 8,
            monthly_backups: 12,
            manual_backups_max: 50,
            pitr: true,
        });
    }
    plans
}

pub fn find(name: &str) -> Option<Plan> {
    catalogue().into_iter().find(|p| p.name == name)
}

/// Server connections the proxies' transaction pool of a database on `plan` may open: the
/// plan's `max_connections` less a reserve for session clients (`DATABASE_URL`) and the platform
/// (health checks, backups, WAL archiving, replication), a quarter and at least 10.
pub fn pool_size(plan: &str) -> u32 {
    let max = find(plan).map_or(30, |p| p.max_connections);
    max.saturating_sub((max / 4).max(10)).max(1)
}

/// What the proxies allow a database on `plan` unless it was set otherwise: ten clients per
/// connection its nodes take, and twice as many new connections per second (enough for every
/// client of a pool to reconnect at once, not for a storm to fork the node's machine away).
pub fn limits(
    plan: &str,
    set: pgwarden_api::control::SetLimits,
) -> pgwarden_api::control::ClientLimits {
    let max = find(plan).map_or(30, |p| p.max_connections);
    pgwarden_api::control::ClientLimits {
        client_connections: set.client_connections.unwrap_or(max * 10),
        connections_per_second: set.connections_per_second.unwrap_or(max * 2),
    }
}

pub fn names() -> Vec<String> {
    catalogue().into_iter().map(|p| p.name).collect()
}

/// `postgresql.conf` settings derived from the plan's memory and connection limit:
/// `shared_buffers` 25% of memory, `effective_cache_size` 75%, `work_mem` a quarter of memory
/// shared by every connection (at least 2 MiB), `maintenance_work_mem` 1/16 (at least 16 MiB).
pub fn parameters(plan: &Plan) -> Vec<(&'static str, String)> {
    let mib = plan.memory_mib;
    let work_mem_kib = (mib * 1024 / (4 * u64::from(plan.max_connections))).max(2048);
    vec![
        ("max_connections", plan.max_connections.to_string()),
        ("shared_buffers", format!("{}MB", mib / 4)),
        ("effective_cache_size", format!("{}MB", mib * 3 / 4)),
        ("work_mem", format!("{work_mem_kib}kB")),
        ("maintenance_work_mem", format!("{}MB", (mib / 16).max(16))),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogue_matches_the_spec() {
        let names = names();
        assert_eq!(names.len(), 7);
        let sandbox = find("postgresql-sandbox").unwrap();
        assert_eq!((sandbox.nodes, sandbox.memory_mib, sandbox.max_connections), (1, 256, 30));
        assert!(!sandbox.pitr && sandbox.manual_backups_max == 0);
        let starter = find("postgresql-starter-2048").unwrap();
        assert_eq!((starter.nodes, starter.max_connections, starter.weekly_backups), (1, 120, 4));
        let business = find("postgresql-business-1024").unwrap();
        assert_eq!((business.nodes, business.max_connections), (2, 80));
        assert_eq!((business.monthly_backups, business.manual_backups_max), (12, 50));
        assert!(find("postgresql-business-4096").is_none());
    }

    #[test]
    fn parameters_follow_memory() {
        let p = parameters(&find("postgresql-business-1024").unwrap());
        let get = |k: &str| p.iter().find(|(n, _)| *n == k).unwrap().1.clone();
        assert_eq!(get("shared_buffers"), "256MB");
        assert_eq!(get("effective_cache_size"), "768MB");
        assert_eq!(get("max_connections"), "80");
        assert_eq!(pool_size("postgresql-business-1024"), 60, "80 less a quarter");
        assert_eq!(pool_size("postgresql-sandbox"), 20, "30 less the minimum reserve of 10");
        assert_eq!(get("work_mem"), "3276kB");
        assert_eq!(get("maintenance_work_mem"), "64MB");
        let defaults = limits("postgresql-sandbox", Default::default());
        assert_eq!((defaults.client_connections, defaults.connections_per_second), (300, 60));
        let set = pgwarden_api::control::SetLimits {
            client_connections: None,
            connections_per_second: Some(5),
        };
        let mixed = limits("postgresql-business-2048", set);
        assert_eq!((mixed.client_connections, mixed.connections_per_second), (1_200, 5));
        let sandbox = parameters(&find("postgresql-sandbox").unwrap());
        assert!(sandbox.contains(&("maintenance_work_mem", "16MB".into())));
    }
}
