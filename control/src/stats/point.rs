//! A point of the stats history: its figures, its bytes (`encode`, `decode`), means of points
//! per step, an answer's arrays, and a sample as versions before the tiers kept it.

use std::collections::BTreeMap;

use pgwarden_api::control::{NodeSeries, Stats, StatsHistory};
use serde::Deserialize;

pub(super) const NODE_FIGURES: usize = 9;
/// Logical size; disk: data, WAL, other.
pub(super) const DATABASE_FIGURES: usize = 4;

/// One point: a sample, or the mean of the samples of a minute or a quarter.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Point {
    pub at_ms: i64,
    /// How many samples it stands for.
    pub samples: u32,
    pub database: [Option<f64>; DATABASE_FIGURES],
    pub nodes: Vec<(String, [Option<f64>; NODE_FIGURES])>,
}

impl Point {
    pub fn of(stats: &Stats, at_ms: i64) -> Self {
        let f = |v: Option<u64>| v.map(|v| v as f64);
        let disk = |i: usize| stats.size.disk.as_ref().map(|d| [d.data, d.wal, d.other][i] as f64);
        Self {
            at_ms,
            samples: 1,
            database: [f(stats.size.logical), disk(0), disk(1), disk(2)],
            nodes: stats
                .nodes
                .iter()
                .map(|n| {
                    let (open, max) = n.connections.as_ref().map(|c| (c.open, c.max)).unzip();
                    let lag = n.replication_lag.as_ref();
                    let figures = [
                        n.cpu_percent,
                        f(n.memory.current),
                        f(n.memory.limit),
                        f(n.swap.current),
                        f(n.swap.limit),
                        f(open),
                        f(max),
                        f(lag.map(|l| l.bytes)),
                        lag.map(|l| l.seconds),
                    ];
                    (n.name.clone(), figures)
                })
                .collect(),
        }
    }

    /// `samples` (u32), the database's figures, the number of nodes (u8), then each node's
    /// name (u8 length, bytes) and figures; a figure is an `f32`, NaN when it was not known.
    pub fn encode(&self) -> Vec<u8> {
        let nodes = &self.nodes[..self.nodes.len().min(usize::from(u8::MAX))];
        let mut out = Vec::with_capacity(
            4 + 4 * DATABASE_FIGURES + 1 + nodes.len() * (1 + 16 + 4 * NODE_FIGURES),
        );
        let figure = |out: &mut Vec<u8>, v: &Option<f64>| {
            out.extend_from_slice(&v.map_or(f32::NAN, |v| v as f32).to_le_bytes());
        };
        out.extend_from_slice(&self.samples.to_le_bytes());
        self.database.iter().for_each(|v| figure(&mut out, v));
        out.push(nodes.len() as u8);
        for (name, figures) in nodes {
            let mut len = name.len().min(usize::from(u8::MAX));
            while !name.is_char_boundary(len) {
                len -= 1;
            }
            out.push(len as u8);
            out.extend_from_slice(&name.as_bytes()[..len]);
            figures.iter().for_each(|v| figure(&mut out, v));
        }
        out
    }

    /// The point `encode` wrote; `None` for bytes it did not write.
    pub fn decode(at_ms: i64, bytes: &[u8]) -> Option<Self> {
        let mut r = Reader(bytes);
        let samples = u32::from_le_bytes(r.take()?);
        let mut database = [None; DATABASE_FIGURES];
        r.figures(&mut database)?;
        let count = r.take::<1>()?[0];
        let mut nodes = Vec::with_capacity(count.into());
        for _ in 0..count {
            let len = r.take::<1>()?[0];
            let name = std::str::from_utf8(r.bytes(len.into())?).ok()?.to_owned();
            let mut figures = [None; NODE_FIGURES];
            r.figures(&mut figures)?;
            nodes.push((name, figures));
        }
        r.0.is_empty().then_some(Self { at_ms, samples, database, nodes })
    }
}

/// What is left to decode of a point.
struct Reader<'a>(&'a [u8]);

impl Reader<'_> {
    fn bytes(&mut self, n: usize) -> Option<&[u8]> {
        let (head, tail) = self.0.split_at_checked(n)?;
        self.0 = tail;
        Some(head)
    }

    fn take<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.bytes(N)?.try_into().ok()
    }

    fn figures(&mut self, out: &mut [Option<f64>]) -> Option<()> {
        for v in out {
            let f = f32::from_le_bytes(self.take()?);
            *v = (!f.is_nan()).then_some(f64::from(f));
        }
        Some(())
    }
}

