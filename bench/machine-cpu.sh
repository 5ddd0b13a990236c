#!/usr/bin/env bash
# Where a whole machine's CPU goes under TPC-B, per transaction, by process name:
# every process's utime+stime from /proc before and after the run, kernel threads
# (kblockd, ksoftirqd, ...) included, which per-process tools like ab.sh miss.
#
#   bench/machine-cpu.sh                 # a Borealis cluster (BOREALIS_BIN or target/release)
#   PG=1 bench/machine-cpu.sh            # PostgreSQL 15 instead
#   MODE="-c 1 -j 1 -M prepared" SECS=20 bench/machine-cpu.sh
#
# pgbench itself exits before the second snapshot; it is the remainder of the
# machine total. Environment: PG, MODE (-c 8 -j 2 -M prepared), SECS (12), SCALE (10).
set -uo pipefail
. "$(dirname "$0")/lib.sh"
MODE=${MODE:--c 8 -j 2 -M prepared}
SECS=${SECS:-12}
SCALE=${SCALE:-10}
HZ=$(getconf CLK_TCK)
trap cleanup EXIT
snap() {
    local f
    for f in /proc/[0-9]*/stat; do
        # comm may contain spaces: fields after the closing parenthesis are fixed.
        sed -E 's/^([0-9]+) \((.*)\) [A-Za-z] (.*)$/\1 \2|\3/' "$f" 2>/dev/null |
            awk -F'|' '{split($2, a, " "); print $1 "|" a[11] + a[12]}'
    done
}
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8, $5+$6}' /proc/stat; }
if [ -n "${PG:-}" ]; then
    start_pg; PORT=$PORT_pg; PASS=unused
else
    BOREALIS=$(find_borealis_bin); [ -x "$BOREALIS" ] || die "no borealis binary"
    PORT_borealis=$(free_port 3) || die "no free ports"
    PGPASS_borealis=cpu-$RANDOM$RANDOM
    mkdir -p "$WORK/borealis"
    launch_borealis || die "Borealis did not start: $B_START_ERROR"
    PORT=$PORT_borealis; PASS=$PGPASS_borealis
fi
PGPASSWORD=$PASS pgbench -h 127.0.0.1 -p "$PORT" -U postgres -i -s "$SCALE" -q postgres >"$WORK/init.out" 2>&1 ||
    die "pgbench -i failed: $(tail -2 "$WORK/init.out")"
sleep 2
snap >"$WORK/s0"; b0=$(busy)
PGPASSWORD=$PASS pgbench -h 127.0.0.1 -p "$PORT" -U postgres -n $MODE -T "$SECS" postgres >"$WORK/run.out" 2>&1
snap >"$WORK/s1"; b1=$(busy)
N=$(grep -oP 'actually processed: \K[0-9]+' "$WORK/run.out"); N=${N:-0}
[ "$N" -gt 0 ] || die "pgbench processed nothing: $(tail -2 "$WORK/run.out")"
echo "$([ -n "${PG:-}" ] && echo PostgreSQL || echo Borealis): pgbench $MODE, $N transactions, $(grep -oP 'tps = \K[0-9.]+' "$WORK/run.out") tps"
echo "$b0 $b1" | awk -v n="$N" -v hz="$HZ" '{printf "machine: %.0f us/txn busy, idle %.0f%%\n", ($3-$1)/hz*1e6/n, ($4-$2)/(($3-$1)+($4-$2))*100}'
# µs per transaction by process name (digits folded, so kworker/0:1H and 1:0H add up)
LC_ALL=C join -t'|' <(LC_ALL=C sort "$WORK/s0") <(LC_ALL=C sort "$WORK/s1") | awk -F'|' -v n="$N" -v hz="$HZ" '
    { d = $3 - $2; if (d <= 0) next; split($1, a, " "); name = substr($1, length(a[1]) + 2)
      gsub(/[0-9]+/, "N", name); t[name] += d }
    END { for (k in t) printf "%8.1f us/txn  %s\n", t[k] / hz * 1e6 / n, k }' | sort -rn | head -20
