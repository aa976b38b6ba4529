//! `pgwarden`: control plane and CLI.

use clap::Parser;
use pgwarden_control::cli::{self, Cli, Command};
use pgwarden_control::server::up;

fn main() {
    let cli = Cli::parse();
    let server = matches!(cli.command, Command::Serve(_) | Command::Up(_));
    let default_level = if server { "info" } else { "warn" };
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
            Command::Serve(args) => up::serve_command(&cli.data_dir, args).await,
            Command::Up(args) => up::up(&cli.data_dir, args).await,
            Command::Agent(args) => up::agent_command(args).await,
            Command::AgentCert(args) => up::agent_cert_command(&cli.data_dir, &args),
            Command::Init => up::init_command(&cli.data_dir),
            command => cli::run(&cli.api, &cli.data_dir, cli.output, command).await,
        }
    });
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