/// A mean of values, each weighing what it stands for.
#[derive(Default, Clone, Copy)]
struct Mean(f64, f64);

impl Mean {
    fn add(&mut self, v: Option<f64>, weight: f64) {
        if let Some(v) = v {
            self.0 += v * weight;
            self.1 += weight;
        }
    }

    fn get(&self) -> Option<f64> {
        (self.1 > 0.0).then(|| self.0 / self.1)
    }
}

/// One point per step of `step_ms` that has points: their means. Steps start at multiples of
/// the step (not at the first point): a point falls in the same step whatever is asked.
pub(super) fn means(points: &[Point], step_ms: i64) -> Vec<Point> {
    #[derive(Default)]
    struct Step {
        samples: u32,
        database: [Mean; DATABASE_FIGURES],
        nodes: Vec<(String, [Mean; NODE_FIGURES])>,
    }
    let step_ms = step_ms.max(1);
    let mut steps: BTreeMap<i64, Step> = BTreeMap::new();
    for point in points {
        let step = steps.entry(point.at_ms - point.at_ms.rem_euclid(step_ms)).or_default();
        step.samples = step.samples.saturating_add(point.samples);
        let weight = f64::from(point.samples.max(1));
        for (mean, v) in step.database.iter_mut().zip(point.database) {
            mean.add(v, weight);
        }
        for (name, figures) in &point.nodes {
            let at = match step.nodes.iter().position(|(n, _)| n == name) {
                Some(at) => at,
                None => {
                    step.nodes.push((name.clone(), Default::default()));
                    step.nodes.len() - 1
                }
            };
            for (mean, v) in step.nodes[at].1.iter_mut().zip(figures) {
                mean.add(*v, weight);
            }
        }
    }
    steps
        .into_iter()
        .map(|(at_ms, step)| Point {
            at_ms,
            samples: step.samples,
            database: step.database.map(|m| m.get()),
            nodes: step.nodes.into_iter().map(|(name, m)| (name, m.map(|m| m.get()))).collect(),
        })
        .collect()
}

/// The answer for `steps` (one point per step, in time order): arrays aligned with `at`, a
/// node missing from a step a gap.
pub(super) fn answer(
    database: &str,
    steps: &[Point],
    since_ms: i64,
    until_ms: i64,
    step_secs: u64,
) -> StatsHistory {
    let mut names: Vec<&str> = Vec::new();
    for (name, _) in steps.iter().flat_map(|s| &s.nodes) {
        if !names.contains(&name.as_str()) {
            names.push(name);
        }
    }
    let mut history = StatsHistory {
        database: database.to_owned(),
        since: rfc3339_ms(since_ms),
        until: rfc3339_ms(until_ms),
        step_secs: step_secs.max(1),
        at: Vec::with_capacity(steps.len()),
        nodes: names
            .iter()
            .map(|n| NodeSeries { name: (*n).to_owned(), ..Default::default() })
            .collect(),
        size_logical: Vec::new(),
        disk_data: Vec::new(),
        disk_wal: Vec::new(),
        disk_other: Vec::new(),
    };
    for step in steps {
        history.at.push(step.at_ms.div_euclid(1000));
        let [logical, data, wal, other] = step.database;
        history.size_logical.push(logical);
        history.disk_data.push(data);
        history.disk_wal.push(wal);
        history.disk_other.push(other);
        for series in &mut history.nodes {
            let figures = step.nodes.iter().find(|(n, _)| *n == series.name).map(|(_, f)| f);
            for (figure, column) in [
                &mut series.cpu_percent,
                &mut series.memory,
                &mut series.memory_limit,
                &mut series.swap,
                &mut series.swap_limit,
                &mut series.connections_open,
                &mut series.connections_max,
                &mut series.lag_bytes,
                &mut series.lag_seconds,
            ]
            .into_iter()
            .enumerate()
            {
                column.push(figures.and_then(|f| f[figure]));
            }
        }
    }
    history
}

/// A sample as versions before the tiers kept it.
#[derive(Deserialize)]
pub(super) struct Sample {
    at_ms: i64,
    nodes: Vec<SampleNode>,
    logical: Option<u64>,
    disk: Option<[u64; 3]>,
}

