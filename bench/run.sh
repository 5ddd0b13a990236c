#!/usr/bin/env bash
# Borealis vs PostgreSQL 15, side by side, same machine, same run, reported as ratios.
#
#   bench/run.sh                       # full run, 30 s per point (about 12 minutes)
#   BENCH_SECONDS=20 bench/run.sh      # shorter points
#
# What it does (details in bench/README.md):
#   * starts PostgreSQL 15 (initdb with DEFAULT settings: fsync on, synchronous_commit on)
#     and a Borealis cluster (`borealis up`, the real cluster: control plane, 6 storage
#     nodes, writer, proxy) in a temp dir on free loopback ports;
#   * `pgbench -i -s $BENCH_SCALE` (client-side COPY) on both;
#   * pgbench TPC-B 1 and 8 clients (-M prepared; 8 clients also simple protocol),
#     select-only (-S) 1 and 8 clients (-M prepared), each BENCH_SECONDS; PG and Borealis
#     alternate point by point, one system loaded at a time;
#   * single-client commit latency p50/p99 (autocommit single-row UPDATE, pgbench -l);
#   * resident memory of the Borealis writer (and PSS of both systems) at the end;
#   * optional perf profile of the writer under TPC-B 8 clients (BENCH_PERF=1, default
#     when `perf` exists; an extra run, it does not disturb the measured points);
#   * crash recovery: kill -9 under a write-heavy load (TPC-B 8 clients), time until
#     `select 1` and a write succeed again (Borealis: restarted by its control plane;
#     PostgreSQL: `pg_ctl start` by this script), with the WAL/redo written before.
#   * prints a Markdown table and writes bench/results/<UTC date>.md and .json.
#
# Environment:
#   BENCH_SECONDS   seconds per point (30)       BENCH_SCALE   pgbench scale (10)
#   BENCH_CRASH     1 = run the crash test (1)   BENCH_PERF    1/0 (auto)
#   BENCH_INIT_FALLBACK  if a system's default `pgbench -i` fails, retry it with
#                   `-I <this>` (dtpgv: primary keys before the COPY; "" = no retry)
#   BENCH_SYSTEMS   "pg borealis" (default both) BENCH_KEEP    1 = keep the temp dir
#   BOREALIS_BIN    path of the borealis binary (default target/release/borealis, then
#                   $CARGO_TARGET_DIR/release/borealis, target/bench/release/borealis;
#                   built with `cargo build --release -p borealis` if none exists)
#   BOREALIS_REPLICAS  readers for `borealis up --replicas` (0: compare a lone writer
#                   with a lone PostgreSQL)
#   BENCH_OUT       results directory (bench/results)
#
# Exit status: 0 when the harness worked (even if Borealis failed steps: those are
# recorded in the report), non-zero only on harness errors.
set -uo pipefail
. "$(dirname "$0")/lib.sh"

BENCH_SECONDS=${BENCH_SECONDS:-30}
BENCH_SCALE=${BENCH_SCALE:-10}
BENCH_CRASH=${BENCH_CRASH:-1}
BENCH_INIT_FALLBACK=${BENCH_INIT_FALLBACK-dtpgv}
BENCH_SYSTEMS=${BENCH_SYSTEMS:-pg borealis}
BENCH_OUT=${BENCH_OUT:-$BENCH_DIR/results}
if [ -z "${BENCH_PERF:-}" ]; then command -v perf >/dev/null && BENCH_PERF=1 || BENCH_PERF=0; fi
STAMP=$(date -u +%Y-%m-%dT%H%M%SZ)
MAXAID=$((BENCH_SCALE * 100000))
for t in pgbench psql jq python3 ss timeout; do command -v $t >/dev/null || die "missing tool: $t"; done
mkdir -p "$BENCH_OUT" || die "cannot create $BENCH_OUT"

