//! Many databases on one machine: what the platform costs per database while they sit idle.
//!
//!   cargo build --release --workspace --bins && cargo bench --bench scale -- [N=100] [in_flight=50] [idle_secs=60] [settle_secs=30]
//!
//! `PGWARDEN_BIN=/path/to/pgwarden` runs another build (with its `pgwarden-proxy` beside it).
//!
//! Runs the real `pgwarden up` (release build, its own data dir under the temp dir, nodes from
//! port 20000 up) and creates N databases through the API, `in_flight` creates at a time: four
//! sandbox databases for each business one (N = 1 000: 800 + 200), beside the business database
//! `up` creates itself. It reports how long each create took to answer, how long until all were
//! `running`, then, after `settle_secs` (first samples, backups, the checkpoints the creates
//! caused), over `idle_secs` of nothing but the platform: the whole machine's CPU, processes forked per second (each new PostgreSQL session is one),
//! the control plane's and the proxies' CPU and memory, PostgreSQL's memory (PSS) per database,
//! disk per database, how fast `GET /v1/databases` and a database's stats answer, the events
//! that say a primary was thought dead, and at the end how long Ctrl-C takes to stop it all.
//! Every process it started is stopped and its data dir removed, passed or not.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pgwarden_e2e::{
    free_port, http_request_within, node_data_dirs, stop_immediately, until_blocking_every,
    workspace_bin,
};
use serde_json::Value;

/// First port of the nodes: below the kernel's ephemeral range, above well-known services.
const FIRST_NODE_PORT: u16 = 20_000;

struct Platform {
    child: Child,
    dir: tempfile::TempDir,
    api: SocketAddr,
    token: String,
}

impl Platform {
    fn data(&self) -> PathBuf {
        self.dir.path().join("pw")
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, Value, Duration) {
        let started = Instant::now();
        let wait = Duration::from_secs(120);
        match http_request_within(self.api, method, path, Some(&self.token), body, wait) {
            Ok(answer) => {
                let took = started.elapsed();
                let json = serde_json::from_str(&answer.body).unwrap_or(Value::Null);
                (answer.status, json, took)
            }
            Err(e) => (0, Value::String(e.to_string()), started.elapsed()),
        }
    }
}

impl Drop for Platform {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let data = self.data().to_string_lossy().into_owned();
        for (pid, cmdline) in processes() {
            if cmdline.contains("pgwarden-proxy") && cmdline.contains(&data) {
                let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
            }
        }
        for node in node_data_dirs(&self.data()) {
            stop_immediately(&node);
        }
    }
}

/// Every process: pid and command line.
fn processes() -> Vec<(u32, String)> {
    let mut all = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        all.push((pid, String::from_utf8_lossy(&cmdline).replace('\0', " ")));
    }
    all
}

fn up() -> Platform {
    let dir = tempfile::Builder::new().prefix("pgwarden-scale-").tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("chmod");
    let api: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().expect("addr");
    let stderr = std::fs::File::create(dir.path().join("up.stderr")).expect("stderr file");
    // PGWARDEN_BIN: another build (its pgwarden-proxy beside it), for a before/after.
    let bin =
        std::env::var_os("PGWARDEN_BIN").map_or_else(|| workspace_bin("pgwarden"), PathBuf::from);
    let mut child = Command::new(bin)
        .arg("--data-dir")
        .arg(dir.path().join("pw"))
        .args(["up", "--listen", &api.to_string()])
        .args(["--client-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--client-pool-listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--proxy-admin", &format!("127.0.0.1:{}", free_port())])
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--first-node-port", &FIRST_NODE_PORT.to_string()])
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("pgwarden up");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut platform = Platform { child, dir, api, token: String::new() };
    loop {
        match rx.recv_timeout(Duration::from_secs(300)) {
            Ok(line) if line.contains("Control API:") => break,
            Ok(_) => {}
            Err(_) => panic!("pgwarden up printed no summary; see its up.stderr"),
        }
    }
    platform.token =
        std::fs::read_to_string(platform.data().join("token")).expect("token").trim().to_owned();
    platform
}

