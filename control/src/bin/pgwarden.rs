//! `pgwarden`: control plane and CLI.

use clap::Parser;

fn main() {
    let cli = pgwarden_control::cli::Cli::parse();
    let server = matches!(
        cli.command,
        pgwarden_control::cli::Command::Serve(_) | pgwarden_control::cli::Command::Up(_)
    );
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
    if let Err(e) = runtime.block_on(pgwarden_control::cli::run(cli)) {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
