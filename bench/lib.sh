# Shared helpers for bench/run.sh and bench/sysbench.sh (sourced, not executed).
#
# Provides: PostgreSQL 15 and Borealis start/stop in a temp dir on free ports, bounded
# waits, connection helpers, a results log (TSV) and cleanup on exit.
#
# Conventions: a "system" is `pg` or `borealis`. After start_pg/start_borealis:
#   PORT_pg / PORT_borealis          the port to connect to (127.0.0.1, TCP)
#   PGPASS_pg / PGPASS_borealis      password (PG uses trust auth, the value is unused)
# Every wait is bounded; failures are recorded, never fatal unless it is a harness error.

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$BENCH_DIR/.." && pwd)

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
[ -x "$PG_BIN/postgres" ] || PG_BIN=$(dirname "$(command -v postgres 2>/dev/null || echo /nonexistent/postgres)")

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "HARNESS ERROR: $*"; exit 2; }
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN{printf "%.3f", b-a}'; }

# Work dir for this run (temp data dirs, logs, raw outputs). Kept with BENCH_KEEP=1.
WORK=$(mktemp -d "${BENCH_TMP:-/tmp}/borealis-bench.XXXXXX") || die "mktemp failed"
chmod 755 "$WORK"

# ---- port selection ---------------------------------------------------------------
port_in_use() { ss -Htln "sport = :$1" 2>/dev/null | grep -q .; }
# free_port N: a base port P such that P..P+N-1 are all free (below the ephemeral range).
free_port() {
    local n=$1 p i ok
    for _ in $(seq 1 200); do
        p=$(( 20000 + (RANDOM % 10000) ))
        ok=1
        for ((i = 0; i < n; i++)); do port_in_use $((p + i)) && { ok=0; break; }; done
        [ $ok = 1 ] && { echo "$p"; return 0; }
    done
    return 1
}

# ---- psql helpers -----------------------------------------------------------------
# q SYS SQL: run one statement, print unaligned tuples-only output; bounded.
q() {
    local sys=$1 sql=$2 port pw
    eval "port=\$PORT_$sys; pw=\$PGPASS_$sys"
    PGPASSWORD=$pw PGCONNECT_TIMEOUT=5 timeout "${Q_TIMEOUT:-60}" \
        psql -X -q -At -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "$sql" 2>&1
}

# ---- PostgreSQL 15 ----------------------------------------------------------------
PG_DATA=$WORK/pg/data
PG_STARTED=0
as_postgres() {
    if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}
# The postmaster runs as a (grand)child of this script (runuser waits for it), so a
# killed postmaster is reaped at once: with pg_ctl it would be re-parented to PID 1,
# which on these VMs reaps lazily, and a zombie postmaster makes the next start refuse
# ("lock file postmaster.pid already exists"). Readiness is awaited like pg_ctl -w.
PG_WRAPPER_PID=
pg_ctl_start() {
    setsid runuser -u postgres -- "$PG_BIN/postgres" -D "$PG_DATA" -p "$PORT_pg" -k "$WORK/pg" \
        -c listen_addresses=127.0.0.1 >>"$WORK/pg/server.log" 2>&1 </dev/null &
    PG_WRAPPER_PID=$!
    local deadline=$((SECONDS + 120))
    while [ $SECONDS -lt $deadline ]; do
        kill -0 "$PG_WRAPPER_PID" 2>/dev/null || return 1
        "$PG_BIN/pg_isready" -q -h 127.0.0.1 -p "$PORT_pg" -U postgres -d postgres -t 2 && return 0
        sleep 0.02
    done
    return 1
}
start_pg() {
    PORT_pg=$(free_port 1) || die "no free port for PostgreSQL"
    PGPASS_pg=unused
    mkdir -p "$WORK/pg"
    [ "$(id -u)" = 0 ] && chown postgres: "$WORK/pg"
    log "PostgreSQL: initdb in $PG_DATA (default settings, fsync on, synchronous_commit on)"
    as_postgres "$PG_BIN/initdb" -D "$PG_DATA" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 \
        >"$WORK/pg/initdb.log" 2>&1 || die "initdb failed: $(tail -3 "$WORK/pg/initdb.log")"
    pg_ctl_start || die "PostgreSQL did not start: $(tail -5 "$WORK/pg/server.log")"
    PG_STARTED=1
    local v
    v=$(q pg "select version()") || die "cannot connect to PostgreSQL: $v"
    log "PostgreSQL up on 127.0.0.1:$PORT_pg: $v"
    log "  fsync=$(q pg 'show fsync') synchronous_commit=$(q pg 'show synchronous_commit') shared_buffers=$(q pg 'show shared_buffers')"
}
pg_postmaster_pid() { head -1 "$PG_DATA/postmaster.pid" 2>/dev/null; }
stop_pg() {
    [ "$PG_STARTED" = 1 ] || return 0
    as_postgres "$PG_BIN/pg_ctl" -D "$PG_DATA" -m fast -w -t 60 stop >>"$WORK/pg/pg_ctl.log" 2>&1 || {
        local pid; pid=$(pg_postmaster_pid)
        [ -n "$pid" ] && kill -9 "$pid" 2>/dev/null
    }
    [ -n "$PG_WRAPPER_PID" ] && wait "$PG_WRAPPER_PID" 2>/dev/null
    PG_STARTED=0
}