# ---- start -------------------------------------------------------------------------
SYSTEMS=""
record meta all started "$STAMP"
record meta all bench_seconds "$BENCH_SECONDS"
record meta all scale "$BENCH_SCALE"
record meta all host "$(uname -n) $(nproc) cores, $(awk '/MemTotal/{printf "%.1f GiB", $2/1048576}' /proc/meminfo), $(uname -r)"
record meta all git "$(cd "$REPO_DIR" && git log -1 --format='%h %s' 2>/dev/null | cut -c1-100)"
# the disk's fdatasync rate bounds both systems' commit latency; noted for context
fsync_rate() {
    timeout 60 "$PG_BIN/pg_test_fsync" -s 1 -f "$WORK/fsync.probe" 2>/dev/null \
        | awk '/one 8kB write/{f=1} f && $1=="fdatasync"{print $2" ops/s ("$4" usecs/op)"; exit}'
    rm -f "$WORK/fsync.probe"
}
record meta all fdatasync_before "$(fsync_rate)"
if [[ " $BENCH_SYSTEMS " == *" pg "* ]]; then
    start_pg
    SYSTEMS="pg"
    record meta pg version "$(q pg 'show server_version')"
    PG_LSN0=$(q pg 'select pg_current_wal_lsn()')
fi
if [[ " $BENCH_SYSTEMS " == *" borealis "* ]]; then
    if start_borealis; then
        SYSTEMS="$SYSTEMS borealis"
        bc=$(cat "$(dirname "$BOREALIS")/../src/.commit" 2>/dev/null)
        record meta borealis version "$("$BOREALIS" --version 2>&1 | head -1) ($BOREALIS${bc:+, built from commit $bc})"
        record meta borealis server_version "$(q borealis 'show server_version' 2>&1 | head -1)"
    else
        log "Borealis did not start: $B_START_ERROR"
        record start borealis error "$B_START_ERROR"
    fi
fi
[ -n "$SYSTEMS" ] || die "no system to benchmark"
B_VDL0=$( [[ " $SYSTEMS " == *" borealis "* ]] && bstatus | jq -r '.volume.vdl // empty')

# a system that failed `pgbench -i` is skipped for the pgbench points (recorded)
declare -A BROKEN=()

loadavg() { cut -d' ' -f1 /proc/loadavg; }
first_errors() { grep -E -m"${2:-3}" 'error|ERROR|FATAL|aborted|fatal' "$1" | cut -c1-400 | tr '\n' ' '; }

# pgbench_point KEY SYS pgbench-args...
pgbench_point() {
    local key=$1 sys=$2; shift 2
    if [ -n "${BROKEN[$sys]:-}" ]; then record "$key" "$sys" error "skipped: ${BROKEN[$sys]}"; return; fi
    [ "$sys" = borealis ] && ensure_borealis
    local out=$WORK/$sys-$key.out port pw rc
    eval "port=\$PORT_$sys; pw=\$PGPASS_$sys"
    record "$key" "$sys" load "$(loadavg)"
    log "$sys $key: pgbench $*"
    PGPASSWORD=$pw timeout $((BENCH_SECONDS + 120)) pgbench -h 127.0.0.1 -p "$port" -U postgres "$@" postgres >"$out" 2>&1
    rc=$?
    local tps lat failed processed
    tps=$(grep -oP 'tps = \K[0-9.]+(?= \(without initial connection time\))' "$out")
    lat=$(grep -oP 'latency average = \K[0-9.]+' "$out")
    failed=$(grep -oP 'number of failed transactions: \K[0-9]+' "$out")
    processed=$(grep -oP 'number of transactions actually processed: \K[0-9]+' "$out")
    [ -n "$tps" ] && record "$key" "$sys" tps "$tps"
    [ -n "$lat" ] && record "$key" "$sys" lat_ms "$lat"
    [ -n "$failed" ] && record "$key" "$sys" failed "$failed"
    [ -n "$processed" ] && record "$key" "$sys" processed "$processed"
    grep -q 'Run was aborted' "$out" && record "$key" "$sys" aborted "$(grep -c 'aborted in command' "$out") clients aborted"
    if [ $rc != 0 ] || grep -qE 'ERROR|FATAL|aborted' "$out"; then
        record "$key" "$sys" error "pgbench exit $rc: $(first_errors "$out" 5)"
        log "  $sys $key: FAILED (exit $rc): $(first_errors "$out" 2)"
    fi
    log "  $sys $key: tps=${tps:-?} lat=${lat:-?} ms failed=${failed:-?}"
}

