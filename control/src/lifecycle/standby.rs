//! Standbys: copied from the primary over TLS, streaming, then made synchronous.

use std::time::Duration;

use super::LifecycleError;
use crate::failure::Failure;
use crate::nodes::config::{slot_name, REPLICATION_ROLE};
use crate::nodes::{NodeSpec, Nodes, Upstream};
use crate::state::{DatabaseRecord, NodeRecord, Records};
use crate::wait;

/// Copies the primary into `standby` over TLS, starts it streaming, then makes it the
/// synchronous standby.
pub async fn add_standby(
    records: &Records,
    nodes: &Nodes,
    db: &DatabaseRecord,
    standby: &NodeRecord,
) -> Result<(), LifecycleError> {
    add_standby_only(records, nodes, db, standby).await?;
    let primary = db.primary().cloned().ok_or_else(|| Failure::NoPrimary(db.id.clone()))?;
    let primary_spec = NodeSpec::of(&primary);
    let config = nodes.config(db, &primary, Some(&standby.name))?;
    let (driver, spec) = (&nodes.driver, &primary_spec);
    driver.configure(spec, &config).await?;
    driver.reload(spec).await?;
    wait_synchronous(nodes, &primary_spec, &standby.name).await?;
    records
        .event(
            &db.id,
            "replication_synchronous",
            format!("standby {} is synchronous", standby.name),
        )
        .await;
    Ok(())
}

/// Copies the primary into `standby` (pg_basebackup over TLS) and starts it streaming.
pub async fn add_standby_only(
    records: &Records,
    nodes: &Nodes,
    db: &DatabaseRecord,
    standby: &NodeRecord,
) -> Result<(), LifecycleError> {
    let primary = db.primary().cloned().ok_or_else(|| Failure::NoPrimary(db.id.clone()))?;
    let upstream = Upstream {
        host: primary.host.clone(),
        port: primary.port,
        user: REPLICATION_ROLE.into(),
        password: db.replication_password.clone(),
        slot: slot_name(&standby.name),
    };
    let config = nodes.config(db, standby, None)?;
    let (driver, spec) = (&nodes.driver, NodeSpec::of(standby));
    driver.init_standby(&spec, &config, &upstream).await?;
    driver.start(&spec).await?;
    records
        .event(
            &db.id,
            "node_started",
            format!("standby {} streaming from {}", standby.name, primary.name),
        )
        .await;
    Ok(())
}

async fn wait_synchronous(
    nodes: &Nodes,
    primary: &NodeSpec,
    standby: &str,
) -> Result<(), LifecycleError> {
    let admin = nodes.session(primary, "postgres").await?;
    let admin = &admin;
    let synchronous = wait::until(Duration::from_secs(60), wait::STEADY, || async move {
        let rows = admin
            .query(
                "SELECT sync_state FROM pg_stat_replication WHERE application_name = $1",
                &[&standby],
            )
            .await?;
        let sync = rows.first().is_some_and(|r| r.get::<_, String>(0) == "sync");
        Ok::<_, LifecycleError>(sync.then_some(()))
    });
    synchronous.await?.ok_or_else(|| LifecycleError::NotSynchronous(standby.to_owned()))
}
