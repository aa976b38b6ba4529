//! The `pgwarden` command line: its arguments, and a client command for every API endpoint
//! (`client.rs` talks to the API). It depends on the API's wire types only; `serve` and `up`
//! are run by the `server` module, which the binary calls for those two commands.

mod client;

pub use client::{print_table, show, Client, Output};

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use hyper::Method;
use pgwarden_api::control::{
    Database, DatabaseOperation, EngineUpgrade, Env, Event, Plan, User, UserWithPassword,
};
use serde_json::json;

#[derive(Parser)]
#[command(name = "pgwarden", version, about = "Managed PostgreSQL: control plane and CLI")]
pub struct Cli {
    /// Control API address.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9180", env = "PGWARDEN_API")]
    pub api: String,
    /// Data dir of the control plane (state, token, nodes).
    #[arg(long, global = true, default_value = ".pgwarden", env = "PGWARDEN_DATA_DIR")]
    pub data_dir: PathBuf,
    /// `table` for people; `json` prints the API's JSON answer, for scripts.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the control API (nodes keep running when it stops).
    Serve(ServeArgs),
    /// Run the whole platform locally: control API, two proxies, one database.
    Up(UpArgs),
    /// Run the node agent of a database host (serves the control plane over mutual TLS).
    Agent(AgentArgs),
    /// Issue an agent's certificate from the platform CA in the data dir.
    AgentCert(AgentCertArgs),
    /// Create the data dir's secrets (API token, proxies' token, secret key, platform CA) if
    /// missing, without serving: control planes sharing one etcd copy them before they start.
    Init,
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

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:9180")]
    pub listen: SocketAddr,
    /// Admin address of a proxy to publish routes to (repeat for each proxy).
    #[arg(long = "proxy-admin")]
    pub proxy_admins: Vec<String>,
    /// File with the proxies' admin token.
    #[arg(long)]
    pub proxy_token_file: Option<PathBuf>,
    /// Where clients reach the proxies (host:port in every DATABASE_URL).
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub client_addr: String,
    /// Where clients reach the proxies' transaction pooling (DATABASE_POOL_URL); none without.
    #[arg(long)]
    pub client_pool_addr: Option<String>,
    /// Address (host:port) of a node agent whose host runs nodes (repeat for each host);
    /// without any, nodes run on this host.
    #[arg(long = "agent")]
    pub agents: Vec<String>,
    /// The agents' `--dir` (default /var/lib/pgwarden-agent): their nodes' directories are
    /// under `<dir>/nodes`.
    #[arg(long)]
    pub agent_root: Option<PathBuf>,
    /// Where backups and the WAL archive are kept (default `<data-dir>/backups`). Control
    /// planes sharing one etcd must all point it at storage they all mount (NFS, a shared
    /// volume): a new leader then has its predecessor's backups and archive.
    #[arg(long)]
    pub backup_dir: Option<PathBuf>,
    /// With `--etcd`, the state lives in etcd and of several control planes only the leader
    /// acts; the others stand by (their API answers 503). The lease is the leader's: how long
    /// a dead leader keeps the standbys waiting.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    #[command(flatten)]
    pub nodes: NodeArgs,
}

/// etcd, for control planes and agents on several hosts.
#[derive(clap::Args)]
pub struct EtcdArgs {
    /// etcd members' client URLs (comma-separated or repeated).
    #[arg(long = "etcd", value_delimiter = ',')]
    pub etcd: Vec<String>,
    /// Prefix of pgwarden's keys in etcd.
    #[arg(long, default_value = "pgwarden")]
    pub etcd_prefix: String,
    /// TTL of this process's lease in etcd (seconds). It must outlast an etcd leader
    /// election: 5 s with etcd's default timing; 3 s with `--heartbeat-interval 50
    /// --election-timeout 500` on a LAN.
    #[arg(long, default_value_t = 5)]
    pub lease_ttl_secs: u64,
    /// The address others know this process by (default: --listen).
    #[arg(long)]
    pub advertise: Option<String>,
}

