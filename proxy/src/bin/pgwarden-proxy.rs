//! `pgwarden-proxy --config proxy.toml`

use std::path::PathBuf;

use anyhow::{bail, Context};
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

fn main() -> anyhow::Result<()> {
    let config_path = parse_args()?;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let config = pgwarden_proxy::Config::load(&config_path)?;
    match pgwarden_proxy::open_files::raise_to_hard_limit() {
        Ok((before, after)) if before != after => {
            tracing::info!(?before, ?after, "raised the limit on open files")
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the limit on open files"),
    }
    let threads = match config.worker_threads {
        Some(threads) => threads,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // This thread's runtime accepts clients, serves the admin API and is one of the workers.
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (workers, worker_threads) =
        pgwarden_proxy::Workers::start(runtime.handle().clone(), threads - 1, config.pin_workers)
            .context("cannot start worker threads")?;
    let result = runtime.block_on(async {
        let listeners = pgwarden_proxy::Listeners::bind(&config).await?;
        let shutdown = CancellationToken::new();
        let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
        let on_signal = shutdown.clone();
        let parent_exited = stop_when_orphaned(config.parent_pid);
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                () = parent_exited => tracing::warn!("parent process exited; stopping"),
            }
            on_signal.cancel();
        });
        pgwarden_proxy::run_on(config, listeners, shutdown, workers).await
    });
    worker_threads.stop();
    result
}

/// Completes once `parent` (when set) is no longer this process's parent.
async fn stop_when_orphaned(parent: Option<u32>) {
    let Some(parent) = parent else {
        return std::future::pending().await;
    };
    let current = || rustix::process::getppid().map(|pid| pid.as_raw_nonzero().get() as u32);
    while current() == Some(parent) {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
}

fn parse_args() -> anyhow::Result<PathBuf> {
    let mut args = std::env::args().skip(1);
    match (args.next().as_deref(), args.next(), args.next()) {
        (Some("--config"), Some(path), None) => Ok(PathBuf::from(path)),
        (Some("--version"), None, None) => {
            println!("pgwarden-proxy {}", env!("CARGO_PKG_VERSION"));
            std::process::exit(0)
        }
        _ => bail!("usage: pgwarden-proxy --config <proxy.toml>"),
    }
}