# ---- pgbench -i ------------------------------------------------------------------
for sys in $SYSTEMS; do
    [ "$sys" = borealis ] && ensure_borealis
    eval "port=\$PORT_$sys; pw=\$PGPASS_$sys"
    log "$sys: pgbench -i -s $BENCH_SCALE (client-side COPY)"
    t0=$(now)
    PGPASSWORD=$pw timeout 900 pgbench -i -s "$BENCH_SCALE" -h 127.0.0.1 -p "$port" -U postgres postgres \
        >"$WORK/$sys-init.out" 2>&1
    rc=$?; t1=$(now)
    record init "$sys" load "$(loadavg)"
    if [ $rc = 0 ]; then
        record init "$sys" seconds "$(elapsed "$t0" "$t1")"
        n=$(q "$sys" 'select count(*) from pgbench_accounts')
        [ "$n" = "$MAXAID" ] || record init "$sys" error "pgbench_accounts has '$n' rows, expected $MAXAID"
    else
        e="pgbench -i exit $rc: $(first_errors "$WORK/$sys-init.out" 5)"
        record init "$sys" error "$e"
        log "  $sys: $e"
        BROKEN[$sys]="pgbench -i failed"
        if [ -n "$BENCH_INIT_FALLBACK" ]; then
            # same data, other order of steps (e.g. primary keys before the COPY), so the
            # remaining points can still run; the report says so
            if [ "$sys" = borealis ] && ensure_borealis; then
                # an engine error can leave the writer's session state unusable; start
                # from a fresh writer (killed, restarted by the control plane)
                log "borealis: restarting the writer before the retry (borealis node kill instance-1)"
                timeout 30 "$BOREALIS" node kill instance-1 --data-dir "$B_DATA" >>"$WORK/borealis/node.log" 2>&1
                sleep 1
                for _ in $(seq 1 300); do [ "$(Q_TIMEOUT=5 q borealis 'select 1')" = 1 ] && break; sleep 0.2; done
                record init_fallback borealis note_restart "writer restarted (node kill instance-1) before the retry"
            fi
            log "$sys: retrying with pgbench -i -I $BENCH_INIT_FALLBACK -s $BENCH_SCALE"
            t0=$(now)
            PGPASSWORD=$pw timeout 900 pgbench -i -I "$BENCH_INIT_FALLBACK" -s "$BENCH_SCALE" -h 127.0.0.1 -p "$port" \
                -U postgres postgres >"$WORK/$sys-init-fallback.out" 2>&1
            rc=$?; t1=$(now)
            n=$(q "$sys" 'select count(*) from pgbench_accounts')
            if [ $rc = 0 ] && [ "$n" = "$MAXAID" ]; then
                record init_fallback "$sys" seconds "$(elapsed "$t0" "$t1")"
                record init_fallback "$sys" note "pgbench -i -I $BENCH_INIT_FALLBACK after the default init failed"
                unset "BROKEN[$sys]"
            else
                record init_fallback "$sys" error "pgbench -i -I $BENCH_INIT_FALLBACK exit $rc, $n rows: $(first_errors "$WORK/$sys-init-fallback.out" 5)"
            fi
            log "  $sys: fallback init exit $rc in $(elapsed "$t0" "$t1") s"
        fi
    fi
    log "  $sys: init $(elapsed "$t0" "$t1") s"
done

