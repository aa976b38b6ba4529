//! Base backups, the WAL gap check, and pruning to the window.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use tracing::info;

use super::archiver::replication_conninfo;
use super::{base_dir, wal_dir, PitrError};
use crate::failure::Failure;
use crate::nodes::{NodeError, Nodes};
use crate::state::access::now_rfc3339;
use crate::state::{DatabaseRecord, Records};

const BASE_BACKUP_EVERY: time::Duration = time::Duration::days(7);

/// A verified base backup.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BaseBackup {
    pub id: String,
    pub database_id: String,
    pub finished_at: String,
    /// First WAL segment the backup needs, from its `backup_label`.
    pub start_segment: String,
}

pub fn base_backups(backup_dir: &Path, id: &str) -> Vec<BaseBackup> {
    crate::files::blocking_io(|| {
        let mut all: Vec<BaseBackup> = std::fs::read_dir(base_dir(backup_dir, id))
            .map(|d| {
                d.flatten()
                    .filter_map(|e| std::fs::read(e.path().join("pgwarden-base.json")).ok())
                    .filter_map(|b| serde_json::from_slice(&b).ok())
                    .collect()
            })
            .unwrap_or_default();
        all.sort_by(|a: &BaseBackup, b| a.finished_at.cmp(&b.finished_at));
        all
    })
}

pub(crate) fn parse_time(t: &str) -> Option<OffsetDateTime> {
    OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
}

pub(crate) fn base_backup_due(backup_dir: &Path, id: &str) -> bool {
    base_backups(backup_dir, id)
        .last()
        .and_then(|b| parse_time(&b.finished_at))
        .is_none_or(|t| OffsetDateTime::now_utc() - t > BASE_BACKUP_EVERY)
}

/// `pg_basebackup` (from the standby when there is one), verified with `pg_verifybackup`.
pub async fn take_base_backup(
    records: &Records,
    nodes: &Nodes,
    backup_dir: &Path,
    data_dir: &Path,
    db: &DatabaseRecord,
) -> Result<BaseBackup, PitrError> {
    let source = db.replicas().next().or(db.primary()).cloned().ok_or(PitrError::NoNode)?;
    let seq = records.store.next_counter("base_backup_seq").await?;
    let id = format!("base-{seq:06}");
    let dir = base_dir(backup_dir, &db.id);
    crate::files::blocking_io(|| crate::files::private_dir(&dir))?;
    let (tmp, done) = (dir.join(format!(".{id}")), dir.join(&id));
    let bin = nodes.tools(db);
    let conninfo = replication_conninfo(data_dir, &source, "pgwarden_base_backup");
    let password = db.replication_password.clone();
    let work = tmp.clone();
    let start_segment = tokio::task::spawn_blocking(move || -> Result<String, PitrError> {
        let tmp = work;
        let run = |cmd: &mut std::process::Command, what: &'static str| -> Result<(), PitrError> {
            let out = cmd.output().map_err(|source| PitrError::NotRunnable { what, source })?;
            if out.status.success() {
                Ok(())
            } else {
                let stderr = String::from_utf8_lossy(&out.stderr);
                tracing::error!(command = what, output = %stderr.trim(), "base backup program failed");
                let sentence = crate::nodes::driver::client_sentence(&stderr);
                Err(Failure::Program { what, sentence }.into())
            }
        };
        let _ = std::fs::remove_dir_all(&tmp);
        run(
            std::process::Command::new(bin.join("pg_basebackup"))
                .arg("-D")
                .arg(&tmp)
                .args(["-Fp", "-X", "stream", "-c", "fast", "--no-password", "-d", &conninfo])
                .env("PGPASSWORD", &password),
            "pg_basebackup",
        )?;
        run(std::process::Command::new(bin.join("pg_verifybackup")).arg(&tmp), "pg_verifybackup")?;
        let label = std::fs::read_to_string(tmp.join("backup_label"))?;
        label
            .lines()
            .find_map(|l| l.strip_prefix("START WAL LOCATION: "))
            .and_then(|l| l.split("(file ").nth(1))
            .map(|f| f.trim_end_matches(')').to_owned())
            .ok_or(PitrError::NoStartSegment)
    })
    .await
    .map_err(NodeError::from)??;
    let backup =
        BaseBackup { id, database_id: db.id.clone(), finished_at: now_rfc3339(), start_segment };
    crate::files::write_private(&tmp.join("pgwarden-base.json"), &serde_json::to_vec(&backup)?)?;
    std::fs::rename(&tmp, &done)?;
    info!(database = %db.id, backup = %backup.id, "base backup taken");
    Ok(backup)
}

/// Names of WAL segments missing between the first and the last one of each timeline (from
/// `from` on, when given).
pub fn wal_gaps(dir: &Path, from: Option<&str>) -> Vec<String> {
    crate::files::blocking_io(|| {
        let mut by_timeline: HashMap<u32, Vec<u64>> = HashMap::new();
        let names: Vec<String> = std::fs::read_dir(dir)
            .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        for name in &names {
            let base = name.strip_suffix(".partial").unwrap_or(name);
            if let Some((tli, segno)) = parse_segment(base) {
                by_timeline.entry(tli).or_default().push(segno);
            }
        }
        let floor = from.and_then(parse_segment).map(|(_, s)| s).unwrap_or(0);
        let mut missing = Vec::new();
        for (tli, mut segs) in by_timeline {
            segs.sort_unstable();
            segs.dedup();
            let first = segs.iter().copied().find(|s| *s >= floor);
            let Some(first) = first else { continue };
            let mut expected = first;
            for s in segs.into_iter().filter(|s| *s >= first) {
                while expected < s {
                    missing.push(segment_name(tli, expected));
                    expected += 1;
                }
                expected = s + 1;
            }
        }
        missing.sort();
        missing
    })
}