#[derive(Deserialize)]
struct SampleNode {
    name: String,
    cpu: Option<f64>,
    memory: Option<u64>,
    memory_limit: Option<u64>,
    swap: Option<u64>,
    swap_limit: Option<u64>,
    open: Option<u64>,
    max: Option<u64>,
    lag_bytes: Option<u64>,
    lag_seconds: Option<f64>,
}

impl Sample {
    pub fn point(self) -> Point {
        let f = |v: Option<u64>| v.map(|v| v as f64);
        let disk = |i: usize| self.disk.map(|d| d[i] as f64);
        Point {
            at_ms: self.at_ms,
            samples: 1,
            database: [f(self.logical), disk(0), disk(1), disk(2)],
            nodes: self
                .nodes
                .into_iter()
                .map(|n| {
                    let figures = [
                        n.cpu,
                        f(n.memory),
                        f(n.memory_limit),
                        f(n.swap),
                        f(n.swap_limit),
                        f(n.open),
                        f(n.max),
                        f(n.lag_bytes),
                        n.lag_seconds,
                    ];
                    (n.name, figures)
                })
                .collect(),
        }
    }
}

fn rfc3339_ms(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(at_ms: i64, samples: u32, nodes: &[(&str, f64)], logical: f64) -> Point {
        // Memory, its limit, swap, its limit, sessions open, their most, lag.
        let rest = [Some(100.0), Some(1000.0), None, None, Some(1.0), Some(30.0), None, None];
        Point {
            at_ms,
            samples,
            database: [Some(logical), Some(1.0), Some(2.0), Some(3.0)],
            nodes: nodes
                .iter()
                .map(|(name, cpu)| {
                    let mut all = [Some(*cpu); NODE_FIGURES];
                    all[1..].copy_from_slice(&rest);
                    ((*name).to_owned(), all)
                })
                .collect(),
        }
    }

    #[test]
    fn a_point_reads_back_as_written_and_foreign_bytes_do_not_read() {
        let mut p = point(5, 7, &[("n1", 12.5), ("ünïcode-node", 0.25)], 1e9);
        p.database[2] = None;
        let bytes = p.encode();
        assert_eq!(bytes.len(), 4 + 16 + 1 + (1 + 2 + 36) + (1 + 14 + 36));
        assert_eq!(Point::decode(5, &bytes), Some(p));
        assert_eq!(Point::decode(5, &bytes[..bytes.len() - 1]), None);
        assert_eq!(Point::decode(5, &[bytes.as_slice(), &[0]].concat()), None);
        assert_eq!(Point::decode(5, br#"{"at_ms":5,"nodes":[]}"#), None);
    }

    #[test]
    fn a_point_is_in_the_same_step_whatever_the_query_s_start() {
        let points = [point(79_900, 1, &[("a", 1.0)], 1.0), point(80_950, 1, &[("a", 2.0)], 2.0)];
        let steps = means(&points, 1_000);
        for since in [0, 78_950, 79_100, 79_999] {
            assert_eq!(answer("db", &steps, since, 90_000, 1).at, [79, 80], "since {since} ms");
        }
    }

    #[test]
    fn points_are_averaged_per_step_by_weight_and_nodes_that_come_and_go_leave_gaps() {
        let points = [
            point(0, 1, &[("a", 10.0)], 100.0),
            // A minute's mean of three samples weighs three.
            point(5_000, 3, &[("a", 30.0)], 200.0),
            point(10_000, 1, &[("a", 50.0), ("b", 1.0)], 300.0),
            point(25_000, 1, &[("b", 3.0)], 400.0),
        ];
        let steps = means(&points, 10_000);
        assert_eq!(steps.iter().map(|s| s.samples).collect::<Vec<_>>(), [4, 1, 1]);
        let h = answer("db", &steps, 0, 30_000, 10);
        assert_eq!(h.at, [0, 10, 20]);
        assert_eq!(h.size_logical, [Some(175.0), Some(300.0), Some(400.0)]);
        assert_eq!(h.disk_wal, [Some(2.0); 3]);
        let names: Vec<&str> = h.nodes.iter().map(|n| n.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(h.nodes[0].cpu_percent, [Some(25.0), Some(50.0), None]);
        assert_eq!(h.nodes[1].cpu_percent, [None, Some(1.0), Some(3.0)]);
        assert_eq!(h.nodes[1].connections_max, [None, Some(30.0), Some(30.0)]);
        assert_eq!(h.nodes[0].swap, [None, None, None]);
        assert_eq!(h.since, "1970-01-01T00:00:00Z");
    }
}
