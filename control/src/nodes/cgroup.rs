//! Resource containers: each local node runs in a cgroup of its own whose memory limit is its
//! plan's (SPEC §7), under a `pgwarden` group below the control plane's own cgroup.
//!
//! - cgroup v2 (one unified hierarchy): the memory and cpu controllers must be enabled for
//!   pgwarden's group, which the kernel allows only in a group without processes of its own
//!   (a delegated one, e.g. `systemd-run -p Delegate=yes`).
//! - cgroup v1 (one hierarchy per controller, as on hosts that still boot with it): the
//!   `memory` and `cpuacct` hierarchies.
//!
//! Swap: a node may use as much swap as memory (Docker's default for `--memory`). A node's group
//! is made anew each time the node starts, so `highest` is the highest since that start.
//! Where no writable cgroup is found (an unprivileged run, a v2 group with processes), nodes run
//! without one and the stats say why.

use std::fs;
use std::path::{Path, PathBuf};

/// Where node groups go, or why there are none.
#[derive(Clone, Debug)]
pub enum Cgroups {
    V2 { base: PathBuf },
    V1 { memory: PathBuf, cpuacct: Option<PathBuf> },
    Unavailable(String),
}

/// What a node's group reads, in bytes and nanoseconds. `None`: not known (no such file, e.g.
/// no swap accounting).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub cpu_ns: Option<u64>,
    pub memory: Triple,
    pub swap: Triple,
    /// Processes the kernel killed in the group for want of memory, since it was made.
    pub oom_kills: Option<u64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Triple {
    pub current: Option<u64>,
    pub highest: Option<u64>,
    /// `None`: unlimited.
    pub limit: Option<u64>,
}

impl Cgroups {
    /// Finds the hierarchy this process is in and makes (or reuses) the `pgwarden` group.
    pub fn detect() -> Self {
        let own = fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
        let mounts = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        match Self::locate(&own, &mounts) {
            Ok(found) => found.prepared(),
            Err(why) => Self::Unavailable(why),
        }
    }

    /// Where the `pgwarden` group would go, from `/proc/self/cgroup` and
    /// `/proc/self/mountinfo`.
    fn locate(own: &str, mounts: &str) -> Result<Self, String> {
        // mountinfo: "id parent major:minor root mount-point options - fstype source super".
        let mount_of = |fstype: &str, option: Option<&str>| {
            mounts.lines().find_map(|line| {
                let (left, right) = line.split_once(" - ")?;
                let mut right = right.split_whitespace();
                if right.next()? != fstype {
                    return None;
                }
                let supers = right.nth(1).unwrap_or("");
                if option.is_some_and(|o| !supers.split(',').any(|s| s == o)) {
                    return None;
                }
                left.split_whitespace().nth(4).map(PathBuf::from)
            })
        };
        // "hierarchy-id:controllers:path"
        let path_of = |controller: &str| {
            own.lines().find_map(|line| {
                let mut parts = line.splitn(3, ':');
                let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
                controllers.split(',').any(|c| c == controller).then(|| path.to_owned())
            })
        };
        let below = |mount: PathBuf, path: &str| mount.join(path.trim_start_matches('/'));
        if let (Some(mount), Some(path)) = (mount_of("cgroup", Some("memory")), path_of("memory")) {
            let cpuacct = mount_of("cgroup", Some("cpuacct"))
                .zip(path_of("cpuacct"))
                .map(|(m, p)| below(m, &p).join("pgwarden"));
            return Ok(Self::V1 { memory: below(mount, &path).join("pgwarden"), cpuacct });
        }
        let unified = own.lines().find_map(|l| l.strip_prefix("0::"));
        match (mount_of("cgroup2", None), unified) {
            (Some(mount), Some(path)) => Ok(Self::V2 { base: below(mount, path).join("pgwarden") }),
            _ => Err("no cgroup memory controller is mounted".into()),
        }
    }