/// CPU time (user + system) of the whole machine and of the processes that are not idle, in
/// clock ticks, and the number of processes forked since boot.
struct MachineTimes {
    busy: u64,
    total: u64,
    forks: u64,
}

fn machine_times() -> MachineTimes {
    let stat = std::fs::read_to_string("/proc/stat").expect("/proc/stat");
    let cpu: Vec<u64> = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .expect("cpu line")
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = cpu.iter().take(8).sum();
    let idle = cpu[3] + cpu[4];
    let forks = stat
        .lines()
        .find_map(|l| l.strip_prefix("processes "))
        .and_then(|v| v.trim().parse().ok())
        .expect("processes line");
    MachineTimes { busy: total - idle, total, forks }
}

/// Clock ticks (user + system) a process used so far.
fn process_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let field = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // utime and stime are fields 14 and 15 of stat(5); `fields` starts at field 3.
    field(11) + field(12)
}

/// Clock ticks used so far by every process, summed by what it is: a PostgreSQL process by
/// its title (`checkpointer`, `walsender`, `idle` for a kept session...), any other by its
/// program's name.
fn ticks_by_kind() -> HashMap<String, u64> {
    let mut by_kind: HashMap<String, u64> = HashMap::new();
    for (pid, cmdline) in processes() {
        let kind = match cmdline.strip_prefix("postgres: ") {
            Some(title) => {
                // A node's titles start with its cluster name ("name: checkpointer").
                let title = match title.split_once(": ") {
                    Some((_, rest)) if !title.starts_with("walsender") => rest,
                    _ => title,
                };
                const BACKGROUND: [&str; 10] = [
                    "checkpointer",
                    "background writer",
                    "walwriter",
                    "autovacuum launcher",
                    "autovacuum worker",
                    "logical replication launcher",
                    "walsender",
                    "walreceiver",
                    "startup",
                    "archiver",
                ];
                match BACKGROUND.iter().find(|b| title.starts_with(*b)) {
                    Some(background) => format!("postgres {background}"),
                    // "user database host state": the platform's kept sessions are the
                    // superuser's on the local socket.
                    None => {
                        let words: Vec<&str> = title.split_whitespace().collect();
                        let user = words.first().copied().unwrap_or_default();
                        format!("postgres session of {user}")
                    }
                }
            }
            None => {
                let program = cmdline.split_whitespace().next().unwrap_or_default();
                let name = program.rsplit('/').next().unwrap_or_default();
                match name {
                    "postgres" => "postgres postmaster".to_owned(),
                    "" => "kernel threads".to_owned(),
                    name => name.to_owned(),
                }
            }
        };
        *by_kind.entry(kind).or_default() += process_ticks(pid);
    }
    by_kind
}

/// A `key: value kB` line of a /proc file, in bytes.
fn proc_kb(path: &str, key: &str) -> u64 {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The uid of the OS user `name`.
fn uid_of(name: &str) -> Option<u32> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.first() == Some(&name)).then(|| f.get(2)?.parse().ok()).flatten()
    })
}

/// Pids of the processes owned by `uid`.
fn processes_of(uid: u32) -> Vec<u32> {
    processes()
        .into_iter()
        .map(|(pid, _)| pid)
        .filter(|pid| {
            let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|v| v.split_whitespace().next()?.parse::<u32>().ok())
                == Some(uid)
        })
        .collect()
}

