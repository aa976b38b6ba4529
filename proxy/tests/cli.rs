//! The `pgwarden-proxy` binary's command line: bad invocations and configurations end with a
//! clear message and a non-zero exit, before anything listens.

use std::process::Command;

fn proxy(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgwarden-proxy")).args(args).output().expect("run");
    (out.status.success(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn usage_and_bad_configs_are_reported() {
    let (ok, err) = proxy(&[]);
    assert!(!ok && err.contains("usage: pgwarden-proxy --config"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, "admin_token = \"t\"\nlisten = \"127.0.0.1:0\"\nmax_clients = 3\n")
        .unwrap();
    let (ok, err) = proxy(&["--config", path.to_str().unwrap()]);
    assert!(!ok && err.contains("max_clients"), "{err}");
    std::fs::write(&path, "listen = \"127.0.0.1:0\"\n").unwrap();
    let (ok, err) = proxy(&["--config", path.to_str().unwrap()]);
    assert!(!ok && err.contains("admin_token"), "{err}");
    let (ok, err) = proxy(&["--config", "/nonexistent/proxy.toml"]);
    assert!(!ok && err.contains("/nonexistent/proxy.toml"), "{err}");
}
