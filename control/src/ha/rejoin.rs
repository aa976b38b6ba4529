//! A fenced former primary comes back as a standby of the current primary: pg_rewind, or a
//! fresh copy when the rewind cannot be done.

use tracing::warn;

use super::HaError;
use crate::failure::Reportable;
use crate::lifecycle::standby::add_standby_only;
use crate::nodes::config::slot_name;
use crate::nodes::{roles, NodeSpec, Nodes, Upstream};
use crate::routing::Routing;
use crate::state::{DatabaseRecord, NodeRecord, Records, StoreError};

/// Brings `fenced` back as a standby of `id`'s current primary.
pub async fn rejoin(
    records: &Records,
    nodes: &Nodes,
    routing: &Routing,
    id: &str,
    fenced: &NodeRecord,
) {
    let Ok(Some(db)) = records.store.database(id).await else { return };
    let Some(primary) = db.primary().cloned() else { return };
    let Some(node) = db.nodes.iter().find(|n| n.name == fenced.name && n.fenced).cloned() else {
        return;
    };
    let (spec, source) = (NodeSpec::of(&node), NodeSpec::of(&primary));
    let result = async {
        ensure_slot(nodes, &source, &slot_name(&node.name)).await?;
        // pg_rewind reads the source's timeline from its control file, which a recently
        // promoted primary updates only at its next checkpoint.
        checkpoint(nodes, &source).await?;
        let config = nodes.config(&db, &node, None)?;
        // Across hosts pg_rewind reaches the primary over TLS as a role allowed in for this
        // rewind only; on one host, through the primary's socket.
        let remote = spec.agent.is_some() || source.agent.is_some();
        let login =
            if remote { Some(open_rewind_login(nodes, &source, &primary).await?) } else { None };
        let driver = &nodes.driver;
        let rewound = async {
            driver.fence(&spec).await?;
            match &login {
                Some(login) => driver.rewind_from(&spec, login).await?,
                None => driver.rewind(&spec, &source).await?,
            }
            driver.configure(&spec, &config).await?;
            driver.make_standby(&spec).await?;
            driver.start(&spec).await
        }
        .await;
        if remote {
            close_rewind_login(nodes, &source).await;
        }
        match rewound {
            Ok(()) => Ok("pg_rewind"),
            Err(e) => {
                warn!(database = id, node = %node.name, error = %e, "pg_rewind failed; copying the primary afresh");
                fresh_copy(records, nodes, &db, &node, &spec).await.map(|()| "a fresh base backup")
            }
        }
    }
    .await;
    match result {
        Ok(how) => {
            let recorded = records
                .update(id, |db| {
                    if let Some(n) = db.nodes.iter_mut().find(|n| n.name == node.name) {
                        n.fenced = false;
                    }
                    Ok::<_, StoreError>(())
                })
                .await;
            if let Err(e) = recorded {
                return records
                    .event(id, "rejoin_failed", format!("cannot record the rejoin: {e}"))
                    .await;
            }
            let _ = routing.publish(&records.store).await;
            records
                .event(
                    id,
                    "rejoined",
                    format!("{} rejoined as a standby of {} ({how})", node.name, primary.name),
                )
                .await;
        }
        Err(e) => {
            records
                .event(
                    id,
                    "rejoin_failed",
                    format!("{} could not rejoin yet: {}", node.name, e.sentence()),
                )
                .await
        }
    }
}

async fn fresh_copy(
    records: &Records,
    nodes: &Nodes,
    db: &DatabaseRecord,
    node: &NodeRecord,
    spec: &NodeSpec,
) -> Result<(), HaError> {
    let (driver, spec2) = (&nodes.driver, &spec);
    driver.destroy(spec2).await?;
    // The slot was made for the rewind; pg_basebackup creates its own.
    if let Some(primary) = db.primary() {
        drop_slot(nodes, &NodeSpec::of(primary), &slot_name(&node.name)).await;
    }
    Ok(add_standby_only(records, nodes, db, node).await?)
}

/// Lets the rewind role log in on the primary with a password made for this rewind; the
/// source the node's agent runs pg_rewind from.
async fn open_rewind_login(
    nodes: &Nodes,
    source: &NodeSpec,
    primary: &NodeRecord,
) -> Result<Upstream, HaError> {
    let password = crate::secrets::generate_password();
    let admin = nodes.session(source, "postgres").await?;
    roles::open_rewind_login(&admin, &password).await?;
    Ok(Upstream {
        host: primary.host.clone(),
        port: primary.port,
        user: roles::REWIND_ROLE.to_owned(),
        password,
        slot: String::new(),
    })
}

/// Ends the rewind role's login (logged, not fatal: it has no password it could use).
async fn close_rewind_login(nodes: &Nodes, source: &NodeSpec) {
    let closed = async {
        let admin = nodes.session(source, "postgres").await?;
        roles::close_rewind_login(&admin).await?;
        Ok::<_, HaError>(())
    };
    if let Err(e) = closed.await {
        warn!(error = %e, "cannot end the rewind role's login");
    }
}

async fn ensure_slot(nodes: &Nodes, primary: &NodeSpec, slot: &str) -> Result<(), HaError> {
    let admin = nodes.session(primary, "postgres").await?;
    admin
        .execute(
            "SELECT pg_create_physical_replication_slot($1) WHERE NOT EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1)",
            &[&slot],
        )
        .await?;
    Ok(())
}

async fn checkpoint(nodes: &Nodes, node: &NodeSpec) -> Result<(), HaError> {
    let admin = nodes.session(node, "postgres").await?;
    Ok(admin.batch_execute("CHECKPOINT").await?)
}

async fn drop_slot(nodes: &Nodes, primary: &NodeSpec, slot: &str) {
    if let Ok(admin) = nodes.session(primary, "postgres").await {
        let _ = admin
            .execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1", &[&slot])
            .await;
    }
}
