#!/usr/bin/env bash
# sysbench OLTP (pgsql driver) against PostgreSQL 15 and Borealis, side by side.
#
#   bench/sysbench.sh                        # 20 s per test, 8 threads, 1 table of 10000 rows
#   SB_SECONDS=10 SB_THREADS=4 bench/sysbench.sh
#
# Starts both systems exactly like bench/run.sh (PostgreSQL 15 with default settings and
# durable commits; Borealis via `borealis up`), runs `sysbench oltp_common prepare`
# (--tables=$SB_TABLES --table-size=$SB_TABLE_SIZE) on each, then oltp_point_select,
# oltp_read_only, oltp_read_write, oltp_write_only and oltp_update_index, alternating the
# two systems test by test. Reports tps, qps, p95 latency, and errors per system:
# "ignored errors" (transactions sysbench rolled back and retried, e.g. on 40P01/40001/
# 23505) and fatal errors, verbatim. Requirement: zero of both.
# Writes bench/results/<UTC date>-sysbench.md and .json. Installs sysbench with apt-get
# if it is missing. Env: SB_SECONDS (20), SB_THREADS (8), SB_TABLES (1),
# SB_TABLE_SIZE (10000), BENCH_SYSTEMS, BOREALIS_BIN, BENCH_KEEP, BENCH_OUT (see run.sh).
set -uo pipefail
. "$(dirname "$0")/lib.sh"

SB_SECONDS=${SB_SECONDS:-20}
SB_THREADS=${SB_THREADS:-8}
SB_TABLES=${SB_TABLES:-1}
SB_TABLE_SIZE=${SB_TABLE_SIZE:-10000}
BENCH_SYSTEMS=${BENCH_SYSTEMS:-pg borealis}
BENCH_OUT=${BENCH_OUT:-$BENCH_DIR/results}
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
SB_LUA_DIR=${SB_LUA_DIR:-/usr/share/sysbench}
TESTS=${SB_TESTS:-oltp_point_select oltp_read_only oltp_read_write oltp_write_only oltp_update_index}

if ! command -v sysbench >/dev/null; then
    log "installing sysbench (apt-get install -y sysbench)"
    timeout 600 apt-get install -y sysbench >"$WORK/apt.log" 2>&1 \
        || { timeout 300 apt-get update >>"$WORK/apt.log" 2>&1 && timeout 600 apt-get install -y sysbench >>"$WORK/apt.log" 2>&1; } \
        || die "cannot install sysbench: $(tail -3 "$WORK/apt.log")"
fi
for t in psql jq python3 ss timeout sysbench; do command -v $t >/dev/null || die "missing tool: $t"; done
mkdir -p "$BENCH_OUT" || die "cannot create $BENCH_OUT"

record meta all started "$STAMP"
record meta all config "threads=$SB_THREADS time=${SB_SECONDS}s tables=$SB_TABLES table_size=$SB_TABLE_SIZE"
record meta all host "$(uname -n) $(nproc) cores, $(uname -r); $(sysbench --version)"
record meta all git "$(cd "$REPO_DIR" && git log -1 --format='%h %s' 2>/dev/null | cut -c1-100)"
SYSTEMS=""
if [[ " $BENCH_SYSTEMS " == *" pg "* ]]; then start_pg; SYSTEMS="pg"; fi
if [[ " $BENCH_SYSTEMS " == *" borealis "* ]]; then
    if start_borealis; then SYSTEMS="$SYSTEMS borealis"
        bc=$(cat "$(dirname "$BOREALIS")/../src/.commit" 2>/dev/null)
        record meta all borealis "$("$BOREALIS" --version 2>&1 | head -1) ($BOREALIS${bc:+, built from commit $bc})"
    else log "Borealis did not start: $B_START_ERROR"; record start borealis error "$B_START_ERROR"; fi
fi
[ -n "$SYSTEMS" ] || die "no system to benchmark"

