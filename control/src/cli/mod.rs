//! The `pgwarden` command line's client commands, one for every API endpoint (`client.rs`
//! talks to the API). It depends on the API's wire types only; the server's own commands
//! (`serve`, `up`, `agent`...) and their arguments are `server::Command`, and the binary puts
//! the two together.

mod client;

pub use client::{print_table, show, Client, Output};

use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use hyper::Method;
use pgwarden_api::control::{
    Database, DatabaseOperation, EngineUpgrade, Env, Event, Plan, User, UserWithPassword,
};
use serde_json::json;

/// The client's commands, one for every API endpoint.
#[derive(Subcommand)]
pub enum Command {
    /// List the plans.
    Plans,
    /// The PostgreSQL builds installed.
    Engines,
    /// Provision a database.
    Create {
        name: String,
        #[arg(long, default_value = "postgresql-sandbox")]
        plan: String,
        /// PostgreSQL version (see `pgwarden engines`; default: the newest of the default major).
        #[arg(long)]
        version: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// List databases.
    List,
    /// Show one database.
    Show { id: String },
    /// Destroy a database: nodes, routes and backups.
    Destroy {
        id: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Change a database's plan (rolling on business plans: new connections wait, none fail).
    Plan {
        id: String,
        plan: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Upgrade a database to a newer build: of its major (rolling on business plans), or of a
    /// newer major (online, onto a new cluster through logical replication).
    Upgrade {
        id: String,
        version: String,
        /// Major upgrades: longest hold of new connections for the swap (default 10000).
        #[arg(long)]
        hold_budget_ms: Option<u64>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Print DATABASE_URL and PGWARDEN_POSTGRESQL_URL.
    Env { id: String },
    /// Force TLS on or off.
    Tls {
        id: String,
        #[arg(long, value_parser = ["on", "off"])]
        force: String,
    },
    /// Set what the proxies allow a database; an option left out goes back to the plan's.
    Limits {
        id: String,
        /// Clients at once.
        #[arg(long)]
        clients: Option<u32>,
        /// New connections per second.
        #[arg(long)]
        per_second: Option<u32>,
    },
    /// Manage users.
    Users {
        #[command(subcommand)]
        command: UsersCommand,
    },
    /// A database's history.
    Events { id: String },
    /// A database's latest stats: every node's CPU, memory, swap, sessions and lag; sizes,
    /// last backup, PITR window.
    Stats { id: String },
    /// Planned primary change, without data loss; new connections wait instead of failing.
    Switchover {
        id: String,
        /// Standby to promote (default: the first one).
        #[arg(long)]
        target: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
    /// Forced primary change, even when the primary looks healthy.
    Failover {
        id: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// The point-in-time recovery window.
    Pitr { id: String },
    /// Rebuild the database as it was at a time (RFC 3339, UTC), then route to it.
    Restore {
        id: String,
        #[arg(long)]
        at: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Logical backups (pg_dump custom format).
    Backups {
        #[command(subcommand)]
        command: BackupsCommand,
    },
}

#[derive(Subcommand)]
pub enum BackupsCommand {
    List {
        id: String,
    },
    /// Take a manual backup now.
    Create {
        id: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Download a backup (checked against its sha256) into a file.
    Download {
        id: String,
        backup: String,
        /// File to write (default: <id>-<backup>.dump).
        #[arg(short = 'o', long = "file")]
        file: Option<PathBuf>,
    },
    Delete {
        id: String,
        backup: String,
    },
    /// Set the hour (UTC) of the daily backup.
    Schedule {
        id: String,
        #[arg(long, value_parser = clap::value_parser!(u8).range(0..24))]
        hour: u8,
    },
}

#[derive(Subcommand)]
pub enum UsersCommand {
    List {
        id: String,
    },
    Create {
        id: String,
        name: String,
        #[arg(long)]
        read_only: bool,
    },
    Delete {
        id: String,
        name: String,
    },
    ResetPassword {
        id: String,
        name: String,
    },
}

/// Runs a client command (the server's own commands are `server::Command`).
pub async fn run(
    api: &str,
    data_dir: &std::path::Path,
    output: Output,
    command: Command,
) -> anyhow::Result<()> {
    client::set_output(output);
    let client = || Client::new(api, data_dir);
    match command {
        Command::Plans => {
            let plans: Vec<Plan> = client()?.call(Method::GET, "/v1/plans", None).await?;
            let rows = plans
                .iter()
                .map(|p| {
                    vec![
                        p.name.clone(),
                        p.nodes.to_string(),
                        format!("{} MiB", p.memory_mib),
                        p.max_connections.to_string(),
                        format!(
                            "{}d/{}w/{}m",
                            p.daily_backups, p.weekly_backups, p.monthly_backups
                        ),
                        p.manual_backups_max.to_string(),
                        if p.pitr { "yes" } else { "no" }.into(),
                    ]
                })
                .collect::<Vec<_>>();
            show(&plans, || {
                print_table(
                    &["PLAN", "NODES", "MEMORY", "MAX CONN", "BACKUPS KEPT", "MANUAL MAX", "PITR"],
                    &rows,
                );
            });
            Ok(())
        }
        Command::Engines => {
            let engines: Vec<pgwarden_api::control::Engine> =
                client()?.call(Method::GET, "/v1/engines", None).await?;
            let rows = engines
                .iter()
                .cloned()
                .map(|e| {
                    let default = if e.default { "yes" } else { "" };
                    vec![e.version, e.major.to_string(), e.dir, default.into()]
                })
                .collect::<Vec<_>>();
            show(&engines, || {
                print_table(&["VERSION", "MAJOR", "DIRECTORY", "DEFAULT"], &rows);
            });
            Ok(())
        }
        Command::Create { name, plan, version, no_wait } => {
            let client = client()?;
            let mut body = json!({"name": name, "plan": plan});
            if let Some(version) = version {
                body["version"] = version.into();
            }
            let answer: DatabaseOperation =
                client.call(Method::POST, "/v1/databases", Some(body)).await?;
            let id = answer.database.id.clone();
            if no_wait {
                show(&answer, || println!("{id} provisioning (operation {})", answer.operation.id));
                return Ok(());
            }
            client.wait(answer.operation).await?;
            let db: Database =
                client.call(Method::GET, &format!("/v1/databases/{id}"), None).await?;
            show(&db, || print_databases(std::slice::from_ref(&db)));
            Ok(())
        }
        Command::List => {
            let dbs: Vec<Database> = client()?.call(Method::GET, "/v1/databases", None).await?;
            show(&dbs, || print_databases(&dbs));
            Ok(())
        }
        Command::Show { id } => {
            let db: Database =
                client()?.call(Method::GET, &format!("/v1/databases/{id}"), None).await?;
            show(&db, || {
                print_databases(std::slice::from_ref(&db));
                println!();
                let rows = db
                    .nodes
                    .iter()
                    .map(|n| {
                        vec![
                            n.name.clone(),
                            format!("{:?}", n.role).to_lowercase(),
                            n.status.clone(),
                            format!("{}:{}", n.host, n.port),
                            n.lag_bytes.to_string(),
                            n.version.clone(),
                        ]
                    })
                    .collect::<Vec<_>>();
                print_table(&["NODE", "ROLE", "STATUS", "ADDRESS", "LAG BYTES", "VERSION"], &rows);
                println!("\nDATABASE_URL={}", db.database_url);
            });
            Ok(())
        }
        Command::Destroy { id, no_wait } => {
            let client = client()?;
            let answer: DatabaseOperation =
                client.call(Method::DELETE, &format!("/v1/databases/{id}"), None).await?;
            if !no_wait {
                let op = client.wait(answer.operation).await?;
                show(&op, || println!("{id} destroyed"));
            } else {
                show(&answer, || println!("{id}: destroying (operation {})", answer.operation.id));
            }
            Ok(())
        }
        Command::Upgrade { id, version, hold_budget_ms, no_wait } => {
            let client = client()?;
            let path = format!("/v1/databases/{id}");
            let body = serde_json::to_value(EngineUpgrade { version, hold_budget_ms })?;
            let answer: DatabaseOperation =
                client.call(Method::POST, &format!("{path}/engine-upgrade"), Some(body)).await?;
            if no_wait {
                show(&answer, || {
                    println!("{id}: engine upgrade started (operation {})", answer.operation.id)
                });
                return Ok(());
            }
            client.wait(answer.operation).await?;
            let db: Database = client.call(Method::GET, &path, None).await?;
            show(&db, || print_databases(std::slice::from_ref(&db)));
            Ok(())
        }
        Command::Plan { id, plan, no_wait } => {
            let client = client()?;
            let path = format!("/v1/databases/{id}");
            let answer: DatabaseOperation =
                client.call(Method::PATCH, &path, Some(json!({ "plan": plan }))).await?;
            if no_wait {
                show(&answer, || {
                    println!("{id}: plan change started (operation {})", answer.operation.id)
                });
                return Ok(());
            }
            client.wait(answer.operation).await?;
            let db: Database = client.call(Method::GET, &path, None).await?;
            show(&db, || print_databases(std::slice::from_ref(&db)));
            Ok(())
        }
        Command::Env { id } => {
            let env: Env =
                client()?.call(Method::GET, &format!("/v1/databases/{id}/env"), None).await?;
            show(&env, || {
                println!("DATABASE_URL={}", env.database_url);
                if let Some(pooled) = &env.database_pool_url {
                    println!("DATABASE_POOL_URL={pooled}");
                }
                println!("PGWARDEN_POSTGRESQL_URL={}", env.pgwarden_postgresql_url);
            });
            Ok(())
        }
        Command::Tls { id, force } => {
            let db: Database = client()?
                .call(
                    Method::PUT,
                    &format!("/v1/databases/{id}/tls"),
                    Some(json!({"force": force == "on"})),
                )
                .await?;
            show(&db, || {
                println!("{}: force TLS {}", db.id, if db.tls.force { "on" } else { "off" });
            });
            Ok(())
        }
        Command::Limits { id, clients, per_second } => {
            let body = json!({"client_connections": clients, "connections_per_second": per_second});
            let db: Database = client()?
                .call(Method::PUT, &format!("/v1/databases/{id}/limits"), Some(body))
                .await?;
            show(&db, || {
                let l = db.limits;
                println!(
                    "{}: {} clients at once, {} new connections per second",
                    db.id, l.client_connections, l.connections_per_second
                );
            });
            Ok(())
        }
        Command::Users { command } => users(client()?, command).await,
        Command::Backups { command } => backups(client()?, command).await,
        Command::Pitr { id } => {
            let window: pgwarden_api::control::PitrWindow =
                client()?.call(Method::GET, &format!("/v1/databases/{id}/pitr"), None).await?;
            show(&window, || {
                println!("{id}: recoverable from {} to {}", window.earliest, window.latest);
            });
            Ok(())
        }
        Command::Restore { id, at, no_wait } => {
            let body = json!({ "target_time": at });
            let path = format!("/v1/databases/{id}/restore");
            primary_change(client()?, &path, Some(body), no_wait).await
        }
        Command::Switchover { id, target, no_wait } => {
            let body = json!({ "target": target });
            let path = format!("/v1/databases/{id}/switchover");
            primary_change(client()?, &path, Some(body), no_wait).await
        }
        Command::Failover { id, no_wait } => {
            primary_change(client()?, &format!("/v1/databases/{id}/failover"), None, no_wait).await
        }
        Command::Events { id } => {
            let events: Vec<Event> =
                client()?.call(Method::GET, &format!("/v1/databases/{id}/events"), None).await?;
            let rows = events
                .iter()
                .map(|e| vec![e.at.clone(), e.kind.clone(), e.message.clone()])
                .collect::<Vec<_>>();
            show(&events, || print_table(&["AT", "EVENT", "MESSAGE"], &rows));
            Ok(())
        }
        Command::Stats { id } => {
            let stats: pgwarden_api::control::Stats =
                client()?.call(Method::GET, &format!("/v1/databases/{id}/stats"), None).await?;
            show(&stats, || print_stats(&stats));
            Ok(())
        }
    }
}

/// `pgwarden stats`: a row per node, then the database's figures.
fn print_stats(stats: &pgwarden_api::control::Stats) {
    let mib = |b: Option<u64>| b.map_or("-".to_owned(), |b| format!("{:.0}", b as f64 / 1048576.0));
    let usage = |u: &pgwarden_api::control::Usage| {
        format!("{} / {} / {}", mib(u.current), mib(u.highest), mib(u.limit))
    };
    let rows: Vec<Vec<String>> = stats
        .nodes
        .iter()
        .map(|n| {
            vec![
                n.name.clone(),
                format!("{:?}", n.role).to_lowercase(),
                n.cpu_percent.map_or("-".into(), |c| format!("{c:.1}")),
                usage(&n.memory),
                usage(&n.swap),
                n.connections.as_ref().map_or("-".into(), |c| format!("{} / {}", c.open, c.max)),
                n.replication_lag
                    .as_ref()
                    .map_or("-".into(), |l| format!("{} B, {:.1} s", l.bytes, l.seconds)),
            ]
        })
        .collect();
    print_table(
        &["NODE", "ROLE", "CPU %", "MEMORY MiB (NOW/HIGHEST/LIMIT)", "SWAP MiB", "SESSIONS", "LAG"],
        &rows,
    );
    for node in &stats.nodes {
        if let Some(why) = &node.container.unlimited_reason {
            println!("{}: no memory limit: {why}", node.name);
        }
    }
    let disk = stats.size.disk.as_ref().map_or("-".into(), |d| {
        format!(
            "{} MiB (data {}, WAL {}, other {})",
            mib(Some(d.total)),
            mib(Some(d.data)),
            mib(Some(d.wal)),
            mib(Some(d.other))
        )
    });
    println!("size: {} MiB; on disk: {disk}", mib(stats.size.logical));
    let backup = stats.backups.last_backup_at.as_deref().unwrap_or("none");
    println!("last backup: {backup}");
    match &stats.pitr {
        Some(w) => println!("point-in-time recovery: {} to {}", w.earliest, w.latest),
        None => println!("point-in-time recovery: none"),
    }
    println!("sampled at {}", stats.sampled_at);
}

async fn primary_change(
    client: Client,
    path: &str,
    body: Option<serde_json::Value>,
    no_wait: bool,
) -> anyhow::Result<()> {
    let answer: DatabaseOperation = client.call(Method::POST, path, body).await?;
    let id = answer.database.id.clone();
    if no_wait {
        let op = &answer.operation;
        show(&answer, || println!("{id}: {} started (operation {})", op.kind, op.id));
        return Ok(());
    }
    client.wait(answer.operation).await?;
    let db: Database = client.call(Method::GET, &format!("/v1/databases/{id}"), None).await?;
    let primary = db.nodes.iter().find(|n| n.role == pgwarden_api::control::NodeRole::Primary);
    show(&db, || println!("{id}: primary is now {}", primary.map_or("?", |n| n.name.as_str())));
    Ok(())
}

async fn backups(client: Client, command: BackupsCommand) -> anyhow::Result<()> {
    use pgwarden_api::control::Backup;
    match command {
        BackupsCommand::List { id } => {
            let list: Vec<Backup> =
                client.call(Method::GET, &format!("/v1/databases/{id}/backups"), None).await?;
            let rows = list
                .iter()
                .map(|b| {
                    vec![
                        b.id.clone(),
                        format!("{:?}", b.kind).to_lowercase(),
                        format!("{:?}", b.status).to_lowercase(),
                        b.started_at.clone(),
                        b.size_bytes.to_string(),
                        b.node.clone().unwrap_or_default(),
                        b.error.clone().unwrap_or_default(),
                    ]
                })
                .collect::<Vec<_>>();
            show(&list, || {
                print_table(
                    &["BACKUP", "KIND", "STATUS", "STARTED", "BYTES", "FROM", "ERROR"],
                    &rows,
                );
            });
        }
        BackupsCommand::Create { id, no_wait } => {
            let answer: pgwarden_api::control::BackupOperation =
                client.call(Method::POST, &format!("/v1/databases/{id}/backups"), None).await?;
            if !no_wait {
                client.wait(answer.operation.clone()).await?;
            }
            // The backup as it ended (or as it started, with --no-wait).
            let list: Vec<Backup> = match no_wait {
                true => Vec::new(),
                false => {
                    client.call(Method::GET, &format!("/v1/databases/{id}/backups"), None).await?
                }
            };
            let backup = list
                .into_iter()
                .find(|b| b.id == answer.backup.id)
                .unwrap_or(answer.backup.clone());
            show(&backup, || println!("{id}: backup {}", answer.backup.id));
        }
        BackupsCommand::Download { id, backup, file } => {
            let out = file.unwrap_or_else(|| PathBuf::from(format!("{id}-{backup}.dump")));
            let size = client
                .download(&format!("/v1/databases/{id}/backups/{backup}/download"), &out)
                .await?;
            let answer = json!({"file": out, "bytes": size, "sha256_verified": true});
            show(&answer, || println!("{}: {size} bytes, sha256 verified", out.display()));
        }
        BackupsCommand::Delete { id, backup } => {
            let answer: serde_json::Value = client
                .call(Method::DELETE, &format!("/v1/databases/{id}/backups/{backup}"), None)
                .await?;
            show(&answer, || println!("backup {backup} deleted"));
        }
        BackupsCommand::Schedule { id, hour } => {
            let body = json!({ "hour_utc": hour });
            let answer: serde_json::Value = client
                .call(Method::PUT, &format!("/v1/databases/{id}/backup-schedule"), Some(body))
                .await?;
            show(&answer, || println!("{id}: daily backup at {hour:02}:00 UTC"));
        }
    }
    Ok(())
}

async fn users(client: Client, command: UsersCommand) -> anyhow::Result<()> {
    match command {
        UsersCommand::List { id } => {
            let users: Vec<User> =
                client.call(Method::GET, &format!("/v1/databases/{id}/users"), None).await?;
            let rows = users
                .iter()
                .map(|u| {
                    let access = if u.read_only { "read-only" } else { "read-write" };
                    vec![u.name.clone(), access.into(), if u.default { "yes" } else { "" }.into()]
                })
                .collect::<Vec<_>>();
            show(&users, || {
                print_table(&["USER", "ACCESS", "DEFAULT"], &rows);
            });
        }
        UsersCommand::Create { id, name, read_only } => {
            let body = json!({"name": name, "read_only": read_only});
            let user: UserWithPassword =
                client.call(Method::POST, &format!("/v1/databases/{id}/users"), Some(body)).await?;
            show(&user, || print_password(&user));
        }
        UsersCommand::Delete { id, name } => {
            let answer: serde_json::Value = client
                .call(Method::DELETE, &format!("/v1/databases/{id}/users/{name}"), None)
                .await?;
            show(&answer, || println!("user {name} deleted"));
        }
        UsersCommand::ResetPassword { id, name } => {
            let path = format!("/v1/databases/{id}/users/{name}/reset-password");
            let user: UserWithPassword = client.call(Method::POST, &path, None).await?;
            show(&user, || print_password(&user));
        }
    }
    Ok(())
}

fn print_password(user: &UserWithPassword) {
    println!("user:     {}", user.user.name);
    println!("password: {}   (shown once)", user.password);
    println!("url:      {}", user.database_url);
}

fn print_databases(dbs: &[Database]) {
    let rows = dbs
        .iter()
        .map(|d| {
            vec![
                "postgresql".into(),
                d.id.clone(),
                d.plan.clone(),
                format!("{:?}", d.status).to_lowercase(),
                d.nodes.len().to_string(),
                if d.tls.force { "forced" } else { "optional" }.into(),
            ]
        })
        .collect::<Vec<_>>();
    print_table(&["ADDON", "ID", "PLAN", "STATUS", "NODES", "TLS"], &rows);
}

/// Parses `host:port`.
pub fn split_host_port(addr: &str) -> anyhow::Result<(String, u16)> {
    let (host, port) =
        addr.rsplit_once(':').with_context(|| format!("{addr:?} is not host:port"))?;
    Ok((host.to_owned(), port.parse().with_context(|| format!("bad port in {addr:?}"))?))
}
