//! The CLI's side of the control API: requests with the token, errors as the API's message,
//! and waiting for operations with a progress bar.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use hyper::{Method, StatusCode};
use pgwarden_api::control::{Operation, OperationStatus};
use pgwarden_api::ApiError;
use serde::de::DeserializeOwned;

use crate::httpc::{self, Timeouts};

/// Every API call answers within this, except downloads, which must keep bytes coming.
const CALL_TIMEOUTS: Timeouts =
    Timeouts { connect: Duration::from_secs(5), exchange: Duration::from_secs(60) };

pub struct Client {
    /// `host:port` of the API.
    addr: String,
    token: Option<String>,
}

impl Client {
    /// `api` is `http://host:port`; the token comes from `PGWARDEN_TOKEN`, else `<data_dir>/token`.
    pub fn new(api: &str, data_dir: &Path) -> anyhow::Result<Self> {
        let addr = api
            .strip_prefix("http://")
            .ok_or_else(|| anyhow!("--api must look like http://127.0.0.1:9180, not {api:?}"))?
            .trim_end_matches('/')
            .to_owned();
        let token = std::env::var("PGWARDEN_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
            .or_else(|| std::fs::read_to_string(data_dir.join("token")).ok())
            .map(|t| t.trim().to_owned());
        Ok(Self { addr, token })
    }

    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<T> {
        let body = body.map(|b| b.to_string().into_bytes());
        let (status, bytes) =
            httpc::request(&self.addr, method, path, self.token.as_deref(), body, CALL_TIMEOUTS)
                .await
                .with_context(|| {
                    format!("is the control plane running at http://{}?", self.addr)
                })?;
        if status.is_success() {
            let bytes = if status == StatusCode::NO_CONTENT { &b"null"[..] } else { &bytes[..] };
            return serde_json::from_slice(bytes).context("unexpected answer from the control API");
        }
        match serde_json::from_slice::<ApiError>(&bytes) {
            Ok(e) if status == StatusCode::UNAUTHORIZED && self.token.is_none() => bail!(
                "{} (set PGWARDEN_TOKEN or pass --data-dir of the control plane)",
                e.error.message
            ),
            Ok(e) => bail!("{}", e.error.message),
            Err(_) => bail!("control API answered {status}"),
        }
    }

    /// Downloads `path` into `out` with a progress bar; checks the sha256 the API sends.
    /// Returns the size.
    pub async fn download(&self, path: &str, out: &Path) -> anyhow::Result<u64> {
        let tty = std::io::stderr().is_terminal();
        let mut last_shown = 0u64;
        let progress = |received: u64, total: Option<u64>| {
            if !tty || received - last_shown < 256 * 1024 && Some(received) != total {
                return;
            }
            last_shown = received;
            match total {
                Some(t) if t > 0 => {
                    let filled = (received * 30 / t) as usize;
                    eprint!(
                        "\rdownload [{}{}] {:3}%",
                        "#".repeat(filled),
                        " ".repeat(30 - filled),
                        received * 100 / t
                    );
                }
                _ => eprint!("\rdownload {received} bytes"),
            }
            let _ = std::io::stderr().flush();
        };
        let answer =
            httpc::download(&self.addr, path, self.token.as_deref(), out, CALL_TIMEOUTS, progress)
                .await?;
        if tty {
            eprintln!();
        }
        let headers = match answer {
            Ok(headers) => headers,
            Err((status, body)) => {
                let _ = std::fs::remove_file(out);
                match serde_json::from_slice::<ApiError>(&body) {
                    Ok(e) => bail!("{}", e.error.message),
                    Err(_) => bail!("control API answered {status}"),
                }
            }
        };
        let expected =
            headers.get("x-pgwarden-sha256").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let actual = crate::files::sha256_file(out)?;
        if expected.as_deref() != Some(actual.as_str()) {
            bail!("downloaded file does not match the backup's sha256 ({actual} vs {expected:?})");
        }
        Ok(std::fs::metadata(out)?.len())
    }

    /// Follows an operation to its end, drawing a progress bar on a terminal (a line per
    /// change of progress elsewhere; nothing with `--output json`).
    pub async fn wait(&self, mut op: Operation) -> anyhow::Result<Operation> {
        let quiet = output() == Output::Json;
        let bar = (!quiet && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(100);
            let style = indicatif::ProgressStyle::with_template("{msg} [{bar:30}] {pos:>3}%")
                .map(|s| s.progress_chars("#>-"))
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
            bar.set_style(style);
            bar.set_message(op.kind.clone());
            bar
        });
        let mut last = -1.0;
        loop {
            let percent = (op.progress.clamp(0.0, 1.0) * 100.0).round();
            match &bar {
                Some(bar) => bar.set_position(percent as u64),
                None if !quiet && op.progress != last => eprintln!("{} {percent:.0}%", op.kind),
                None => {}
            }
            last = op.progress;
            match op.status {
                OperationStatus::Succeeded => {
                    if let Some(bar) = &bar {
                        bar.finish();
                    }
                    return Ok(op);
                }
                OperationStatus::Failed => {
                    if let Some(bar) = &bar {
                        bar.abandon();
                    }
                    bail!("{} failed: {}", op.kind, op.error.unwrap_or_default());
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            op = self.call(Method::GET, &format!("/v1/operations/{}", op.id), None).await?;
        }
    }
}

/// How commands print their answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    /// Tables and sentences, progress bars on a terminal.
    #[default]
    Table,
    /// The API's JSON answer, alone on stdout (no progress bar).
    Json,
}

static OUTPUT: std::sync::OnceLock<Output> = std::sync::OnceLock::new();

/// Chooses how this process prints (once, at the start of a command).
pub fn set_output(output: Output) {
    let _ = OUTPUT.set(output);
}

fn output() -> Output {
    OUTPUT.get().copied().unwrap_or_default()
}

/// Prints `answer` as JSON with `--output json`, else runs `table`.
pub fn show<T: serde::Serialize>(answer: &T, table: impl FnOnce()) {
    match output() {
        Output::Json => match serde_json::to_string_pretty(answer) {
            Ok(json) => println!("{json}"),
            Err(e) => eprintln!("error: cannot print the answer as JSON: {e}"),
        },
        Output::Table => table(),
    }
}

/// Prints rows as a table with a header line.
pub fn print_table(headers: &[&str], rows: &[Vec<String>]) {
    let mut table = comfy_table::Table::new();
    table.load_preset(comfy_table::presets::UTF8_HORIZONTAL_ONLY).set_header(headers.to_vec());
    for row in rows {
        table.add_row(row.clone());
    }
    println!("{table}");
}
