#!/usr/bin/env python3
"""Turns the harness's results TSV (key, system, field, value) into a Markdown report
and a JSON document. Usage: report.py RESULTS.tsv OUT.md OUT.json [TITLE]

Ratios are oriented so that > 1 always means Borealis is better:
  throughput: Borealis / PostgreSQL;  latency and times: PostgreSQL / Borealis.
Memory and sizes are informational (Borealis / PostgreSQL, lower is leaner)."""
import json
import sys
from collections import defaultdict

src, out_md, out_json = sys.argv[1:4]
title = sys.argv[4] if len(sys.argv) > 4 else "Borealis vs PostgreSQL 15 (pgbench)"

data = defaultdict(lambda: defaultdict(dict))
errors = []
for line in open(src, encoding="utf-8", errors="replace"):
    parts = line.rstrip("\n").split("\t", 3)
    if len(parts) != 4:
        continue
    key, system, field, value = parts
    if field == "error":
        prev = data[key][system].get("error")
        value = value if not prev else prev + " | " + value
        errors.append({"key": key, "system": system, "error": parts[3]})
    data[key][system][field] = value
meta = data.get("meta", {})
allm = meta.get("all", {})


def num(key, system, field):
    try:
        return float(data[key][system][field])
    except (KeyError, ValueError, TypeError):
        return None


def fmt(v, digits=1):
    if v is None:
        return None
    if abs(v) >= 1000:
        return f"{v:,.0f}"
    return f"{v:.{digits}f}" if digits else f"{v:.0f}"


def aborted(key, system):
    return bool(data[key][system].get("aborted"))


def cell(key, system, field, digits=1, scale=1.0):
    v = num(key, system, field)
    if v is not None and aborted(key, system):
        err = data[key][system].get("error", "")
        return (f"ABORTED ({data[key][system]['aborted']}; {fmt(v * scale, digits)} before): "
                + err[:160].replace("|", "\\|"))
    if v is not None:
        s = fmt(v * scale, digits)
        failed = num(key, system, "failed")
        if failed:
            s += f" ({failed:.0f} failed)"
        if data[key][system].get("error"):
            s += " ⚠"
        return s
    err = data[key][system].get("error") or data.get("start", {}).get(system, {}).get("error")
    if err:
        return "ERROR: " + err[:160].replace("|", "\\|")
    return "n/a"


# (key, field, label, kind, digits, scale) kind: higher | lower | info
ROWS = [
    ("tpcb_c1_prepared", "tps", "TPC-B, 1 client, -M prepared: tps", "higher", 1, 1),
    ("tpcb_c8_prepared", "tps", "TPC-B, 8 clients, -M prepared: tps", "higher", 1, 1),
    ("tpcb_c8_simple", "tps", "TPC-B, 8 clients, simple protocol: tps", "higher", 1, 1),
    ("select_c1_prepared", "tps", "select-only, 1 client, -M prepared: tps", "higher", 1, 1),
    ("select_c8_prepared", "tps", "select-only, 8 clients, -M prepared: tps", "higher", 1, 1),
    ("tpcb_c1_prepared", "lat_ms", "TPC-B, 1 client: avg latency ms", "lower", 3, 1),
    ("tpcb_c8_prepared", "lat_ms", "TPC-B, 8 clients, prepared: avg latency ms", "lower", 3, 1),
    ("tpcb_c8_simple", "lat_ms", "TPC-B, 8 clients, simple: avg latency ms", "lower", 3, 1),
    ("select_c1_prepared", "lat_ms", "select-only, 1 client: avg latency ms", "lower", 3, 1),
    ("select_c8_prepared", "lat_ms", "select-only, 8 clients: avg latency ms", "lower", 3, 1),
    ("commit_c1", "p50_ms", "commit latency p50 ms (1 client, 1-row UPDATE, autocommit)", "lower", 3, 1),
    ("commit_c1", "p99_ms", "commit latency p99 ms", "lower", 3, 1),
    ("commit_c1", "tps", "commit throughput, 1 client: tps", "higher", 1, 1),
    ("init", "seconds", "pgbench -i (client-side COPY): s", "lower", 2, 1),
    ("init_fallback", "seconds", "pgbench -i retried with -I dtpgv (PKs before COPY): s", "lower", 2, 1),
    ("crash", "to_select1_s", "crash (kill -9 under load) to `select 1`: s", "lower", 3, 1),
    ("crash", "to_write_s", "crash to first write: s", "lower", 3, 1),
    ("memory", "writer_rss_kb", "writer RSS at end, MiB (PG: postmaster)", "info", 1, 1 / 1024),
    ("memory", "total_pss_kb", "all processes PSS at end, MiB", "info", 1, 1 / 1024),
]
PG_ALIASES = {("memory", "writer_rss_kb"): "postmaster_rss_kb"}

lines = []
lines.append(f"# {title}")
lines.append("")
lines.append(f"- started: {allm.get('started', '?')}, finished: {allm.get('finished', '?')}")
lines.append(f"- BENCH_SECONDS={allm.get('bench_seconds', '?')} per point, pgbench scale {allm.get('scale', '?')}")
lines.append(f"- host: {allm.get('host', '?')}")
lines.append(f"- git (checkout running the harness): {allm.get('git', '?')}")
lines.append(f"- disk fdatasync rate (pg_test_fsync, 8 kB writes): before {allm.get('fdatasync_before', '?')}, after {allm.get('fdatasync_after', '?')}")
lines.append(f"- PostgreSQL: {meta.get('pg', {}).get('version', '?')} (Debian package, default settings, fsync=on, synchronous_commit=on)")
lines.append(f"- Borealis: {meta.get('borealis', {}).get('version', '?')}, real cluster via `borealis up` "
             f"(control plane, 6 storage nodes in 3 AZs, writer, writer endpoint proxy); "
             f"server_version {meta.get('borealis', {}).get('server_version', '?')}")
