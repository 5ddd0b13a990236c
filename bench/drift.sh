#!/usr/bin/env bash
# Does Borealis hold its TPC-B rate through a long run? One pgbench run (no VACUUM
# between windows: pgbench vacuums and truncates history only when it starts),
# sampled every 10 s: tps, CPU per transaction of the writer and of one eager and
# one lazy storage node, bytes a storage node writes per transaction, redo records
# per transaction, and the writer's RSS. A rate that falls while bytes or records
# per transaction climb points at the redo stream growing (it did, before leaves
# were pruned ahead of splits: ARCHITECTURE.md, MVCC).
#
#   bench/drift.sh                       # 70 s at 8 clients, scale 10
#   SECS=120 MODE="-c 8 -j 2 -M prepared" bench/drift.sh
#
# Environment: SECS (70), MODE (-c 8 -j 2 -M prepared), SCALE (10), BOREALIS_BIN.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
MODE=${MODE:--c 8 -j 2 -M prepared}
SECS=${SECS:-70}
SCALE=${SCALE:-10}
trap cleanup EXIT
BOREALIS=$(find_borealis_bin); [ -x "$BOREALIS" ] || die "no borealis binary"
PORT_borealis=$(free_port 3) || die "no free ports"
PGPASS_borealis=drift-$RANDOM$RANDOM
mkdir -p "$WORK/borealis"
launch_borealis || die "Borealis did not start: $B_START_ERROR"
export PGPASSWORD=$PGPASS_borealis
pgbench -h 127.0.0.1 -p "$PORT_borealis" -U postgres -i -s "$SCALE" -q postgres >"$WORK/init.out" 2>&1 ||
    die "pgbench -i failed: $(tail -2 "$WORK/init.out")"
HTTP=$(bstatus | jq -r '[.instances[]? | select(.role=="writer")][0].http // empty')
[ -n "$HTTP" ] || die "no writer in borealis status"
W=$(borealis_writer_pid)
A=$(pgrep -f -- "$B_DATA/storage-a1 ") C=$(pgrep -f -- "$B_DATA/storage-c1 ")
[ -n "$W" ] && [ -n "$A" ] && [ -n "$C" ] || die "cluster processes not found"
cpu() { awk '{print $14 + $15}' "/proc/$1/stat"; }
wchar() { awk '/^wchar/{print $2}' "/proc/$1/io"; }
metric() { curl -s "http://$HTTP/metrics" | awk -v m="$1" '$1 == m {print $2}'; }
HZ=$(getconf CLK_TCK)
pgbench -h 127.0.0.1 -p "$PORT_borealis" -U postgres -n $MODE -T "$SECS" postgres >"$WORK/run.out" 2>&1 &
PGB=$!
sleep 2
printf '%5s %6s %9s %9s %9s %10s %8s %7s\n' t tps writer_us a1_us c1_us a1_B/txn rec/txn rss_MiB
for ((t = 10; t <= SECS - 10; t += 10)); do
    w0=$(cpu "$W"); a0=$(cpu "$A"); c0=$(cpu "$C"); b0=$(wchar "$A")
    n0=$(metric borealis_commit_latency_seconds_count); l0=$(metric borealis_volume_vdl)
    sleep 10
    n=$(($(metric borealis_commit_latency_seconds_count) - n0)); [ "$n" -gt 0 ] || n=1
    awk -v t="$t" -v n="$n" -v hz="$HZ" -v w="$(($(cpu "$W") - w0))" -v a="$(($(cpu "$A") - a0))" \
        -v c="$(($(cpu "$C") - c0))" -v b="$(($(wchar "$A") - b0))" -v l="$(($(metric borealis_volume_vdl) - l0))" \
        -v rss="$(awk '/VmRSS/{print int($2 / 1024)}' "/proc/$W/status")" \
        'BEGIN { printf "%5d %6d %9.1f %9.1f %9.1f %10d %8.2f %7d\n", t, n / 10, w / hz * 1e6 / n,
                 a / hz * 1e6 / n, c / hz * 1e6 / n, b / n, l / n, rss }'
done
wait "$PGB"
grep -E '^(tps|number of failed)' "$WORK/run.out"
echo "leaf prunes: $(metric borealis_leaf_prunes_total)"
