"""Tables of benches/proxy.sh from its runs file (one line per pgbench run).

    python3 benches/summary.py runs.tsv

Columns of runs.tsv, tab-separated: workload, target, sslmode, round, TPS, mean latency (ms),
proxy CPU ms per 1000 transactions ("-" for direct PostgreSQL). Prints, in Markdown:
1. per workload and target: mean TPS over the rounds with its lowest and highest round, mean
   latency, ratio to direct, CPU;
2. the performance issue's targets for each pgwarden build measured, with the ratio of every
   round, since this machine's run-to-run noise (5-10 %) is larger than some of the gaps.
"""

import sys
from collections import defaultdict

PEERS = ("pgbouncer", "haproxy")
SELECT_ONLY = ("select-only, 16 clients, -M extended", "select-only, 16 clients, -M prepared")
ONE_CLIENT = "select-only, 1 client"
STORMS = ("reconnect storm (-C), 8 clients", "reconnect storm (-C), 8 clients, 8 threads")


def load(path):
    runs = defaultdict(dict)  # (workload, target, sslmode) -> round -> (tps, lat, cpu)
    order = []
    with open(path) as f:
        for line in f:
            workload, target, sslmode, rnd, tps, lat, cpu = line.rstrip("\n").split("\t")
            key = (workload, target, sslmode)
            if key not in runs:
                order.append(key)
            runs[key][int(rnd)] = (float(tps), float(lat), None if cpu == "-" else float(cpu))
    return runs, order


def mean(values):
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def main():
    runs, order = load(sys.argv[1])

    def col(key, i):
        return [v[i] for v in runs.get(key, {}).values() if v[i] is not None]

    print("| workload | TLS | target | TPS | TPS lowest–highest round | mean latency (ms) "
          "| ratio to direct | proxy CPU ms / 1000 tx |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for key in order:
        workload, target, sslmode = key
        tps = col(key, 0)
        direct = mean(col((workload, "direct", sslmode), 0))
        tls = "yes" if sslmode == "require" else "no"
        label = target
        if target == "haproxy" and tls == "yes":
            label = "haproxy (TLS by PostgreSQL)"
        ratio = f"{mean(tps) / direct:.2f}x" if direct == direct and direct else "-"
        cpu = col(key, 2)
        cpu_cell = f"{mean(cpu):.2f}" if cpu else "-"
        print(f"| {workload} | {tls} | {label} | {mean(tps):.1f} | {min(tps):.0f}–{max(tps):.0f} "
              f"| {mean(col(key, 1)):.3f} | {ratio} | {cpu_cell} |")

    builds = sorted({t for (_, t, _) in runs if t.startswith("pgwarden")})
    have = {(w, t, s) for (w, t, s) in runs}
    rows = []

    for build in builds:
        for workload in SELECT_ONLY:
            for sslmode in ("disable", "require"):
                peers = [p for p in PEERS if (workload, p, sslmode) in have]
                ours = (workload, build, sslmode)
                if ours not in have or not peers:
                    continue
                tls = "TLS" if sslmode == "require" else "plain"
                best = max(peers, key=lambda p: mean(col((workload, p, sslmode), 0)))
                ratio = mean(col(ours, 0)) / mean(col((workload, best, sslmode), 0))
                rounds = []
                for r in sorted(runs[ours]):
                    peer_tps = [runs[(workload, p, sslmode)][r][0] for p in peers
                                if r in runs[(workload, p, sslmode)]]
                    if peer_tps:
                        rounds.append(runs[ours][r][0] / max(peer_tps))
                per = " ".join(f"{x:.2f}" for x in rounds)
                rows.append((f"{build}: {workload.split(', ')[-1]} {tls}, TPS ≥ 1.1x the best peer",
                             f"{ratio:.2f}x {best} (rounds, vs that round's best: {per})",
                             "yes" if ratio >= 1.1 else "no"))
                cpus = {p: mean(col((workload, p, sslmode), 2)) for p in peers}
                ours_cpu = mean(col(ours, 2))
                rows.append((f"{build}: {workload.split(', ')[-1]} {tls}, CPU below both peers",
                             f"{ours_cpu:.2f} vs " + ", ".join(f"{p} {c:.2f}" for p, c in cpus.items()),
                             "yes" if all(ours_cpu < c for c in cpus.values()) else "no"))
        for sslmode in ("disable", "require"):
            ours, direct, ha = ((ONE_CLIENT, t, sslmode) for t in (build, "direct", "haproxy"))
            if not {ours, direct, ha} <= have:
                continue
            added = mean(col(ours, 1)) - mean(col(direct, 1))
            ha_added = mean(col(ha, 1)) - mean(col(direct, 1))
            tls = "TLS" if sslmode == "require" else "plain"
            rows.append((f"{build}: 1 client {tls}, added latency ≤ HAProxy's",
                         f"{added * 1000:.0f} µs vs {ha_added * 1000:.0f} µs",
                         "yes" if added <= ha_added else "no"))
        for storm in STORMS:
            ours, direct = (storm, build, "require"), (storm, "direct", "require")
            if not {ours, direct} <= have:
                continue
            ratio = mean(col(ours, 0)) / mean(col(direct, 0))
            per = " ".join(f"{runs[ours][r][0] / runs[direct][r][0]:.2f}"
                           for r in sorted(runs[ours]) if r in runs[direct])
            rows.append((f"{build}: {storm} TLS ≥ direct TLS",
                         f"{ratio:.2f}x (rounds: {per})", "yes" if ratio >= 1.0 else "no"))
    if rows:
        print()
        print("| target | result | met |")
        print("|---|---|---|")
        for row in rows:
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