sb() { # TIMEOUT_S SYS TEST COMMAND [extra args]
    local to=$1 sys=$2 test=$3 cmd=$4; shift 4
    local port pw; eval "port=\$PORT_$sys; pw=\$PGPASS_$sys"
    timeout "$to" sysbench "$test" --db-driver=pgsql --pgsql-host=127.0.0.1 --pgsql-port="$port" --pgsql-user=postgres \
        --pgsql-password="$pw" --pgsql-db=postgres --tables="$SB_TABLES" --table-size="$SB_TABLE_SIZE" "$@" "$cmd"
}
errs() { grep -v IGNORED_ERROR "$1" | grep -E -m"${2:-5}" 'FATAL|ERROR|error|failed|Failed' | cut -c1-400 | tr '\n' ' '; }

declare -A BROKEN=()
for sys in $SYSTEMS; do
    log "$sys: sysbench prepare ($SB_TABLES x $SB_TABLE_SIZE rows)"
    t0=$(now)
    sb 600 "$sys" oltp_common prepare >"$WORK/$sys-prepare.out" 2>&1
    rc=$?
    record prepare "$sys" seconds "$(elapsed "$t0" "$(now)")"
    if [ $rc != 0 ]; then
        record prepare "$sys" error "sysbench prepare exit $rc: $(errs "$WORK/$sys-prepare.out")"
        BROKEN[$sys]=1
        log "  $sys prepare FAILED: $(errs "$WORK/$sys-prepare.out" 2)"
    fi
done

for test in $TESTS; do
    for sys in $SYSTEMS; do
        if [ -n "${BROKEN[$sys]:-}" ]; then record "$test" "$sys" error "skipped: prepare failed"; continue; fi
        [ "$sys" = borealis ] && ensure_borealis
        out=$WORK/$sys-$test.out
        record "$test" "$sys" load "$(cut -d' ' -f1 /proc/loadavg)"
        log "$sys $test: $SB_THREADS threads, $SB_SECONDS s"
        SB_TEST=$test SB_LUA_DIR=$SB_LUA_DIR sb $((SB_SECONDS + 120)) "$sys" "$BENCH_DIR/sysbench/logged.lua" run --threads="$SB_THREADS" --time="$SB_SECONDS" \
            --report-interval=0 >"$out" 2>&1
        rc=$?
        tps=$(grep -oP 'transactions:\s+\d+\s+\(\K[0-9.]+' "$out")
        qps=$(grep -oP 'queries:\s+\d+\s+\(\K[0-9.]+' "$out")
        ign=$(grep -oP 'ignored errors:\s+\K\d+' "$out")
        p95=$(grep -oP '95th percentile:\s+\K[0-9.]+' "$out")
        avg=$(grep -oP '^\s+avg:\s+\K[0-9.]+' "$out" | head -1)
        [ -n "$tps" ] && record "$test" "$sys" tps "$tps"
        [ -n "$qps" ] && record "$test" "$sys" qps "$qps"
        [ -n "$ign" ] && record "$test" "$sys" ignored_errors "$ign"
        [ -n "$p95" ] && record "$test" "$sys" p95_ms "$p95"
        [ -n "$avg" ] && record "$test" "$sys" avg_ms "$avg"
        if [ $rc != 0 ] || grep -v IGNORED_ERROR "$out" | grep -qE 'FATAL|ERROR'; then
            record "$test" "$sys" error "sysbench exit $rc: $(errs "$out")"
            log "  $sys $test FAILED (exit $rc): $(errs "$out" 2)"
        fi
        if [ "${ign:-0}" != 0 ]; then
            # bench/sysbench/logged.lua prints each ignored error; keep them, counted
            record "$test" "$sys" ignored_error_texts "$(grep -oP 'IGNORED_ERROR \K.*' "$out" | sed 's/\[query.*//' | sort | uniq -c | sort -rn | head -5 | sed 's/^ *//' | tr '\n' ';')"
        fi
        log "  $sys $test: tps=${tps:-?} qps=${qps:-?} ignored_errors=${ign:-?} p95=${p95:-?} ms"
    done
done

