#!/usr/bin/env python3
"""The analysis half of scripts/bench-iperf: it reads what iperf3 printed, and turns the raw
measurements of a run into its JSON, its table and its chart.

  bench_iperf.py tcp IPERF_JSON          "<bits per second> <bytes>" the receiver counted
  bench_iperf.py udp IPERF_JSON          "<packets per second> <packets>" the receiver got
  bench_iperf.py report RAW OUT REPS SECONDS MODES
                                         RAW (mode, metric, rep, value per line) -> OUT (JSON),
                                         and the table on stdout
  bench_iperf.py chart JSON PNG          the bar chart (needs matplotlib)
  bench_iperf.py chart-data JSON         "mode tcp1 tcp4" lines for gnuplot

A mode named M-baseline is mode M run from the --baseline-bin build: the report gives every
measurement of M as a ratio to it (new/old), per round and of the medians.
"""

import json
import os
import platform
import statistics
import sys
import time

BASELINE = "-baseline"

METRICS = ["tcp1", "tcp4", "tcp8", "udp_kpps", "udp16_kpps", "rtt", "rtt_med", "rtt_min",
           "rtt_load", "rtt_load_med", "cpu1", "cpu4", "cpu8", "cpu_mpkt", "cpu16_mpkt"]

UNITS = {
    "tcp1": "Gbit/s", "tcp4": "Gbit/s", "tcp8": "Gbit/s",
    "udp_kpps": "thousand 100-byte UDP datagrams/s received (1 flow)",
    "udp16_kpps": "thousand 100-byte UDP datagrams/s received (16 flows)",
    "rtt": "ms (avg)", "rtt_med": "ms (median ping)", "rtt_min": "ms (min)",
    "rtt_load": "ms (avg, while 1 TCP stream runs)",
    "rtt_load_med": "ms (median, while 1 TCP stream runs)",
    "cpu1": "agent CPU s per GB (1 stream)", "cpu4": "agent CPU s per GB (4 streams)",
    "cpu8": "agent CPU s per GB (8 streams)",
    "cpu_mpkt": "agent CPU s per million datagrams received (UDP, 1 flow)",
    "cpu16_mpkt": "agent CPU s per million datagrams received (UDP, 16 flows)",
}

COLUMNS = [("TCP 1 st Gbit/s", "tcp1", "%.2f"), ("TCP 4 st Gbit/s", "tcp4", "%.2f"),
           ("TCP 8 st Gbit/s", "tcp8", "%.2f"), ("UDP 100 B kpps", "udp_kpps", "%.0f"),
           ("UDP 100 B x16 kpps", "udp16_kpps", "%.0f"), ("ping ms median", "rtt_med", "%.3f"),
           ("ping under load ms median", "rtt_load_med", "%.3f"), ("CPU s/GB 1 st", "cpu1", "%.2f"),
           ("CPU s/GB 8 st", "cpu8", "%.2f"), ("CPU s/M pkts x16", "cpu16_mpkt", "%.2f")]

# What the new/old comparison shows: throughput, small packets and the CPU they cost.
COMPARED = [("TCP 1 st", "tcp1"), ("TCP 8 st", "tcp8"), ("UDP 100 B", "udp_kpps"),
            ("CPU s/GB 1 st", "cpu1"), ("CPU s/M pkts x16", "cpu16_mpkt")]


def tcp(path):
    r = json.load(open(path))
    s = r["end"]["sum_received"]
    print(f'{s["bits_per_second"]:.0f} {s["bytes"]}')


def udp(path):
    s = json.load(open(path))["end"]["sum"]
    got = s["packets"] - s["lost_packets"]
    print(f'{got / s["seconds"]:.0f} {got}')


def ratios(runs, base_runs):
    """Median ratio and the ratio of each round (rep i of both ran minutes apart)."""
    out = {}
    if base_runs and statistics.median(base_runs) > 0:
        out["median"] = statistics.median(runs) / statistics.median(base_runs)
    if len(runs) == len(base_runs) and all(base_runs):
        out["per_round"] = [x / b for x, b in zip(runs, base_runs)]
    return out


def results(raw, modes):
    vals = {}
    for line in open(raw):
        mode, metric, _rep, v = line.rstrip("\n").split("\t")
        vals.setdefault(mode, {}).setdefault(metric, []).append(float(v))
    res = {}
    for mode in modes:
        if mode not in vals:
            continue
        res[mode] = {m: {"median": statistics.median(vals[mode][m]), "runs": vals[mode][m]}
                     for m in METRICS if m in vals[mode]}
    kernel = res.get("kernel-vxlan", {})
    for mode, r in res.items():
        old = res.get(mode + BASELINE, {})
        for m, v in r.items():
            if m in kernel:
                k = ratios(v["runs"], kernel[m]["runs"])
                if "median" in k:
                    v["ratio_to_kernel_vxlan"] = k["median"]
                if "per_round" in k:
                    v["ratio_per_round"] = k["per_round"]
            if m in old:
                v["ratio_to_baseline"] = ratios(v["runs"], old[m]["runs"])
    return res