#[derive(clap::Args)]
pub struct AgentArgs {
    /// Address the control plane reaches this agent on (mutual TLS).
    #[arg(long, default_value = "0.0.0.0:9190")]
    pub listen: SocketAddr,
    /// Where the nodes' directories go (`<dir>/nodes`; default /var/lib/pgwarden-agent).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Directory with `ca.crt`, `agent.crt` and `agent.key` (made by `pgwarden agent-cert`).
    #[arg(long)]
    pub tls_dir: PathBuf,
    /// OS user nodes run as when the agent runs as root.
    #[arg(long, default_value = "postgres")]
    pub node_user: String,
    /// With `--etcd`, the agent holds a lease there and kills this host's primaries when cut
    /// off from etcd longer than the lease allows (before a standby elsewhere may be promoted);
    /// `--advertise` must be the address the control planes know it by (their `--agent`).
    #[command(flatten)]
    pub etcd: EtcdArgs,
}

#[derive(clap::Args)]
pub struct AgentCertArgs {
    /// Names and addresses the control plane reaches the agent by (repeat).
    #[arg(long = "address", required = true)]
    pub addresses: Vec<String>,
    /// Directory to write `ca.crt`, `agent.crt` and `agent.key` (0600) to.
    #[arg(long)]
    pub out: PathBuf,
}

/// Where nodes run and how they are watched: the options `serve` and `up` share.
#[derive(clap::Args, Clone)]
pub struct NodeArgs {
    /// First port tried for nodes.
    #[arg(long, default_value_t = 15432)]
    pub first_node_port: u16,
    /// OS user nodes run as when pgwarden runs as root.
    #[arg(long, default_value = "postgres")]
    pub node_user: String,
    /// More PostgreSQL builds, one per subdirectory (`<dir>/<name>/bin`), beside Debian's.
    #[arg(long)]
    pub engines_dir: Option<PathBuf>,
    /// Seconds a cluster replaced by a major upgrade is kept, stopped, before it is removed.
    #[arg(long, default_value_t = 86_400)]
    pub rollback_window_secs: u64,
    /// Seconds between two samples of every node's stats (CPU, memory, sessions, sizes).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..))]
    pub stats_interval_secs: u64,
    /// Hours of stats history kept (charts, `/stats/history`).
    #[arg(long, default_value_t = 168, value_parser = clap::value_parser!(u64).range(1..))]
    pub stats_retention_hours: u64,
    #[command(flatten)]
    pub health: HealthArgs,
}

/// Health checks and failover.
#[derive(clap::Args, Clone)]
pub struct HealthArgs {
    /// Milliseconds between two checks of a primary.
    #[arg(long, default_value_t = 500)]
    pub health_interval_ms: u64,
    /// Failed checks in a row before the primary is declared dead.
    #[arg(long, default_value_t = 3)]
    pub health_failures: u32,
    /// A standby that was not synchronous is promoted only if it lagged at most this much.
    #[arg(long, default_value_t = 0)]
    pub max_failover_lag_bytes: u64,
}

#[derive(clap::Args)]
pub struct UpArgs {
    #[arg(long, default_value = "postgresql-business-1024")]
    pub plan: String,
    #[arg(long, default_value = "my-app")]
    pub name: String,
    /// Control API address.
    #[arg(long, default_value = "127.0.0.1:9180")]
    pub listen: SocketAddr,
    /// Client address of the proxies.
    #[arg(long, default_value = "127.0.0.1:6432")]
    pub client_listen: SocketAddr,
    /// Transaction-pooling address of the proxies (DATABASE_POOL_URL).
    #[arg(long, default_value = "127.0.0.1:6433")]
    pub client_pool_listen: SocketAddr,
    /// Admin addresses of the two proxies.
    #[arg(long, num_args = 2, default_values = ["127.0.0.1:9181", "127.0.0.1:9182"])]
    pub proxy_admin: Vec<SocketAddr>,
    #[command(flatten)]
    pub nodes: NodeArgs,
}

/// Runs a client command (`serve` and `up` are not: the binary gives them to `server`).
pub async fn run(
    api: &str,
    data_dir: &std::path::Path,
    output: Output,
    command: Command,
) -> anyhow::Result<()> {
    client::set_output(output);
    let client = || Client::new(api, data_dir);
    match command {
        Command::Serve(_)
        | Command::Up(_)
        | Command::Agent(_)
        | Command::AgentCert(_)
        | Command::Init => {
            anyhow::bail!("serve, up, agent, agent-cert and init are not client commands")
        }
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