lines.append("- both over TCP on 127.0.0.1; Borealis through its writer endpoint (the proxy)")
lines.append("")
lines.append("Ratio: **> 1 means Borealis is better**. Throughput: Borealis/PostgreSQL; latency and "
             "times: PostgreSQL/Borealis; memory: Borealis/PostgreSQL (informational, lower is leaner).")
lines.append("")
lines.append("| metric | PostgreSQL 15 | Borealis | ratio |")
lines.append("| --- | ---: | ---: | ---: |")
table = []
for key, field, label, kind, digits, scale in ROWS:
    pgf = PG_ALIASES.get((key, field), field)
    if key not in data:
        continue
    pv, bv = num(key, "pg", pgf), num(key, "borealis", field)
    ratio = None
    if key in data and any(aborted(key, x) for x in ("pg", "borealis")):
        pass
    elif pv is not None and bv is not None and pv > 0 and bv > 0:
        ratio = bv / pv if kind in ("higher", "info") else pv / bv
    rs = "n/a" if ratio is None else f"{ratio:.2f}×"
    if kind == "info" and ratio is not None:
        rs += " (B/PG)"
    lines.append(f"| {label} | {cell(key, 'pg', pgf, digits, scale)} | {cell(key, 'borealis', field, digits, scale)} | {rs} |")
    table.append({"metric": label, "key": key, "field": field, "kind": kind,
                  "pg": pv * scale if pv is not None else None,
                  "borealis": bv * scale if bv is not None else None,
                  "ratio_borealis_better_if_gt_1": ratio})

# raw pgbench points
lines.append("")
lines.append("## Raw pgbench points")
lines.append("")
lines.append("| point | system | tps | avg latency ms | failed tx | processed tx | aborted | load avg before | error |")
lines.append("| --- | --- | ---: | ---: | ---: | ---: | --- | ---: | --- |")
for key in ["init", "init_fallback", "tpcb_c1_prepared", "tpcb_c8_prepared", "tpcb_c8_simple", "select_c1_prepared",
            "select_c8_prepared", "commit_c1"]:
    for system in ["pg", "borealis"]:
        d = data.get(key, {}).get(system)
        if not d:
            continue
        err = (d.get("error") or "").replace("|", "\\|")
        lines.append(f"| {key} | {system} | {d.get('tps', d.get('seconds', '') + (' s' if 'seconds' in d else ''))} | "
                     f"{d.get('lat_ms', '')} | {d.get('failed', '')} | {d.get('processed', '')} | {d.get('aborted', '')} | {d.get('load', '')} | {err} |")

c = data.get("commit_c1", {})
if c:
    lines.append("")
    lines.append("Commit latency percentiles (ms, from `pgbench -l` per-transaction log): " + "; ".join(
        f"{s}: p50 {c[s].get('p50_ms', '?')}, p99 {c[s].get('p99_ms', '?')}, p99.9 {c[s].get('p999_ms', '?')} "
        f"({c[s].get('samples', '?')} samples)" for s in ["pg", "borealis"] if s in c))

cr = data.get("crash", {})
if cr:
    lines.append("")
    lines.append("## Crash recovery (kill -9 under TPC-B 8-client load)")
    lines.append("")
    for s, name in [("pg", "PostgreSQL 15"), ("borealis", "Borealis")]:
        if s not in cr:
            continue
        d = cr[s]
        lines.append(f"- **{name}**: " + "; ".join(f"{k} = {v}" for k, v in d.items()))
    lines.append("")
    lines.append("PostgreSQL's postmaster and backends are all killed and `postgres` is started again by this "
                 "script right after the kill, as a supervisor would (its time includes PG 15's start-up fsync "
                 "of the data directory and the end-of-recovery checkpoint); Borealis's writer instance is "
                 "killed and restarted by its own control plane. Times are from the kill to the first "
                 "successful statement through the same endpoint the clients use. `consistent` checks the "
                 "TPC-B invariant after recovery (sum of teller balances = sum of branch balances, and "
                 "accounts minus tellers unchanged).")

mem = data.get("memory", {})
if mem:
    lines.append("")
    lines.append("Memory at the end of the run: " + "; ".join(
        f"{s}: " + ", ".join(f"{k} = {v}" for k, v in mem[s].items()) for s in mem))

if errors:
    lines.append("")
    lines.append("## Errors seen (verbatim)")
    lines.append("")
    for e in errors:
        lines.append(f"- `{e['key']}` / {e['system']}: {e['error']}")

pf = data.get("perf", {}).get("borealis", {})
if pf.get("cpu_split_tpcb8"):
    lines.append("")
    lines.append("CPU per Borealis process under TPC-B 8 clients (extra 14 s run, % of one core): "
                 + pf["cpu_split_tpcb8"])
if pf.get("file"):
    lines.append("")
    lines.append(f"Writer profile under TPC-B 8 clients (perf, 10 s): see `{pf['file']}`.")

open(out_md, "w").write("\n".join(lines) + "\n")
doc = {"meta": {s: dict(v) for s, v in meta.items()}, "table": table,
       "raw": {k: {s: dict(v) for s, v in d.items()} for k, d in data.items() if k != "meta"},
       "errors": errors}
json.dump(doc, open(out_json, "w"), indent=2)