# ---- pgbench points ----------------------------------------------------------------
S=$BENCH_SECONDS
POINTS=(
    "tpcb_c1_prepared|-c 1 -j 1 -M prepared -T $S"
    "tpcb_c8_prepared|-c 8 -j 2 -M prepared -T $S"
    "tpcb_c8_simple|-c 8 -j 2 -T $S"
    "select_c1_prepared|-S -c 1 -j 1 -M prepared -T $S"
    "select_c8_prepared|-S -c 8 -j 2 -M prepared -T $S"
)
for p in "${POINTS[@]}"; do
    key=${p%%|*}; args=${p#*|}
    for sys in $SYSTEMS; do pgbench_point "$key" "$sys" $args; done
done

# ---- single-client commit latency -------------------------------------------------
cat >"$WORK/commit.sql" <<'EOF'
\set aid random(1, :maxaid)
UPDATE pgbench_accounts SET abalance = abalance + 1 WHERE aid = :aid;
EOF
for sys in $SYSTEMS; do
    rm -f "$WORK/lat-$sys".*
    pgbench_point commit_c1 "$sys" -n -f "$WORK/commit.sql" -D maxaid=$MAXAID -c 1 -j 1 -M prepared -T "$S" \
        -l --log-prefix="$WORK/lat-$sys"
    f=$(ls "$WORK/lat-$sys".* 2>/dev/null | head -1)
    if [ -n "$f" ]; then
        read -r p50 p99 p999 n < <(awk '{print $3}' "$f" | sort -n | awk '{a[NR]=$1} END{
            if (NR==0) {print "- - - 0"; exit}
            i50=int(NR*0.50); if(i50<1)i50=1; i99=int(NR*0.99); if(i99<1)i99=1; i999=int(NR*0.999); if(i999<1)i999=1;
            printf "%.3f %.3f %.3f %d\n", a[i50]/1000, a[i99]/1000, a[i999]/1000, NR}')
        record commit_c1 "$sys" p50_ms "$p50"
        record commit_c1 "$sys" p99_ms "$p99"
        record commit_c1 "$sys" p999_ms "$p999"
        record commit_c1 "$sys" samples "$n"
        log "  $sys commit latency: p50=$p50 ms p99=$p99 ms ($n samples)"
    fi
done

# ---- memory at the end of the run -------------------------------------------------
if [[ " $SYSTEMS " == *" pg "* ]]; then
    pids=$(pg_pids)
    record memory pg postmaster_rss_kb "$(rss_kb "$(pg_postmaster_pid)")"
    record memory pg total_pss_kb "$(pss_kb_sum $pids)"
fi
if [[ " $SYSTEMS " == *" borealis "* ]]; then
    wpid=$(borealis_writer_pid)
    if [ -n "$wpid" ]; then
        record memory borealis writer_rss_kb "$(rss_kb "$wpid")"
        record memory borealis writer_pss_kb "$(pss_kb_sum "$wpid")"
    else
        record memory borealis error "no writer pid in borealis status --json: $(bstatus | head -c 300)"
    fi
    record memory borealis total_pss_kb "$(pss_kb_sum $(borealis_pids))"
    record memory borealis per_process_rss_mib "$(for p in $(borealis_pids); do
        echo "$(proc_name "$p") $(( $(rss_kb "$p" || echo 0) / 1024 ))"; done | sort -k2 -rn | tr '\n' ';')"
fi

# cpu_snapshot: "pid name ticks" for every cluster process (name from --name, else the subcommand)
cpu_snapshot() {
    local p name
    for p in $(borealis_pids); do
        [ -r "/proc/$p/stat" ] || continue
        echo "$p $(proc_name "$p") $(awk '{print $14+$15}' "/proc/$p/stat")"
    done | LC_ALL=C sort
}

