//! Stats (SPEC §7): every node runs in a resource container (a cgroup) with its plan's memory as
//! the limit, and `GET /v1/databases/{id}/stats` shows true figures: memory a backend allocates,
//! sessions held open, data loaded; the limit follows a plan change; a node that runs out of
//! memory is contained and the event recorded. The same figures are gauges on `/metrics`.

use std::time::Duration;

use pgwarden_e2e::TestControl;
use pgwarden_e2e::{let_time_pass, wait_until};
use serde_json::{json, Value};
use tokio_postgres::NoTls;

const MIB: u64 = 1024 * 1024;

async fn stats(control: &TestControl, id: &str) -> Value {
    let r = control.request("GET", &format!("/v1/databases/{id}/stats"), None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

/// Waits (up to 30 s) for a sample that satisfies `ok`.
async fn wait_stats(
    control: &TestControl,
    id: &str,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    wait_until(what, Duration::from_secs(30), async || {
        let s = stats(control, id).await;
        if ok(&s) {
            Ok(s)
        } else {
            Err(format!("{s:#}"))
        }
    })
    .await
}

async fn history(control: &TestControl, id: &str, query: &str) -> pgwarden_e2e::HttpResponse {
    control.request("GET", &format!("/v1/databases/{id}/stats/history{query}"), None).await
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

/// Whether the nodes run in cgroups here (if not, the stats must say why, and there is no
/// limit to check).
fn contained(node: &Value) -> bool {
    if node["container"]["cgroup"].is_null() {
        let why = node["container"]["unlimited_reason"].as_str().expect("a reason");
        assert!(!why.is_empty());
        assert!(node["memory"]["limit"].is_null(), "{node}");
        println!("nodes run without cgroups here: {why}");
        return false;
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_show_the_container_sessions_and_sizes_and_follow_a_plan_change() {
    let control = TestControl::start_sampling(Duration::from_secs(1)).await;
    let (_, id, url) = control.create_routed_database("stats", "postgresql-sandbox").await;

    // A second sample gives the CPU over the interval between them.
    let first =
        wait_stats(&control, &id, "a CPU figure", |s| s["nodes"][0]["cpu_percent"].is_number())
            .await;
    let node = &first["nodes"][0];
    assert_eq!(node["role"], "primary", "{first}");
    for at in [&first["sampled_at"], &node["sampled_at"], &first["size"]["sampled_at"]] {
        assert!(at.as_str().is_some_and(|t| t.ends_with('Z')), "{first}");
    }
    let limited = contained(node);
    if limited {
        assert_eq!(u(&node["memory"]["limit"]), 256 * MIB, "the sandbox plan's memory: {node}");
        assert_eq!(u(&node["swap"]["limit"]), 256 * MIB, "as much swap as memory: {node}");
        assert!(u(&node["memory"]["current"]) > 0, "{node}");
    }
    assert_eq!(u(&node["connections"]["max"]), 30, "{node}");
    let before_memory = node["memory"]["current"].as_u64().unwrap_or(0);
    let before_size = u(&first["size"]["logical"]);
    let before_data = u(&first["size"]["disk"]["data"]);
    assert!(u(&first["size"]["disk"]["wal"]) >= 16 * MIB, "a WAL segment at least: {first}");
    assert!(first["pitr"].is_null(), "the sandbox plan has no PITR: {first}");

    // Five sessions held open through the proxy.
    let mut held = Vec::new();
    for _ in 0..5 {
        let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
        tokio::spawn(connection);
        held.push(client);
    }
    wait_stats(&control, &id, "5 open sessions", |s| u(&s["nodes"][0]["connections"]["open"]) >= 5)
        .await;

    // A backend holds 40 MiB (twice: the string, and the variable's copy) for a few seconds:
    // the container's memory rises, and its highest keeps it afterwards.
    if limited {
        let holder = held.pop().unwrap();
        let hold = tokio::spawn(async move {
            holder
                .batch_execute(
                    "DO $$ DECLARE big text := repeat('x', 40 * 1024 * 1024); \
                     BEGIN PERFORM pg_sleep(4); PERFORM length(big); END $$",
                )
                .await
        });
        let rise = before_memory + 35 * MIB;
        wait_stats(&control, &id, "memory to rise by 35 MiB", |s| {
            s["nodes"][0]["memory"]["current"].as_u64().is_some_and(|c| c >= rise)
        })
        .await;
        hold.await.unwrap().unwrap();
        let after = stats(&control, &id).await;
        assert!(u(&after["nodes"][0]["memory"]["highest"]) >= rise, "{after:#}");
    }

    // 100 MB loaded: the logical size and the data on disk grow by about as much.
    held[0]
        .batch_execute(
            "CREATE TABLE big AS SELECT i, repeat(md5(i::text), 10) AS pad \
             FROM generate_series(1, 300000) i",
        )
        .await
        .unwrap();
    let loaded = wait_stats(&control, &id, "sizes to grow by 80 MB", |s| {
        u(&s["size"]["logical"]) >= before_size + 80_000_000
            && u(&s["size"]["disk"]["data"]) >= before_data + 80_000_000
    })
    .await;
    let disk = &loaded["size"]["disk"];
    assert_eq!(
        u(&disk["total"]),
        u(&disk["data"]) + u(&disk["wal"]) + u(&disk["other"]),
        "{loaded}"
    );

    // The figures are gauges on /metrics, labelled by database and node.
    let metrics = control.request("GET", "/metrics", None).await.body;
    let name = loaded["nodes"][0]["name"].as_str().unwrap();
    let connections =
        format!("pgwarden_node_connections{{database=\"{id}\",node=\"{name}\",value=\"max\"}} 30");
    assert!(metrics.contains(&connections), "{metrics}");
    assert!(metrics
        .contains(&format!("pgwarden_database_size_bytes{{database=\"{id}\",kind=\"logical\"}}")));
    if limited {
        let limit = format!(
            "pgwarden_node_memory_bytes{{database=\"{id}\",node=\"{name}\",value=\"limit\"}} {}",
            256 * MIB
        );
        assert!(metrics.contains(&limit), "{metrics}");
    }
    drop(held);

    // A plan change moves the limit with the node's memory settings.
    let r = control
        .request(
            "PATCH",
            &format!("/v1/databases/{id}"),
            Some(json!({"plan": "postgresql-starter-512"})),
        )
        .await;
    assert_eq!(r.status, 202, "{}", r.body);
    let op = control.wait_operation(r.json()["operation"]["id"].as_str().unwrap()).await;
    assert_eq!(op["status"], "succeeded", "{op}");
    let changed = wait_stats(&control, &id, "the new plan's figures", |s| {
        s["nodes"][0]["connections"]["max"] == 60
            && (!limited || s["nodes"][0]["memory"]["limit"] == 512 * MIB)
    })
    .await;
    if limited {
        assert_eq!(u(&changed["nodes"][0]["swap"]["limit"]), 512 * MIB, "{changed}");
    }

    // The history has a point per second (the sampling interval here), the old plan's figures
    // then the new one's (that it survives a kill -9 of the control plane:
    // `control_up::kill_9_of_serve_keeps_databases_adopts_nodes_and_republishes_routes`).
    let check = |h: &Value| {
        let at = h["at"].as_array().unwrap();
        assert!(at.len() >= 5, "{h}");
        assert!(at.windows(2).all(|w| w[0].as_i64() < w[1].as_i64()), "{h}");
        let node = &h["nodes"][0];
        assert_eq!(node["connections_max"].as_array().unwrap().len(), at.len(), "{h}");
        let max: Vec<f64> =
            node["connections_max"].as_array().unwrap().iter().filter_map(Value::as_f64).collect();
        assert_eq!(max.first(), Some(&30.0), "{h}");
        assert_eq!(max.last(), Some(&60.0), "{h}");
        let sizes: Vec<f64> =
            h["size_logical"].as_array().unwrap().iter().filter_map(Value::as_f64).collect();
        assert!(sizes.last().unwrap() - sizes.first().unwrap() >= 80e6, "the load shows: {h}");
    };
    let r = history(&control, &id, "?step=1").await;
    assert_eq!(r.status, 200, "{}", r.body);
    check(&r.json());
    // Coarser steps average: fewer points.
    let coarse = history(&control, &id, "?step=3600").await.json();
    assert!(coarse["at"].as_array().unwrap().len() <= 2, "{coarse}");
    // A step longer than the range (even the largest number) gives at most one point.
    let huge = history(&control, &id, "?step=18446744073709551615").await;
    assert_eq!(huge.status, 200, "{}", huge.body);
    assert!(huge.json()["at"].as_array().unwrap().len() <= 1, "{}", huge.body);
    // Wrong queries get a 400 that says why.
    for (query, code) in [
        ("?since=yesterday", "invalid_query"),
        ("?since=2000-01-01T00:00:00Z&step=1", "too_many_points"),
        ("?since=2030-01-01T00:00:00Z&until=2029-01-01T00:00:00Z", "invalid_query"),
        ("?colour=red", "invalid_query"),
    ] {
        let r = history(&control, &id, query).await;
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert_eq!(r.json()["error"]["code"], code, "{query}: {}", r.body);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_runs_out_of_memory_is_contained_and_the_event_recorded() {
    let control = TestControl::start_sampling(Duration::from_secs(1)).await;
    let (_, id, url) = control.create_routed_database("hungry", "postgresql-sandbox").await;
    let first =
        wait_stats(&control, &id, "a sample", |s| s["nodes"][0]["memory"].is_object()).await;
    if !contained(&first["nodes"][0]) {
        return;
    }
    // 400 MiB in one backend, in a container of 256 MiB (and as much swap; this host may have
    // none): the kernel ends a process of the container, not of the host.
    let (client, connection) = tokio_postgres::connect(&url, NoTls).await.unwrap();
    tokio::spawn(connection);
    let hungry = client
        .batch_execute("SELECT length(repeat('x', 400 * 1024 * 1024)) FROM generate_series(1, 2)")
        .await;
    assert!(hungry.is_err(), "the backend must not survive using 400 MiB");

    control.wait_event(&id, "node_out_of_memory").await;
    // The node restarted its sessions and serves again; the host was never short of memory.
    wait_until("the node serving again", Duration::from_secs(30), async || {
        let (client, connection) =
            tokio_postgres::connect(&url, NoTls).await.map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        let row = client.query_one("SELECT 1", &[]).await.map_err(|e| e.to_string())?;
        assert_eq!(row.get::<_, i32>(0), 1);
        Ok(())
    })
    .await;
    let after = stats(&control, &id).await;
    assert!(u(&after["nodes"][0]["memory"]["highest"]) <= 256 * MIB, "{after:#}");
}

/// While nothing happens, the platform opens no PostgreSQL session on its nodes: health checks,
/// stats samples, verifier reads, the PITR window and its heartbeats all run on sessions it
/// keeps open (issue 26: a session per check and per sample kept a machine with hundreds of
/// databases busy doing nothing).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_platform_opens_no_session_on_its_nodes() {
    let control = TestControl::start_sampling(Duration::from_secs(1)).await;
    let (_, sandbox, _) = control.create_routed_database("quiet", "postgresql-sandbox").await;
    let (_, business, _) = control.create_routed_database("calm", "postgresql-business-512").await;
    control.wait_synchronous(&business, "synchronous replication").await;
    // The first base backup (a replication connection of its own) is behind us, and both
    // databases have been sampled.
    control.wait_event(&business, "base_backup").await;
    for id in [&sandbox, &business] {
        wait_stats(&control, id, "a sample", |s| s["nodes"][0]["memory"].is_object()).await;
    }
    let mut dbs = Vec::new();
    for id in [&sandbox, &business] {
        dbs.push(control.request("GET", &format!("/v1/databases/{id}"), None).await.json());
    }
    let nodes: usize = dbs.iter().map(|db| db["nodes"].as_array().unwrap().len()).sum();
    let sessions = || -> i64 {
        let sql = "SELECT sum(sessions) FROM pg_stat_database";
        let each = dbs.iter().flat_map(|db| control.sql_on_every_node(db, sql));
        each.map(|n| n.parse::<i64>().unwrap()).sum()
    };
    let before = sessions();
    // Time has to pass for the platform to do its rounds: 12 checks of the business primary,
    // 6 stats samples, 3 verifier reads, 6 heartbeats.
    let_time_pass(Duration::from_secs(6)).await;
    let after = sessions();
    // The sessions that read `before` (one per node) ended in between; nothing else did.
    assert_eq!(after - before, nodes as i64, "sessions opened in 6 idle seconds");
}
