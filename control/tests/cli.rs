//! The `pgwarden` binary's command line without a control plane: errors are clear, exits are
//! non-zero.

use std::process::Command;

fn pgwarden(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_pgwarden"))
        .args(args)
        .env_remove("PGWARDEN_TOKEN")
        .output()
        .expect("run");
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

#[test]
fn unreachable_api_and_bad_arguments_fail_clearly() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let api = format!("http://127.0.0.1:{port}");
    let (ok, _, err) = pgwarden(&["--api", &api, "list"]);
    assert!(!ok && err.contains("is the control plane running"), "{err}");
    let (ok, _, err) = pgwarden(&["--api", "127.0.0.1:9180", "list"]);
    assert!(!ok && err.contains("--api must look like"), "{err}");
    let (ok, _, err) = pgwarden(&["tls", "some-db", "--force", "maybe"]);
    assert!(!ok && err.contains("maybe"), "{err}");
    let (ok, out, _) = pgwarden(&["--help"]);
    assert!(ok);
    for command in
        ["serve", "up", "plans", "create", "list", "show", "destroy", "env", "tls", "users"]
    {
        assert!(out.contains(command), "help lists {command}: {out}");
    }
}
