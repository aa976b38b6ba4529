//! PostgreSQL builds installed on this host ("engines"): Debian's under
//! `/usr/lib/postgresql/<major>/bin`, and more under an engines directory (`<dir>/<name>/bin`).
//! A build may hold only the server (`initdb`, `pg_ctl`, `postgres`); the client tools a node
//! needs (`pg_basebackup`, `pg_rewind`) then come from the newest full toolset of its major.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where Debian installs its PostgreSQL builds.
const DEBIAN: &str = "/usr/lib/postgresql";
/// The major new databases get unless they ask for a version.
pub const DEFAULT_MAJOR: u32 = 15;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Engine {
    /// Full version, `15.18`.
    pub version: String,
    pub major: u32,
    /// Directory of its programs.
    pub bin: PathBuf,
    /// Has the client tools (`pg_basebackup`, `pg_rewind`), not only the server.
    pub toolset: bool,
}

impl Engine {
    /// Numeric version parts, for ordering (`15.9` < `15.18`).
    fn key(&self) -> Vec<u32> {
        self.version.split('.').filter_map(|p| p.parse().ok()).collect()
    }
}

/// The builds found, newest first.
#[derive(Clone, Debug, Default)]
pub struct Engines {
    pub all: Vec<Engine>,
}

impl Engines {
    /// Looks in Debian's directory and in `extra` (an engines directory), if given.
    pub fn discover(extra: Option<&Path>) -> Self {
        let mut dirs: Vec<PathBuf> = Vec::new();
        for root in [Some(Path::new(DEBIAN)), extra].into_iter().flatten() {
            let Ok(entries) = std::fs::read_dir(root) else { continue };
            dirs.extend(entries.flatten().map(|e| e.path().join("bin")));
        }
        let mut all: Vec<Engine> = dirs.into_iter().filter_map(|bin| probe(&bin)).collect();
        all.sort_by_key(|e| std::cmp::Reverse(e.key()));
        all.dedup_by(|a, b| a.version == b.version);
        Self { all }
    }

    /// The build new databases get: the newest of the default major (or the newest of all).
    pub fn default_engine(&self) -> Option<&Engine> {
        self.all.iter().find(|e| e.major == DEFAULT_MAJOR).or(self.all.first())
    }

    pub fn find(&self, version: &str) -> Option<&Engine> {
        self.all.iter().find(|e| e.version == version)
    }

    /// The newest full toolset of `major`.
    pub fn toolset(&self, major: u32) -> Option<&Engine> {
        self.all.iter().find(|e| e.major == major && e.toolset)
    }

    pub fn versions(&self) -> String {
        self.all.iter().map(|e| e.version.as_str()).collect::<Vec<_>>().join(", ")
    }
}

/// The build in `bin`, if `postgres --version` answers there.
fn probe(bin: &Path) -> Option<Engine> {
    if !bin.join("initdb").exists() || !bin.join("pg_ctl").exists() {
        return None;
    }
    let out = Command::new(bin.join("postgres")).arg("--version").output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let version = parse_version(&text)?;
    let major = version.split('.').next()?.parse().ok()?;
    let toolset = bin.join("pg_basebackup").exists() && bin.join("pg_rewind").exists();
    Some(Engine { version, major, bin: bin.to_owned(), toolset })
}

/// `15.18` from `postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)`.
fn parse_version(text: &str) -> Option<String> {
    let rest = text.split("(PostgreSQL)").nth(1)?.trim();
    let version = rest.split_whitespace().next()?;
    version.chars().next()?.is_ascii_digit().then(|| version.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_are_read_and_ordered_numerically() {
        assert_eq!(
            parse_version("postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)\n").as_deref(),
            Some("15.18")
        );
        assert_eq!(parse_version("postgres (PostgreSQL) 18.1\n").as_deref(), Some("18.1"));
        assert_eq!(parse_version("garbage"), None);
        let engine = |v: &str| Engine {
            version: v.into(),
            major: v.split('.').next().unwrap().parse().unwrap(),
            bin: PathBuf::new(),
            toolset: true,
        };
        let mut all = vec![engine("15.9"), engine("16.1"), engine("15.18")];
        all.sort_by_key(|e| std::cmp::Reverse(e.key()));
        let engines = Engines { all };
        assert_eq!(engines.all[0].version, "16.1");
        assert_eq!(
            engines.default_engine().unwrap().version,
            "15.18",
            "newest of the default major"
        );
    }
}