record meta all finished "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
stop_borealis
[ -n "${BOREALIS_LEFTOVERS:-}" ] && record shutdown borealis error "processes left after SIGTERM: $BOREALIS_LEFTOVERS"
stop_pg
cp "$RESULTS" "$BENCH_OUT/$STAMP-sysbench.tsv"
python3 - "$RESULTS" "$BENCH_OUT/$STAMP-sysbench.md" "$BENCH_OUT/$STAMP-sysbench.json" "$TESTS" <<'EOF' || die "report failed"
import json, sys
from collections import defaultdict
src, md, js, tests = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4].split()
d = defaultdict(lambda: defaultdict(dict)); errors = []
for line in open(src, errors="replace"):
    p = line.rstrip("\n").split("\t", 3)
    if len(p) != 4: continue
    k, s, f, v = p
    if f == "error":
        errors.append({"key": k, "system": s, "error": v})
        v = d[k][s].get("error", "") + (" | " if d[k][s].get("error") else "") + v
    d[k][s][f] = v
m = d["meta"]["all"]
def n(k, s, f):
    try: return float(d[k][s][f])
    except Exception: return None
def c(k, s, f):
    v = n(k, s, f)
    if v is not None: return f"{v:,.1f}"
    e = d[k][s].get("error") or d.get("start", {}).get(s, {}).get("error")
    return ("ERROR: " + e[:120].replace("|", "\\|")) if e else "n/a"
L = ["# sysbench (pgsql driver): Borealis vs PostgreSQL 15", "",
     f"- started {m.get('started')}, finished {m.get('finished')}; {m.get('config')}",
     f"- host: {m.get('host')}", f"- git (checkout): {m.get('git')}", f"- Borealis binary: {m.get('borealis')}",
     "- PostgreSQL 15 default settings (fsync=on, synchronous_commit=on); Borealis: real cluster via `borealis up`, through its writer endpoint", "",
     "Ratio = Borealis/PostgreSQL (> 1: Borealis faster). Errors = sysbench's \"ignored errors\" (rolled back and retried) + fatal errors.", "",
     "| test | PG tps | Borealis tps | tps ratio | PG qps | Borealis qps | PG p95 ms | Borealis p95 ms | PG errors | Borealis errors |",
     "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
table = []
for t in tests:
    pt, bt = n(t, "pg", "tps"), n(t, "borealis", "tps")
    r = f"{bt/pt:.2f}×" if pt and bt else "n/a"
    def e(s):
        x = d[t][s].get("ignored_errors", "?")
        return x + (" + FATAL" if d[t][s].get("error") else "")
    L.append(f"| {t} | {c(t,'pg','tps')} | {c(t,'borealis','tps')} | {r} | {c(t,'pg','qps')} | {c(t,'borealis','qps')} | "
             f"{c(t,'pg','p95_ms')} | {c(t,'borealis','p95_ms')} | {e('pg')} | {e('borealis')} |")
    table.append({"test": t, "pg": dict(d[t]["pg"]), "borealis": dict(d[t]["borealis"]),
                  "tps_ratio": (bt / pt) if pt and bt else None})
L += ["", f"prepare: " + "; ".join(f"{s}: {d['prepare'][s].get('seconds','?')} s" for s in d.get("prepare", {}))]
ign = [(t, s_, d[t][s_]["ignored_error_texts"]) for t in tests for s_ in ("pg", "borealis") if d[t][s_].get("ignored_error_texts")]
if ign:
    L += ["", "## Ignored (rolled back and retried) errors, verbatim, with counts", ""] + [f"- `{t}` / {s_}: {x}" for t, s_, x in ign]
if errors:
    L += ["", "## Errors (verbatim)", ""] + [f"- `{x['key']}` / {x['system']}: {x['error']}" for x in errors]
open(md, "w").write("\n".join(L) + "\n")
json.dump({"meta": dict(m), "table": table, "errors": errors}, open(js, "w"), indent=2)
EOF
cat "$BENCH_OUT/$STAMP-sysbench.md"
log "wrote $BENCH_OUT/$STAMP-sysbench.md and .json"