/// Bytes under `dir` (as `du -sb`).
fn disk_bytes(dir: &Path) -> u64 {
    let out = Command::new("du").arg("-sb").arg(dir).output().expect("du");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v.get(((v.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.0}", d.as_secs_f64() * 1000.0)
}

/// Creates `n` databases, `in_flight` at a time; returns each create's answer time and the
/// ids created.
fn create_all(platform: &Platform, n: usize, in_flight: usize) -> (Vec<Duration>, Vec<String>) {
    let next = AtomicUsize::new(0);
    let answers = Mutex::new(Vec::new());
    let ids = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..in_flight.min(n) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return;
                }
                let (name, plan) = if i % 5 == 4 {
                    (format!("biz-{i:04}"), "postgresql-business-512")
                } else {
                    (format!("sb-{i:04}"), "postgresql-sandbox")
                };
                let body = format!(r#"{{"name":"{name}","plan":"{plan}"}}"#);
                let (status, json, took) = platform.call("POST", "/v1/databases", Some(&body));
                assert!(status == 202 || status == 201, "create {name}: {status} {json}");
                answers.lock().unwrap().push(took);
                let id = json["database"]["id"].as_str().or(json["id"].as_str());
                ids.lock().unwrap().push(id.expect("id in the answer").to_owned());
            });
        }
    });
    (answers.into_inner().unwrap(), ids.into_inner().unwrap())
}

/// Waits until every database is `running` or `failed` (at most `within`); returns the count
/// of each status, last seen.
fn wait_all_running(platform: &Platform, within: Duration) -> HashMap<String, usize> {
    let counts = || {
        let (status, list, _) = platform.call("GET", "/v1/databases", None);
        let mut counts: HashMap<String, usize> = HashMap::new();
        for db in list.as_array().into_iter().flatten() {
            *counts.entry(db["status"].as_str().unwrap_or("?").to_owned()).or_default() += 1;
        }
        (status == 200 && counts.keys().all(|s| s == "running" || s == "failed"), counts)
    };
    let mut last = HashMap::new();
    let _ = until_blocking_every(within, Duration::from_secs(2), || {
        let settled;
        (settled, last) = counts();
        if settled {
            Ok(())
        } else {
            Err(format!("{last:?}"))
        }
    });
    last
}