def table(res, reps, secs):
    def cell(mode, m, fmt):
        v = res[mode].get(m)
        if v is None:
            return "n/a"
        s = fmt % v["median"]
        if "ratio_to_kernel_vxlan" in v and not m.startswith("cpu"):
            s += " (%.2fx)" % v["ratio_to_kernel_vxlan"]
        return s

    rows = [["mode"] + [c[0] for c in COLUMNS]]
    for mode in res:
        rows.append([mode] + [cell(mode, m, f) for _, m, f in COLUMNS])
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    print(f"\nmedian of {reps} interleaved x {secs} s iperf3 runs, 2 hosts x 1 pod, "
          f"{os.cpu_count()} CPUs; (ratio to kernel-vxlan in this run)")
    print("| " + " | ".join(r.ljust(w[i]) for i, r in enumerate(rows[0])) + " |")
    print("|" + "|".join("-" * (x + 2) for x in w) + "|")
    for r in rows[1:]:
        print("| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(r)) + " |")
    if reps > 1 and "kernel-vxlan" in res:
        print("\nTCP 1 stream / kernel-vxlan in each round:")
        for mode, r in res.items():
            if mode != "kernel-vxlan" and "ratio_per_round" in r.get("tcp1", {}):
                print(f"  {mode}: " + " ".join("%.2f" % x for x in r["tcp1"]["ratio_per_round"]))
    compared = [m for m in res if (m + BASELINE) in res]
    if compared:
        print("\nthis build / the baseline build (--baseline-bin), median, and each round;"
              " above 1 is faster for throughput, costlier for CPU:")
        for mode in compared:
            parts = []
            for label, m in COMPARED:
                r = res[mode].get(m, {}).get("ratio_to_baseline", {})
                if "median" in r:
                    rounds = " ".join("%.2f" % x for x in r.get("per_round", []))
                    parts.append(f"{label} {r['median']:.2f}x [{rounds}]")
            print(f"  {mode}: " + "; ".join(parts))


def report(raw, out, reps, secs, modes):
    reps, secs, modes = int(reps), int(secs), modes.split(",")
    res = results(raw, modes)
    doc = {
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "params": {"reps": reps, "seconds": secs, "ping": "50 x 10 ms", "order": "interleaved"},
        "units": UNITS,
        "results": res,
    }
    json.dump(doc, open(out, "w"), indent=2)
    table(res, reps, secs)


def chart(path, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    doc = json.load(open(path))
    res = doc["results"]
    modes = list(res)
    fig, axes = plt.subplots(1, 4, figsize=(18, 4.5))
    panels = [("tcp1", "TCP 1 stream (Gbit/s)"), ("tcp4", "TCP 4 streams (Gbit/s)"),
              ("udp_kpps", "UDP 100 B (kpps received)"), ("rtt", "ping RTT (ms, lower is better)")]
    for ax, (metric, title) in zip(axes, panels):
        ys = [res[m].get(metric, {}).get("median", 0) for m in modes]
        colors = ["#888888" if m in ("plain", "kernel-vxlan") else "#cc6633" if m == "tinc"
                  else "#99aacc" if m.endswith(BASELINE) else "#3366cc" for m in modes]
        bars = ax.bar(modes, ys, color=colors)
        for b, y in zip(bars, ys):
            label = f"{y:.3f}" if metric == "rtt" else f"{y:.0f}" if metric == "udp_kpps" else f"{y:.2f}"
            ax.annotate(label, (b.get_x() + b.get_width() / 2, y), ha="center", va="bottom",
                        fontsize=8)
        ax.set_title(title)
        ax.tick_params(axis="x", rotation=30)
    p = doc["params"]
    fig.suptitle(f"podnet vs kernel, median of {p['reps']} x {p['seconds']} s, "
                 f"{doc['machine']['cpus']} CPUs, {doc['timestamp']}")
    fig.tight_layout()
    fig.savefig(png, dpi=100)


def chart_data(path):
    res = json.load(open(path))["results"]
    for m, r in res.items():
        print(m, r.get("tcp1", {}).get("median", 0), r.get("tcp4", {}).get("median", 0))


COMMANDS = {"tcp": (tcp, 1), "udp": (udp, 1), "report": (report, 5), "chart": (chart, 2),
            "chart-data": (chart_data, 1)}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(__doc__)
    fn, nargs = COMMANDS[sys.argv[1]]
    if len(sys.argv) != 2 + nargs:
        sys.exit(f"bench_iperf.py {sys.argv[1]}: takes {nargs} arguments\n{__doc__}")
    fn(*sys.argv[2:])