# ---- Borealis ---------------------------------------------------------------------
B_DATA=$WORK/borealis/data
B_UP_PID=
BOREALIS_REPLICAS=${BOREALIS_REPLICAS:-0}
find_borealis_bin() {
    if [ -n "${BOREALIS_BIN:-}" ]; then echo "$BOREALIS_BIN"; return; fi
    local c
    for c in "$REPO_DIR/target/release/borealis" "${CARGO_TARGET_DIR:-/nonexistent}/release/borealis" \
             "$REPO_DIR/target/bench/release/borealis"; do
        [ -x "$c" ] && { echo "$c"; return; }
    done
    echo ""
}
bstatus() { timeout 10 "$BOREALIS" status --json --data-dir "$B_DATA" 2>/dev/null; }
borealis_writer_pid() {
    bstatus | jq -r '[.instances[]? | select(.role=="writer" or .name=="instance-1")][0].pid // empty' 2>/dev/null
}
# every pid of the cluster: `up` and all its descendants
borealis_pids() {
    [ -n "$B_UP_PID" ] || return 0
    local todo=$B_UP_PID p kids all=""
    while [ -n "$todo" ]; do
        set -- $todo; p=$1; shift; todo="$*"
        all="$all $p"
        kids=$(pgrep -P "$p" 2>/dev/null | tr '\n' ' ')
        todo="$todo $kids"; todo=$(echo $todo)
    done
    echo $all
}
# start_borealis: returns 1 (and sets B_START_ERROR) if the cluster does not come up.
B_START_ERROR=
start_borealis() {
    BOREALIS=$(find_borealis_bin)
    if [ -z "$BOREALIS" ]; then
        log "no borealis binary; building it (cargo build --release -p borealis)"
        (cd "$REPO_DIR" && cargo build --release -p borealis) >"$WORK/build.log" 2>&1 \
            || die "cargo build failed: $(tail -5 "$WORK/build.log")"
        BOREALIS=$(find_borealis_bin)
        [ -n "$BOREALIS" ] || die "borealis binary not found after build"
    fi
    PORT_borealis=$(free_port 3) || die "no free ports for Borealis"
    PGPASS_borealis=${BOREALIS_PASSWORD:-bench-$RANDOM$RANDOM}
    mkdir -p "$WORK/borealis"
    launch_borealis
}
# launch_borealis: `borealis up` on $B_DATA/$PORT_borealis (a new cluster, or the same one again)
launch_borealis() {
    log "Borealis: $BOREALIS up --data-dir $B_DATA --port $PORT_borealis (replicas $BOREALIS_REPLICAS)"
    # setsid: its own process group, so our terminal's Ctrl-C reaches it only via our trap
    setsid "$BOREALIS" up --data-dir "$B_DATA" --port "$PORT_borealis" --password "$PGPASS_borealis" \
        --replicas "$BOREALIS_REPLICAS" >>"$WORK/borealis/up.log" 2>&1 </dev/null &
    B_UP_PID=$!
    local t0 out deadline=$((SECONDS + 180)); t0=$(now)
    while :; do
        if ! kill -0 "$B_UP_PID" 2>/dev/null; then
            B_START_ERROR="borealis up exited: $(tail -5 "$WORK/borealis/up.log" | tr '\n' ' ')"
            B_UP_PID=; return 1
        fi
        out=$(Q_TIMEOUT=10 q borealis "select 1") && [ "$out" = 1 ] && break
        if [ $SECONDS -ge $deadline ]; then
            B_START_ERROR="writer endpoint not serving after 180 s: $out"
            return 1
        fi
        sleep 0.5
    done
    log "Borealis up on 127.0.0.1:$PORT_borealis after $(elapsed "$t0" "$(now)") s; writer pid $(borealis_writer_pid)"
    return 0
}
# ensure_borealis: if `borealis up` is gone (it crashed, or something outside this
# script signalled it), record it and bring the same cluster back up once.
ensure_borealis() {
    [ -n "$B_UP_PID" ] || return 1
    kill -0 "$B_UP_PID" 2>/dev/null && return 0
    wait "$B_UP_PID" 2>/dev/null; local rc=$?
    local why; why="borealis up (pid $B_UP_PID) exited with status $rc: $(grep -v '^ ' "$WORK/borealis/up.log" | tail -3 | tr '\n' ' ')"
    log "WARNING: $why; restarting the same cluster"
    record cluster borealis error "$why (restarted by the harness)"
    sleep 1
    launch_borealis || { record cluster borealis error "restart failed: $B_START_ERROR"; return 1; }
}
stop_borealis() {
    [ -n "$B_UP_PID" ] || return 0
    local pids; pids=$(borealis_pids)
    kill -TERM "$B_UP_PID" 2>/dev/null
    for _ in $(seq 1 150); do kill -0 "$B_UP_PID" 2>/dev/null || break; sleep 0.2; done
    if kill -0 "$B_UP_PID" 2>/dev/null; then
        log "WARNING: borealis up did not stop within 30 s of SIGTERM; SIGKILL"
        kill -9 $pids 2>/dev/null
    fi
    wait "$B_UP_PID" 2>/dev/null
    sleep 0.5
    local left; left=$(pgrep -f -- "$B_DATA" | tr '\n' ' ')
    if [ -n "$left" ]; then
        log "WARNING: Borealis processes left after stop: $left ($(ps -o pid=,args= -p ${left// /,} | cut -c1-120 | tr '\n' ';')); SIGKILL"
        kill -9 $left 2>/dev/null
        BOREALIS_LEFTOVERS="$left"
    fi
    B_UP_PID=
}