    /// Makes the `pgwarden` group, or says why it cannot be used.
    fn prepared(self) -> Self {
        let made = match &self {
            Self::Unavailable(_) => return self,
            Self::V1 { memory, cpuacct } => fs::create_dir_all(memory)
                .and_then(|()| cpuacct.as_ref().map_or(Ok(()), fs::create_dir_all))
                .map_err(|e| format!("cannot make {}: {e}", memory.display())),
            Self::V2 { base } => fs::create_dir_all(base)
                .map_err(|e| format!("cannot make {}: {e}", base.display()))
                .and_then(|()| {
                    // Node groups get their own memory and cpu accounting only if pgwarden's
                    // group passes the controllers down; its parent must pass them to it first.
                    let parent = base.parent().unwrap_or(base);
                    for group in [parent, base.as_path()] {
                        fs::write(group.join("cgroup.subtree_control"), "+memory +cpu").map_err(
                            |e| {
                                format!(
                                    "cannot enable the memory controller below {}: {e} (cgroup \
                                     v2 allows it only in a group with no processes of its own: \
                                     run pgwarden in a delegated cgroup)",
                                    group.display()
                                )
                            },
                        )?;
                    }
                    Ok(())
                }),
        };
        match made {
            Ok(()) => self,
            Err(why) => Self::Unavailable(why),
        }
    }

    /// Why nodes run without a limit, if they do.
    pub fn unavailable(&self) -> Option<&str> {
        match self {
            Self::Unavailable(why) => Some(why),
            _ => None,
        }
    }

    pub fn version(&self) -> Option<&'static str> {
        match self {
            Self::V1 { .. } => Some("v1"),
            Self::V2 { .. } => Some("v2"),
            Self::Unavailable(_) => None,
        }
    }

    /// The group directories of node `name` (one per hierarchy).
    fn dirs(&self, name: &str) -> Vec<PathBuf> {
        match self {
            Self::V2 { base } => vec![base.join(name)],
            Self::V1 { memory, cpuacct } => {
                let mut dirs = vec![memory.join(name)];
                dirs.extend(cpuacct.iter().map(|c| c.join(name)));
                dirs
            }
            Self::Unavailable(_) => Vec::new(),
        }
    }

    /// Makes node `name`'s group anew (removing an empty old one: its highest figures and OOM
    /// count start over) with `limit` bytes of memory and as much swap.
    pub fn create(&self, name: &str, limit: u64) -> std::io::Result<()> {
        for dir in self.dirs(name) {
            // A group still holding processes cannot go: it is reused as it is.
            let _ = fs::remove_dir(&dir);
            fs::create_dir_all(&dir)?;
        }
        if let Self::V1 { memory, .. } = self {
            // Pages a process used before it moved in move with it (deprecated in recent
            // kernels, where the write fails harmlessly).
            let _ = fs::write(memory.join(name).join("memory.move_charge_at_immigrate"), "3");
        }
        self.set_limit(name, limit)
    }

    /// Sets node `name`'s memory limit to `limit` bytes (and its swap to as much), on a running
    /// node too. Lowering it below what the node uses fails (the kernel cannot reclaim it).
    pub fn set_limit(&self, name: &str, limit: u64) -> std::io::Result<()> {
        match self {
            Self::V2 { base } => {
                let dir = base.join(name);
                fs::write(dir.join("memory.max"), limit.to_string())?;
                // No swap accounting (or no swap): nothing to limit.
                let _ = fs::write(dir.join("memory.swap.max"), limit.to_string());
                Ok(())
            }
            Self::V1 { memory, .. } => {
                let dir = memory.join(name);
                let memsw = dir.join("memory.memsw.limit_in_bytes");
                let both = limit.saturating_mul(2).to_string();
                // memory + swap may never be below memory: raise it first, lower it last.
                let raise_first = read_u64(&memsw).is_some_and(|now| now < limit * 2);
                if raise_first {
                    fs::write(&memsw, &both)?;
                }
                fs::write(dir.join("memory.limit_in_bytes"), limit.to_string())?;
                if memsw.exists() && !raise_first {
                    fs::write(&memsw, &both)?;
                }
                Ok(())
            }
            Self::Unavailable(_) => Ok(()),
        }
    }

    /// Moves process `pid` into node `name`'s group (its children to come follow it).
    pub fn enter(&self, name: &str, pid: u32) -> std::io::Result<()> {
        for dir in self.dirs(name) {
            fs::write(dir.join("cgroup.procs"), pid.to_string())?;
        }
        Ok(())
    }

    /// Removes node `name`'s group (it must hold no process).
    pub fn remove(&self, name: &str) {
        for dir in self.dirs(name) {
            let _ = fs::remove_dir(dir);
        }
    }

    /// What node `name`'s group reads now; `None` without a group.
    pub fn usage(&self, name: &str) -> Option<Usage> {
        match self {
            Self::V2 { base } => {
                let dir = base.join(name);
                dir.exists().then(|| usage_v2(&dir))
            }
            Self::V1 { memory, cpuacct } => {
                let dir = memory.join(name);
                dir.exists().then(|| usage_v1(&dir, cpuacct.as_ref().map(|c| c.join(name))))
            }
            Self::Unavailable(_) => None,
        }
    }
}

fn read_u64(path: &Path) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A limit: "max" (v2) or a page-rounded `i64::MAX` (v1) mean none.
fn read_limit(path: &Path) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    let value: u64 = text.trim().parse().ok()?;
    (value < 1 << 62).then_some(value)
}

/// The value of `key` in a flat-keyed file (`memory.events`, `cpu.stat`, `memory.oom_control`).
fn keyed(path: &Path, key: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.lines().find_map(|line| {
        let (k, v) = line.split_once(' ')?;
        (k == key).then(|| v.trim().parse().ok()).flatten()
    })
}

fn usage_v2(dir: &Path) -> Usage {
    Usage {
        cpu_ns: keyed(&dir.join("cpu.stat"), "usage_usec").map(|us| us * 1000),
        memory: Triple {
            current: read_u64(&dir.join("memory.current")),
            highest: read_u64(&dir.join("memory.peak")),
            limit: read_limit(&dir.join("memory.max")),
        },
        swap: Triple {
            current: read_u64(&dir.join("memory.swap.current")),
            highest: read_u64(&dir.join("memory.swap.peak")),
            limit: read_limit(&dir.join("memory.swap.max")),
        },
        oom_kills: keyed(&dir.join("memory.events"), "oom_kill"),
    }
}

fn usage_v1(dir: &Path, cpuacct: Option<PathBuf>) -> Usage {
    let memory = Triple {
        current: read_u64(&dir.join("memory.usage_in_bytes")),
        highest: read_u64(&dir.join("memory.max_usage_in_bytes")),
        limit: read_limit(&dir.join("memory.limit_in_bytes")),
    };
    // v1 counts memory + swap together: swap is the difference.
    let minus = |both: Option<u64>, mem: Option<u64>| Some(both?.saturating_sub(mem?));
    let swap = Triple {
        current: minus(read_u64(&dir.join("memory.memsw.usage_in_bytes")), memory.current),
        highest: minus(read_u64(&dir.join("memory.memsw.max_usage_in_bytes")), memory.highest),
        limit: minus(read_limit(&dir.join("memory.memsw.limit_in_bytes")), memory.limit),
    };
    Usage {
        cpu_ns: cpuacct.and_then(|c| read_u64(&c.join("cpuacct.usage"))),
        memory,
        swap,
        oom_kills: keyed(&dir.join("memory.oom_control"), "oom_kill"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hierarchy_is_found_from_proc() {
        let v1_cgroup = "9:name=systemd:/\n4:memory:/process_api/abc\n2:cpu,cpuacct:/svc\n0::/\n";
        let v1_mounts = "\
30 25 0:26 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:6 - cgroup cgroup rw,cpu,cpuacct
31 25 0:27 / /sys/fs/cgroup/memory rw,relatime shared:7 - cgroup cgroup rw,memory
32 25 0:28 / /sys/fs/cgroup/unified rw,relatime shared:8 - cgroup2 cgroup2 rw
";
        match Cgroups::locate(v1_cgroup, v1_mounts).unwrap() {
            Cgroups::V1 { memory, cpuacct } => {
                assert_eq!(memory, Path::new("/sys/fs/cgroup/memory/process_api/abc/pgwarden"));
                assert_eq!(cpuacct.unwrap(), Path::new("/sys/fs/cgroup/cpu,cpuacct/svc/pgwarden"));
            }
            other => panic!("{other:?}"),
        }
        let v2_mounts = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate\n";
        match Cgroups::locate("0::/system.slice/pgwarden.service\n", v2_mounts).unwrap() {
            Cgroups::V2 { base } => {
                assert_eq!(base, Path::new("/sys/fs/cgroup/system.slice/pgwarden.service/pgwarden"))
            }
            other => panic!("{other:?}"),
        }
        assert!(Cgroups::locate("0::/\n", "").is_err());
    }

    /// Where the group cannot be made (an unprivileged run, a read-only hierarchy), nodes run
    /// without one and the reason is kept for the stats.
    #[test]
    fn an_unwritable_hierarchy_leaves_nodes_unlimited_with_the_reason() {
        let groups =
            Cgroups::V1 { memory: PathBuf::from("/proc/pgwarden-no-such/pgwarden"), cpuacct: None }
                .prepared();
        let why = groups.unavailable().expect("unavailable");
        assert!(why.starts_with("cannot make /proc/pgwarden-no-such/pgwarden"), "{why}");
        assert_eq!(groups.version(), None);
        assert!(groups.usage("node").is_none());
        assert!(groups.create("node", 1 << 28).is_ok(), "nothing to make");
        let v2 = Cgroups::V2 { base: PathBuf::from("/proc/pgwarden-no-such/pgwarden") }.prepared();
        assert!(v2.unavailable().is_some());
    }

    fn write_files(dir: &Path, files: &[(&str, &str)]) {
        fs::create_dir_all(dir).unwrap();
        for (file, text) in files {
            fs::write(dir.join(file), text).unwrap();
        }
    }

    /// The files of each version are read as the kernel writes them (v2: "max" for none;
    /// v1: memory + swap counted together, a huge number for none).
    #[test]
    fn usage_is_read_from_either_version_s_files() {
        let dir = std::env::temp_dir().join(format!("pgwarden-cgroup-{}", std::process::id()));
        let v2 = dir.join("v2");
        write_files(
            &v2,
            &[
                ("cpu.stat", "usage_usec 1500\nuser_usec 1000\nsystem_usec 500\n"),
                ("memory.current", "1000\n"),
                ("memory.peak", "3000\n"),
                ("memory.max", "268435456\n"),
                ("memory.swap.current", "0\n"),
                ("memory.swap.max", "max\n"),
                ("memory.events", "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n"),
            ],
        );
        let usage = usage_v2(&v2);
        assert_eq!(usage.cpu_ns, Some(1_500_000));
        assert_eq!(
            usage.memory,
            Triple { current: Some(1000), highest: Some(3000), limit: Some(268435456) }
        );
        assert_eq!(usage.swap, Triple { current: Some(0), highest: None, limit: None });
        assert_eq!(usage.oom_kills, Some(1));

        let v1 = dir.join("v1");
        let acct = dir.join("acct");
        fs::create_dir_all(&acct).unwrap();
        write_files(
            &v1,
            &[
                ("memory.usage_in_bytes", "1000\n"),
                ("memory.max_usage_in_bytes", "2000\n"),
                ("memory.limit_in_bytes", "4096\n"),
                ("memory.memsw.usage_in_bytes", "1500\n"),
                ("memory.memsw.max_usage_in_bytes", "2500\n"),
                ("memory.memsw.limit_in_bytes", "8192\n"),
                ("memory.oom_control", "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n"),
            ],
        );
        fs::write(acct.join("cpuacct.usage"), "777\n").unwrap();
        let usage = usage_v1(&v1, Some(acct));
        assert_eq!(usage.cpu_ns, Some(777));
        assert_eq!(
            usage.memory,
            Triple { current: Some(1000), highest: Some(2000), limit: Some(4096) }
        );
        assert_eq!(
            usage.swap,
            Triple { current: Some(500), highest: Some(500), limit: Some(4096) }
        );
        assert_eq!(usage.oom_kills, Some(2));
        fs::write(v1.join("memory.limit_in_bytes"), "9223372036854771712\n").unwrap();
        assert_eq!(usage_v1(&v1, None).memory.limit, None);
        fs::remove_dir_all(&dir).unwrap();
    }
}