# ---- perf profile of the writer (extra run, not a measured point) -----------------
if [ "$BENCH_PERF" = 1 ] && [[ " $SYSTEMS " == *" borealis "* ]] && [ -z "${BROKEN[borealis]:-}" ]; then
    wpid=$(borealis_writer_pid)
    if [ -n "$wpid" ]; then
        log "perf: profiling the writer (pid $wpid) for 10 s under TPC-B 8 clients"
        PGPASSWORD=$PGPASS_borealis timeout 60 pgbench -h 127.0.0.1 -p "$PORT_borealis" -U postgres -n \
            -c 8 -j 2 -M prepared -T 14 postgres >"$WORK/perf-pgbench.out" 2>&1 &
        pb=$!
        cpu_snapshot >"$WORK/cpu0.txt"; c0=$(now)
        sleep 2
        spid=$(bstatus | jq -r '[.storage_nodes[]? | select(.name=="storage-a1")][0].pid // empty')
        sp=
        if [ -n "$spid" ]; then
            timeout 30 perf record -F 499 -g -p "$spid" -o "$WORK/perf-storage.data" -- sleep 10 \
                >"$WORK/perf-record-storage.log" 2>&1 &
            sp=$!
        fi
        timeout 30 perf record -F 499 -g -p "$wpid" -o "$WORK/perf.data" -- sleep 10 >"$WORK/perf-record.log" 2>&1
        wait $pb
        [ -n "$sp" ] && wait $sp
        cpu_snapshot >"$WORK/cpu1.txt"; c1=$(now)
        # CPU used per cluster process during the 14 s TPC-B run (utime+stime), as % of
        # one core and in microseconds per transaction (the figure that decides
        # throughput on a CPU-bound 2-core machine)
        ntx=$(grep -oP 'actually processed: \K[0-9]+' "$WORK/perf-pgbench.out"); ntx=${ntx:-0}
        LC_ALL=C join "$WORK/cpu0.txt" "$WORK/cpu1.txt" | awk -v dt="$(elapsed "$c0" "$c1")" -v hz="$(getconf CLK_TCK)" -v n="$ntx" \
            '{printf "%s %.0f%% %.0f us/txn\n", $2, ($5-$3)/hz/dt*100, (n > 0 ? ($5-$3)/hz*1e6/n : 0)}' | sort -k2 -t' ' -rn >"$WORK/cpu-split.txt"
        record perf borealis cpu_split_tpcb8 "$(tr '\n' ';' <"$WORK/cpu-split.txt") pgbench: $(grep -oP 'tps = \K[0-9.]+' "$WORK/perf-pgbench.out") tps under perf"
        perf_top() { timeout 120 perf report -i "$1" --stdio --no-children --sort symbol --percent-limit 0.3 \
            -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/[ -]*$//; s/^ *//' | cut -c1-160 | head -40; }
        { echo "# writer instance (pid $wpid), self time by symbol"; perf_top "$WORK/perf.data"; } >"$WORK/perf-top.txt"
        [ -f "$WORK/perf-storage.data" ] && { echo; echo "# storage node storage-a1 (pid $spid), self time by symbol"
            perf_top "$WORK/perf-storage.data"; } >>"$WORK/perf-top.txt"
        timeout 120 perf report -i "$WORK/perf.data" --stdio --no-children --sort dso \
            -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | sed 's/ *$//' | head -12 >"$WORK/perf-dso.txt"
        cp "$WORK/perf-top.txt" "$BENCH_OUT/$STAMP-perf.txt" 2>/dev/null
        { echo; echo "# writer by shared object"; cat "$WORK/perf-dso.txt"
          echo; echo "# CPU per cluster process during the profiled TPC-B 8-client run (% of one core)"; cat "$WORK/cpu-split.txt"; } >>"$BENCH_OUT/$STAMP-perf.txt"
        record perf borealis file "$STAMP-perf.txt"
    fi
fi

# ---- crash recovery ---------------------------------------------------------------
# wait_sql SYS SQL DEADLINE_S: loop until SQL succeeds; prints seconds since $T_KILL
wait_sql() {
    local sys=$1 sql=$2 deadline=$((SECONDS + $3)) out
    while [ $SECONDS -lt $deadline ]; do
        out=$(Q_TIMEOUT=5 q "$sys" "$sql") && { elapsed "$T_KILL" "$(now)"; return 0; }
        sleep 0.02
    done
    echo "$out" >"$WORK/last_err"
    return 1
}
# sum(abalance)|sum(tbalance)|sum(bbalance), one query each (no scalar subqueries)
tpcb_sums() {
    local a t b
    a=$(q "$1" "select sum(abalance) from pgbench_accounts" | head -1)
    t=$(q "$1" "select sum(tbalance) from pgbench_tellers" | head -1)
    b=$(q "$1" "select sum(bbalance) from pgbench_branches" | head -1)
    echo "$a|$t|$b"
}
crash_test() {
    local sys=$1 port pw pb
    eval "port=\$PORT_$sys; pw=\$PGPASS_$sys"
    [ -n "${BROKEN[$sys]:-}" ] && { record crash "$sys" error "skipped: ${BROKEN[$sys]}"; return; }
    [ "$sys" = borealis ] && ensure_borealis
    # TPC-B adds the same delta to one account, teller and branch, so after recovery
    # sum(tbalance) = sum(bbalance) and sum(abalance) - sum(tbalance) is unchanged
    # (the commit-latency script moved abalance alone, hence the baseline).
    local base; base=$(tpcb_sums "$sys")
    log "$sys crash test: write-heavy load (TPC-B 8 clients) for $S s, then kill -9"
    PGPASSWORD=$pw timeout $((S + 120)) pgbench -h 127.0.0.1 -p "$port" -U postgres -n -c 8 -j 2 -M prepared \
        -T $((S + 30)) postgres >"$WORK/$sys-crashload.out" 2>&1 &
    pb=$!
    sleep "$S"
    local victims
    if [ "$sys" = pg ]; then
        local w; w=$(q pg "select pg_wal_lsn_diff(pg_current_wal_lsn(), '$PG_LSN0'), pg_wal_lsn_diff(pg_current_wal_lsn(), redo_lsn) from pg_control_checkpoint()")
        record crash pg wal_total_bytes "${w%%|*}"
        record crash pg wal_since_checkpoint_bytes "${w##*|}"
        # Stopped first, the postmaster cannot fork a backend between the listing
        # and the kill: one that escaped kept the shared memory attached, and the
        # restart refused ("pre-existing shared memory block is still in use").
        kill -STOP "$(pg_postmaster_pid)" 2>/dev/null
        victims=$(pg_pids)
    else
        local st; st=$(bstatus)
        record crash borealis vdl_records "$(echo "$st" | jq -r '.volume.vdl')"
        [ -n "$B_VDL0" ] && record crash borealis redo_records_since_start "$(( $(echo "$st" | jq -r '.volume.vdl') - B_VDL0 ))"
        record crash borealis data_dir_bytes "$(du -sb "$B_DATA" | cut -f1)"
        victims=$(echo "$st" | jq -r '[.instances[]? | select(.role=="writer" or .name=="instance-1")][0].pid // empty')
        [ -n "$victims" ] || { record crash borealis error "no writer pid in status"; kill $pb 2>/dev/null; wait $pb; return; }
    fi
    record crash "$sys" killed_pids "$victims"
    T_KILL=$(now)
    kill -9 $victims
    local t
    if [ "$sys" = pg ]; then
        # runuser stops itself when its child (the postmaster) is stopped, like su;
        # stopped, it would never reap the killed postmaster.
        kill -CONT "$PG_WRAPPER_PID" 2>/dev/null
        wait "$PG_WRAPPER_PID" 2>/dev/null   # reaps the postmaster (see pg_ctl_start)
        wait_gone $victims || log "WARNING: killed PostgreSQL processes still there after 10 s"
        pg_ctl_start || record crash pg error "pg_ctl start failed: $(tail -3 "$WORK/pg/server.log" | tr '\n' ' ')"
    fi
    if t=$(wait_sql "$sys" "select 1" 120); then
        record crash "$sys" to_select1_s "$t"
        log "  $sys: serving again after $t s"
    else
        record crash "$sys" error "not serving 120 s after kill -9: $(cat "$WORK/last_err" 2>/dev/null)"
    fi
    if t=$(wait_sql "$sys" "update pgbench_branches set bbalance = bbalance where bid = 1" 60); then
        record crash "$sys" to_write_s "$t"
    else
        record crash "$sys" error "no write 60 s after kill -9: $(cat "$WORK/last_err" 2>/dev/null)"
    fi
    wait $pb 2>/dev/null
    record crash "$sys" load_client_errors "$(first_errors "$WORK/$sys-crashload.out" 2)"
    if [ "$sys" = pg ]; then
        record crash pg redo_log "$(grep -E 'redo (starts|done)' "$WORK/pg/server.log" | tail -2 | sed 's/^.*LOG: *//' | tr '\n' ' ')"
    else
        record crash borealis new_writer_pid "$(borealis_writer_pid)"
    fi
    local sums; sums=$(tpcb_sums "$sys")
    record crash "$sys" sums_a_t_b_before_load "$base"
    record crash "$sys" sums_a_t_b_after_recovery "$sums"
    local a0 t0_ b0 a1 t1_ b1
    IFS='|' read -r a0 t0_ b0 <<<"$base"; IFS='|' read -r a1 t1_ b1 <<<"$sums"
    if [[ "$a0$t0_$a1$t1_$b1" =~ ^[-0-9]+$ ]] && [ $((a1 - t1_)) = $((a0 - t0_)) ] && [ "$t1_" = "$b1" ]; then
        record crash "$sys" consistent yes
    else record crash "$sys" consistent "NO: $sums"; fi
}
if [ "$BENCH_CRASH" = 1 ]; then
    for sys in $SYSTEMS; do crash_test "$sys"; done
fi

# ---- report -----------------------------------------------------------------------
record meta all fdatasync_after "$(fsync_rate)"
record meta all finished "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
stop_borealis
[ -n "${BOREALIS_LEFTOVERS:-}" ] && record shutdown borealis error "processes left after SIGTERM: $BOREALIS_LEFTOVERS"
stop_pg
cp "$RESULTS" "$BENCH_OUT/$STAMP.tsv"
python3 "$BENCH_DIR/report.py" "$RESULTS" "$BENCH_OUT/$STAMP.md" "$BENCH_OUT/$STAMP.json" || die "report.py failed"
cat "$BENCH_OUT/$STAMP.md"
log "wrote $BENCH_OUT/$STAMP.md and $BENCH_OUT/$STAMP.json"
