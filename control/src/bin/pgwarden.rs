//! `pgwarden`: control plane and CLI.

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use pgwarden_control::cli::{self, Output};
use pgwarden_control::server::{self, up};

#[derive(Parser)]
#[command(name = "pgwarden", version, about = "Managed PostgreSQL: control plane and CLI")]
struct Cli {
    /// Control API address.
    #[arg(long, global = true, default_value = "http://127.0.0.1:9180", env = "PGWARDEN_API")]
    api: String,
    /// Data dir of the control plane (state, token, nodes).
    #[arg(long, global = true, default_value = ".pgwarden", env = "PGWARDEN_DATA_DIR")]
    data_dir: PathBuf,
    /// `table` for people; `json` prints the API's JSON answer, for scripts.
    #[arg(long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

/// The server's own commands, then the client's.
#[derive(Subcommand)]
enum Command {
    #[command(flatten)]
    Server(Box<server::Command>),
    #[command(flatten)]
    Client(cli::Command),
}

fn main() {
    let cli = Cli::parse();
    let serving = match &cli.command {
        Command::Server(command) => {
            matches!(**command, server::Command::Serve(_) | server::Command::Up(_))
        }
        Command::Client(_) => false,
    };
    let default_level = if serving { "info" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_level.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime =
        tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Server(command) => match *command {
                server::Command::Serve(args) => up::serve_command(&cli.data_dir, args).await,
                server::Command::Up(args) => up::up(&cli.data_dir, args).await,
                server::Command::Agent(args) => up::agent_command(args).await,
                server::Command::AgentCert(args) => up::agent_cert_command(&cli.data_dir, &args),
                server::Command::Init => up::init_command(&cli.data_dir),
            },
            Command::Client(command) => {
                cli::run(&cli.api, &cli.data_dir, cli.output, command).await
            }
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