fn parse_segment(name: &str) -> Option<(u32, u64)> {
    if name.len() != 24 || !name.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let tli = u32::from_str_radix(&name[0..8], 16).ok()?;
    let log = u64::from_str_radix(&name[8..16], 16).ok()?;
    let seg = u64::from_str_radix(&name[16..24], 16).ok()?;
    Some((tli, log * 0x100 + seg))
}

fn segment_name(tli: u32, segno: u64) -> String {
    format!("{tli:08X}{:08X}{:08X}", segno / 0x100, segno % 0x100)
}

/// How long the archive keeps the past restorable.
pub const WINDOW: time::Duration = time::Duration::days(7);

/// Base backups no longer needed to restore any time in the window ending at `now`: every one
/// older than the newest that finished before the window's start.
pub fn bases_to_prune(bases: &[BaseBackup], now: OffsetDateTime) -> Vec<String> {
    let horizon = now - WINDOW;
    let covering =
        bases.iter().rposition(|b| parse_time(&b.finished_at).is_some_and(|t| t <= horizon));
    match covering {
        Some(i) => bases[..i].iter().map(|b| b.id.clone()).collect(),
        None => Vec::new(),
    }
}

/// WAL segment files older than the segment `oldest_needed` (any timeline); history files stay.
pub fn wal_to_prune(names: &[String], oldest_needed: &str) -> Vec<String> {
    let Some((_, floor)) = parse_segment(oldest_needed) else { return Vec::new() };
    names
        .iter()
        .filter(|n| {
            parse_segment(n.strip_suffix(".partial").unwrap_or(n)).is_some_and(|(_, s)| s < floor)
        })
        .cloned()
        .collect()
}

/// Drops base backups and WAL that no time in the window needs.
pub(crate) async fn prune(records: &Records, backup_dir: &Path, id: &str) {
    let (gone, old) = crate::files::blocking_io(|| {
        let bases = base_backups(backup_dir, id);
        let gone = bases_to_prune(&bases, OffsetDateTime::now_utc());
        for b in &gone {
            let _ = std::fs::remove_dir_all(base_dir(backup_dir, id).join(b));
        }
        let Some(oldest) = bases.iter().find(|b| !gone.contains(&b.id)) else {
            return (Vec::new(), Vec::new());
        };
        let wal = wal_dir(backup_dir, id);
        let names: Vec<String> = std::fs::read_dir(&wal)
            .map(|d| d.flatten().filter_map(|e| e.file_name().into_string().ok()).collect())
            .unwrap_or_default();
        let old = wal_to_prune(&names, &oldest.start_segment);
        for name in &old {
            let _ = std::fs::remove_file(wal.join(name));
        }
        (gone, old)
    });
    if !gone.is_empty() || !old.is_empty() {
        let message = format!(
            "{} base backup(s) and {} WAL segment(s) older than the window removed",
            gone.len(),
            old.len()
        );
        records.event(id, "pitr_pruned", message).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pruning_keeps_what_the_window_needs() {
        let now = time::macros::datetime!(2026-06-30 12:00 UTC);
        let base = |id: &str, days_ago: i64, seg: &str| BaseBackup {
            id: id.into(),
            database_id: "d".into(),
            finished_at: (now - time::Duration::days(days_ago))
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
            start_segment: seg.into(),
        };
        let bases = vec![
            base("b1", 21, "000000010000000000000002"),
            base("b2", 14, "000000010000000000000010"),
            base("b3", 8, "000000010000000000000020"),
            base("b4", 1, "000000020000000000000030"),
        ];
        // b3 finished before the window's start: it covers it; b1 and b2 are not needed.
        assert_eq!(bases_to_prune(&bases, now), ["b1", "b2"]);
        assert!(bases_to_prune(&bases[3..], now).is_empty(), "a lone recent backup stays");
        let names: Vec<String> = [
            "00000001000000000000001F",
            "000000010000000000000020",
            "000000010000000000000021.partial",
            "00000002.history",
            "00000002000000000000001E.partial",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            wal_to_prune(&names, "000000010000000000000020"),
            ["00000001000000000000001F", "00000002000000000000001E.partial"]
        );
    }

    #[test]
    fn gaps_are_found_per_timeline_from_the_base_backup_on() {
        let dir = tempfile::tempdir().unwrap();
        for name in [
            "000000010000000000000001",
            "000000010000000000000002",
            "000000010000000000000004",
            "0000000100000000000000FF",
            "000000010000000100000000",
            "000000020000000100000001.partial",
            "000000020000000100000000",
            "00000002.history",
        ] {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let gaps = wal_gaps(dir.path(), None);
        assert_eq!(gaps[0], "000000010000000000000003");
        assert_eq!(gaps.len(), 1 + (0xFE - 0x05 + 1), "{gaps:?}");
        assert!(wal_gaps(dir.path(), Some("0000000100000000000000FF")).is_empty());
        assert_eq!(segment_name(1, 0x100), "000000010000000100000000");
    }
}