fn main() {
    let args: Vec<u64> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let n = args.first().copied().unwrap_or(100) as usize;
    let in_flight = args.get(1).copied().unwrap_or(50) as usize;
    let idle = Duration::from_secs(args.get(2).copied().unwrap_or(60));
    let settle = Duration::from_secs(args.get(3).copied().unwrap_or(30));
    let ticks_per_sec = 100.0; // USER_HZ on Linux
    let node_uid = uid_of("postgres").expect("the postgres OS user");

    let started = Instant::now();
    let platform = up();
    let pid = platform.child.id();
    let rss_start = proc_kb(&format!("/proc/{pid}/status"), "VmRSS:");
    eprintln!(
        "up in {:.1} s; control plane RSS {:.1} MiB",
        started.elapsed().as_secs_f64(),
        mib(rss_start)
    );

    let created = Instant::now();
    let (answers, ids) = create_all(&platform, n, in_flight);
    let answered = created.elapsed();
    let counts = wait_all_running(&platform, Duration::from_secs(60 * 60));
    let all_running = created.elapsed();
    let failed = counts.get("failed").copied().unwrap_or(0);
    eprintln!("created {n} in {:.1} s: {counts:?}", all_running.as_secs_f64());

    // Settle (first samples, first backups, checkpoints), then measure the idle platform.
    std::thread::sleep(settle);
    let proxies: Vec<u32> = {
        let data = platform.data().to_string_lossy().into_owned();
        processes()
            .into_iter()
            .filter(|(_, c)| c.contains("pgwarden-proxy") && c.contains(&data))
            .map(|(p, _)| p)
            .collect()
    };
    // Read outside the window: it opens a session on every node itself.
    let sessions0 = sessions_total(&platform);
    let kinds0 = ticks_by_kind();
    let m0 = machine_times();
    let cp0 = process_ticks(pid);
    let px0: u64 = proxies.iter().map(|p| process_ticks(*p)).sum();
    let mut list_times = Vec::new();
    let mut stats_times = Vec::new();
    let window = Instant::now();
    while window.elapsed() < idle {
        let (_, _, took) = platform.call("GET", "/v1/databases", None);
        list_times.push(took);
        if let Some(id) = ids.get(list_times.len() % ids.len().max(1)) {
            let (_, _, took) = platform.call("GET", &format!("/v1/databases/{id}/stats"), None);
            stats_times.push(took);
        }
        std::thread::sleep(Duration::from_secs(5));
    }
    let secs = window.elapsed().as_secs_f64();
    let m1 = machine_times();
    let kinds1 = ticks_by_kind();
    let cp1 = process_ticks(pid);
    let px1: u64 = proxies.iter().map(|p| process_ticks(*p)).sum();
    let sessions1 = sessions_total(&platform);
    // The first read's own sessions ended in the window.
    let own = node_data_dirs(&platform.data()).len() as i64;
    let cores = (m1.busy - m0.busy) as f64 / (m1.total - m0.total) as f64 * 2.0;
    let forks = (m1.forks - m0.forks) as f64 / secs;
    let cp_cpu = (cp1 - cp0) as f64 / ticks_per_sec / secs * 100.0;
    let px_cpu = (px1 - px0) as f64 / ticks_per_sec / secs * 100.0;
    let rss = proc_kb(&format!("/proc/{pid}/status"), "VmRSS:");
    let proxy_rss: u64 =
        proxies.iter().map(|p| proc_kb(&format!("/proc/{p}/status"), "VmRSS:")).sum();
    let pg = processes_of(node_uid);
    let pss: u64 = pg.iter().map(|p| proc_kb(&format!("/proc/{p}/smaps_rollup"), "Pss:")).sum();
    let available = proc_kb("/proc/meminfo", "MemAvailable:");
    let databases = n + 1;
    let disk = disk_bytes(&platform.data());

    // Events that say a primary was thought dead, over the whole run.
    let mut suspicious: HashMap<String, usize> = HashMap::new();
    let (_, list, _) = platform.call("GET", "/v1/databases", None);
    for db in list.as_array().into_iter().flatten() {
        let Some(id) = db["id"].as_str() else { continue };
        let (_, events, _) = platform.call("GET", &format!("/v1/databases/{id}/events"), None);
        for e in events.as_array().into_iter().flatten() {
            let kind = e["kind"].as_str().unwrap_or_default();
            if ["primary_unreachable", "failover", "failover_refused", "rejoin_failed"]
                .contains(&kind)
            {
                *suspicious.entry(kind.to_owned()).or_default() += 1;
                eprintln!("{id}: {} {kind}: {}", e["at"], e["message"]);
            }
        }
    }

    let stopping = Instant::now();
    let mut platform = platform;
    let _ = Command::new("kill").args(["-INT", &pid.to_string()]).status();
    let exited = || match platform.child.try_wait() {
        Ok(Some(_)) => Ok(stopping.elapsed()),
        _ => Err("running".to_owned()),
    };
    let stopped =
        until_blocking_every(Duration::from_secs(600), Duration::from_millis(100), exited).ok();

    println!("| figure | N = {n} ({} sandbox + {} business, + up's own) |", n - n / 5, n / 5);
    println!("|---|---:|");
    println!("| creates in flight | {in_flight} |");
    println!(
        "| `POST /v1/databases` answer, p50 / p99 / max (ms) | {} / {} / {} |",
        ms(percentile(answers.clone(), 0.5)),
        ms(percentile(answers.clone(), 0.99)),
        ms(percentile(answers, 1.0))
    );
    println!("| all creates answered (s) | {:.1} |", answered.as_secs_f64());
    println!(
        "| all running (s); databases per second | {:.1}; {:.2} |",
        all_running.as_secs_f64(),
        n as f64 / all_running.as_secs_f64()
    );
    println!("| failed provisions | {failed} |");
    println!("| idle window (s) | {secs:.0} |");
    println!("| whole machine busy, idle platform (cores of 2) | {cores:.3} |");
    println!("| processes forked per second | {forks:.1} |");
    println!(
        "| new PostgreSQL sessions per second (`pg_stat_database.sessions`, all nodes) | {} |",
        match (sessions0, sessions1) {
            (Some(a), Some(b)) => format!("{:.1}", (b - a - own) as f64 / secs),
            _ => "-".into(),
        }
    );
    println!("| control plane CPU (% of a core) | {cp_cpu:.1} |");
    println!(
        "| control plane RSS (MiB); per database (KiB) | {:.1}; {:.0} |",
        mib(rss),
        (rss.saturating_sub(rss_start)) as f64 / 1024.0 / databases as f64
    );
    println!("| proxies CPU (% of a core); RSS (MiB) | {px_cpu:.1}; {:.1} |", mib(proxy_rss));
    println!(
        "| PostgreSQL processes; PSS (MiB); per database (MiB) | {}; {:.0}; {:.1} |",
        pg.len(),
        mib(pss),
        mib(pss) / databases as f64
    );
    println!("| memory available (GiB) | {:.1} |", available as f64 / (1u64 << 30) as f64);
    println!(
        "| disk (GiB); per database (MiB) | {:.2}; {:.1} |",
        disk as f64 / (1u64 << 30) as f64,
        mib(disk) / databases as f64
    );
    println!(
        "| `GET /v1/databases` p50 / max (ms) | {} / {} |",
        ms(percentile(list_times.clone(), 0.5)),
        ms(percentile(list_times, 1.0))
    );
    println!(
        "| `GET /v1/databases/{{id}}/stats` p50 / max (ms) | {} / {} |",
        ms(percentile(stats_times.clone(), 0.5)),
        ms(percentile(stats_times, 1.0))
    );
    println!(
        "| events: primary_unreachable / failover / failover_refused / rejoin_failed | {} / {} / {} / {} |",
        suspicious.get("primary_unreachable").unwrap_or(&0),
        suspicious.get("failover").unwrap_or(&0),
        suspicious.get("failover_refused").unwrap_or(&0),
        suspicious.get("rejoin_failed").unwrap_or(&0)
    );
    println!(
        "| Ctrl-C to exit (s) | {} |",
        stopped.map_or("> 600".into(), |d| format!("{:.1}", d.as_secs_f64()))
    );
    // Where the idle CPU went, by kind of process (processes that ended in the window are
    // not counted).
    let mut kinds: Vec<(String, u64)> = kinds1
        .iter()
        .map(|(k, t)| (k.clone(), t.saturating_sub(kinds0.get(k).copied().unwrap_or(0))))
        .filter(|(_, t)| *t > 0)
        .collect();
    kinds.sort_by_key(|(_, ticks)| std::cmp::Reverse(*ticks));
    println!();
    println!("| process kind, idle window | % of a core |");
    println!("|---|---:|");
    for (kind, ticks) in kinds.iter().take(15) {
        println!("| {kind} | {:.1} |", *ticks as f64 / ticks_per_sec / secs * 100.0);
    }
    drop(platform);
}

/// Sessions opened on every node since its start, summed (`pg_stat_database.sessions`, read
/// through each node's socket, in its data dir, as the node user): none when `psql` cannot read
/// them.
fn sessions_total(platform: &Platform) -> Option<i64> {
    let mut total = 0i64;
    for node in node_data_dirs(&platform.data()) {
        let pid_file = std::fs::read_to_string(node.join("postmaster.pid")).ok()?;
        let lines: Vec<&str> = pid_file.lines().collect();
        let (port, socket_dir) = (lines.get(3)?.trim().to_owned(), lines.get(4)?.trim().to_owned());
        let out = Command::new("runuser")
            .stderr(Stdio::inherit())
            .args(["-u", "postgres", "--", "psql", "-XAtq", "-h", &socket_dir])
            .args(["-p", &port, "-d", "postgres", "-c"])
            .arg("SELECT coalesce(sum(sessions), 0) FROM pg_stat_database")
            .output()
            .ok()?;
        total += String::from_utf8_lossy(&out.stdout).trim().parse::<i64>().ok()?;
    }
    Some(total)
}
