//! Which scheduled backups to keep (SPEC §3, §8): the last 7 daily backups, then the newest
//! backup of each of the plan's last N weeks, and of each of its last M months. Manual backups
//! are never removed by retention. A pure function, so it can be checked over a simulated year.

use std::collections::HashSet;

use time::{Duration, OffsetDateTime};

/// How many scheduled backups a plan keeps.
#[derive(Clone, Copy, Debug)]
pub struct Policy {
    pub daily: u32,
    pub weekly: u32,
    pub monthly: u32,
}

/// Returns the ids of scheduled backups to delete. `backups` are `(id, taken_at)`.
pub fn to_delete(
    backups: &[(String, OffsetDateTime)],
    policy: Policy,
    now: OffsetDateTime,
) -> Vec<String> {
    let mut newest_first: Vec<&(String, OffsetDateTime)> = backups.iter().collect();
    newest_first.sort_by_key(|b| std::cmp::Reverse(b.1));
    let mut keep: HashSet<&str> =
        newest_first.iter().take(policy.daily as usize).map(|(id, _)| id.as_str()).collect();
    // Newest backup of each of the last `weekly` ISO weeks (this week included).
    let week_start = |t: OffsetDateTime| {
        t.date() - Duration::days(i64::from(t.weekday().number_days_from_monday()))
    };
    let this_week = week_start(now);
    for w in 0..i64::from(policy.weekly) {
        let start = this_week - Duration::weeks(w);
        if let Some((id, _)) = newest_first.iter().find(|(_, t)| week_start(*t) == start) {
            keep.insert(id);
        }
    }
    // Newest backup of each of the last `monthly` calendar months (this month included).
    let month_index = |t: OffsetDateTime| i64::from(t.year()) * 12 + i64::from(u8::from(t.month()));
    let this_month = month_index(now);
    for m in 0..i64::from(policy.monthly) {
        if let Some((id, _)) = newest_first.iter().find(|(_, t)| month_index(*t) == this_month - m)
        {
            keep.insert(id);
        }
    }
    newest_first
        .iter()
        .filter(|(id, _)| !keep.contains(id.as_str()))
        .map(|(id, _)| id.clone())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plans;

    /// A year of daily backups at 01:00 UTC with retention applied after each one.
    fn simulate(policy: Policy, days: i64) -> (Vec<(String, OffsetDateTime)>, OffsetDateTime) {
        let start = time::macros::datetime!(2026-01-01 01:00 UTC);
        let mut kept: Vec<(String, OffsetDateTime)> = Vec::new();
        let mut now = start;
        for day in 0..days {
            now = start + Duration::days(day);
            if policy.daily == 0 {
                continue; // plans without scheduled backups take none
            }
            kept.push((format!("bk-{day}"), now));
            let gone = to_delete(&kept, policy, now);
            kept.retain(|(id, _)| !gone.contains(id));
        }
        (kept, now)
    }

    #[test]
    fn a_simulated_year_keeps_exactly_what_each_plan_promises() {
        for plan in plans::catalogue() {
            let policy = Policy {
                daily: plan.daily_backups,
                weekly: plan.weekly_backups,
                monthly: plan.monthly_backups,
            };
            let (kept, now) = simulate(policy, 365);
            let name = &plan.name;
            if plan.daily_backups == 0 {
                assert!(kept.is_empty(), "{name}");
                continue;
            }
            let max = (policy.daily + policy.weekly + policy.monthly) as usize;
            assert!(kept.len() <= max, "{name}: {} kept, at most {max}", kept.len());
            // The last 7 days are all there.
            for d in 0..i64::from(policy.daily) {
                assert!(
                    kept.iter().any(|(_, t)| *t == now - Duration::days(d)),
                    "{name}: day -{d} missing"
                );
            }
            // One per week for the plan's weeks, one per month for its months.
            let week_start = |x: OffsetDateTime| {
                x.date() - Duration::days(i64::from(x.weekday().number_days_from_monday()))
            };
            for w in 0..i64::from(policy.weekly) {
                let week = week_start(now) - Duration::weeks(w);
                assert!(
                    kept.iter().any(|(_, t)| week_start(*t) == week),
                    "{name}: week -{w} has no backup"
                );
            }
            for m in 0..i64::from(policy.monthly) {
                let idx =
                    |x: OffsetDateTime| i64::from(x.year()) * 12 + i64::from(u8::from(x.month()));
                assert!(
                    kept.iter().any(|(_, t)| idx(*t) == idx(now) - m),
                    "{name}: month -{m} has no backup"
                );
            }
            // Nothing older than the longest promise survives.
            let horizon = Duration::weeks(i64::from(policy.weekly) + 1)
                .max(Duration::days(31 * i64::from(policy.monthly) + 31));
            assert!(
                kept.iter().all(|(_, t)| now - *t <= horizon),
                "{name}: keeps backups older than promised"
            );
            let oldest = kept.iter().map(|(_, t)| *t).min().unwrap();
            println!(
                "{name}: {} backups kept after a year, oldest {} days",
                kept.len(),
                (now - oldest).whole_days()
            );
        }
    }

    #[test]
    fn manual_backups_are_not_considered_and_a_single_backup_is_kept() {
        let now = time::macros::datetime!(2026-06-15 01:00 UTC);
        let one = vec![("a".to_owned(), now)];
        assert!(to_delete(&one, Policy { daily: 7, weekly: 4, monthly: 0 }, now).is_empty());
        let ten: Vec<_> = (0..10).map(|d| (format!("d{d}"), now - Duration::days(d))).collect();
        let gone = to_delete(&ten, Policy { daily: 7, weekly: 0, monthly: 0 }, now);
        assert_eq!(gone, ["d7", "d8", "d9"]);
    }
}