# ---- resource figures -------------------------------------------------------------
# proc_name PID: a cluster process's node name (--name), else its subcommand
proc_name() {
    local p=$1 name
    name=$(tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | grep -oP -- '--name \K\S+' || tr '\0' ' ' <"/proc/$p/cmdline" 2>/dev/null | awk '{print $2}')
    [ "$name" = proxy ] && name=proxy-$(tr '\0' ' ' <"/proc/$p/cmdline" | grep -oP -- '--role \K\S+' || echo writer)
    echo "${name:-?}"
}
rss_kb() { awk '/^VmRSS:/{print $2}' "/proc/$1/status" 2>/dev/null; }
pss_kb_sum() { # pids...
    local p s=0 v
    for p in "$@"; do
        v=$(awk '/^Pss:/{print $2}' "/proc/$p/smaps_rollup" 2>/dev/null)
        s=$((s + ${v:-0}))
    done
    echo $s
}
pg_pids() { local pm; pm=$(pg_postmaster_pid); [ -n "$pm" ] && echo "$pm $(pgrep -P "$pm" | tr '\n' ' ')"; }
# wait_gone PIDS...: until every one has exited (a zombie counts: it no longer holds
# PostgreSQL's shared memory), at most 10 s
wait_gone() {
    local p left deadline=$((SECONDS + 10))
    while [ $SECONDS -lt $deadline ]; do
        left=
        for p in "$@"; do
            [ -r "/proc/$p/status" ] && ! grep -q '^State:.*Z' "/proc/$p/status" 2>/dev/null && left=1
        done
        [ -z "$left" ] && return 0
        sleep 0.01
    done
    return 1
}

# ---- results ----------------------------------------------------------------------
# record KEY SYS FIELD VALUE  -> one TSV line (value may contain spaces, no tabs/newlines)
RESULTS=$WORK/results.tsv
: >"$RESULTS"
record() {
    local v=${4//$'\t'/ }; v=${v//$'\n'/ }
    printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$v" >>"$RESULTS"
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    [ -n "${PERF_PID:-}" ] && kill "$PERF_PID" 2>/dev/null
    stop_borealis
    stop_pg
    if [ "${BENCH_KEEP:-0}" = 1 ]; then log "kept $WORK"; else rm -rf "$WORK"; fi
    exit $rc
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM
