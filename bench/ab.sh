#!/usr/bin/env bash
# A/B of Borealis binaries on one machine in one run, with CPU per transaction.
#
#   BINS="/tmp/old/borealis /tmp/new/borealis" bench/ab.sh
#   BINS="..." MODES="-c_8_-j_2_-M_prepared -S_-c_8_-j_2_-M_prepared" ROUNDS=3 bench/ab.sh
#   WITH_PG=1 BINS="target/release/borealis" bench/ab.sh     # PostgreSQL 15 alongside
#
# Starts one cluster per binary (and PostgreSQL 15 with WITH_PG=1), loads each with
# `pgbench -i -s $SCALE`, then runs ROUNDS rounds; a round runs every pgbench mode
# in MODES (spaces written as `_`) against each system in turn, one at a time.
# Copy binaries out of target/ first, so a rebuild does not change them mid-run.
#
# Per point it prints tps, failed transactions and where the CPU went, in µs per
# transaction: each cluster process (utime+stime; k = the kernel part, f = minor
# page faults per transaction), pgbench itself, the whole machine, and the idle
# share. On a CPU-bound 2-core machine the µs per transaction decide throughput,
# and they drift far less between runs than tps does.
#
# The mode `copy` is a bulk load instead of pgbench: COPY of COPY_ROWS (1,000,000)
# pgbench_accounts-shaped rows into a fresh table without a primary key; it prints
# rows/s and the CPU figures per row.
#
# Environment: BINS (required), MODES or MODE, ROUNDS (2), SECS (10), SCALE (10),
# WITH_PG. Each cluster at scale 10 takes about 2 GB of disk.
set -uo pipefail
. "$(dirname "$0")/lib.sh"
[ -n "${BINS:-}" ] || die "BINS: the borealis binaries to compare"
STOPS=()
trap 'for s in "${STOPS[@]}"; do eval "$s"; done; cleanup' EXIT
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-2}
SCALE=${SCALE:-10}
MODES=${MODES:-${MODE:--c_8_-j_2_-M_prepared}}
HZ=$(getconf CLK_TCK)

i=0
declare -a PORTS UPS DATAS
PGPASS_borealis=ab-$RANDOM$RANDOM
for b in $BINS; do
    BOREALIS=$b
    B_DATA=$WORK/b$i/data
    PORT_borealis=$(free_port 3) || die "no free ports"
    mkdir -p "$WORK/b$i" "$WORK/borealis"
    launch_borealis || die "cluster $i ($b) did not start: $B_START_ERROR"
    PORTS[$i]=$PORT_borealis
    UPS[$i]=$B_UP_PID
    DATAS[$i]=$B_DATA
    STOPS+=("B_UP_PID=${UPS[$i]} B_DATA=${DATAS[$i]} stop_borealis")
    PGPASSWORD=$PGPASS_borealis pgbench -h 127.0.0.1 -p "$PORT_borealis" -U postgres -i -s "$SCALE" -q postgres \
        >"$WORK/init-$i.out" 2>&1 || log "pgbench -i failed on cluster $i: $(tail -2 "$WORK/init-$i.out")"
    i=$((i + 1))
done
if [ -n "${WITH_PG:-}" ]; then
    start_pg
    STOPS+=("stop_pg")
    pgbench -h 127.0.0.1 -p "$PORT_pg" -U postgres -i -s "$SCALE" -q postgres >"$WORK/init-pg.out" 2>&1
fi

# "pid name ticks kernel-ticks minor-faults" for every process of the current cluster
cpu_snapshot() {
    local p
    for p in $(borealis_pids); do
        [ -r "/proc/$p/stat" ] || continue
        echo "$p $(proc_name "$p") $(awk '{print $14+$15, $15, $10}' "/proc/$p/stat")"
    done | LC_ALL=C sort
}
busy() { awk '/^cpu /{print $2+$3+$4+$7+$8, $5+$6}' /proc/stat; }
# run_point PORT PASSWORD MODE: runs pgbench; sets N (transactions), OUT, PB (pgbench
# µs/txn), MACHINE (machine µs/txn and idle share)
run_point() {
    local b0 b1
    b0=$(busy)
    PGPASSWORD=$2 /usr/bin/time -f "%U %S" -o "$WORK/time" \
        pgbench -h 127.0.0.1 -p "$1" -U postgres -n $3 -T "$SECS" postgres >"$WORK/out" 2>&1
    b1=$(busy)
    N=$(grep -oP 'actually processed: \K[0-9]+' "$WORK/out"); N=${N:-0}
    OUT="tps=$(grep -oP 'tps = \K[0-9.]+' "$WORK/out") failed=$(grep -oP 'failed transactions: \K[0-9]+' "$WORK/out")"
    PB=$(awk -v n="$N" '{printf "%.0f", (n > 0 ? ($1+$2)*1e6/n : 0)}' "$WORK/time")
    MACHINE=$(echo "$b0 $b1" | awk -v n="$N" -v hz="$HZ" \
        '{printf "%.0f idle=%.0f%%", (n > 0 ? ($3-$1)/hz*1e6/n : 0), ($4-$2)/(($3-$1)+($4-$2))*100}')
}

# run_copy PORT PASSWORD: COPY_ROWS rows into a fresh table; sets what run_point sets
COPY_ROWS=${COPY_ROWS:-1000000}
run_copy() {
    local b0 b1 t0 t1
    [ -s "$WORK/copy.tsv" ] || awk -v n="$COPY_ROWS" \
        'BEGIN {for (i = 1; i <= n; i++) printf "%d\t%d\t0\t\n", i, int((i - 1) / 100000) + 1}' >"$WORK/copy.tsv"
    PGPASSWORD=$2 psql -h 127.0.0.1 -p "$1" -U postgres -d postgres -qX -v ON_ERROR_STOP=1 -c \
        "drop table if exists ab_copy; create table ab_copy(aid int not null, bid int, abalance int, filler char(84))" \
        >"$WORK/out" 2>&1
    sleep 1 # let the storage nodes finish the drop before the clock starts
    b0=$(busy); t0=$(now)
    PGPASSWORD=$2 /usr/bin/time -f "%U %S" -o "$WORK/time" psql -h 127.0.0.1 -p "$1" -U postgres -d postgres \
        -qX -v ON_ERROR_STOP=1 -c "\\copy ab_copy from '$WORK/copy.tsv'" >>"$WORK/out" 2>&1 && N=$COPY_ROWS || N=0
    b1=$(busy); t1=$(now)
    OUT="rows/s=$(awk -v n="$N" -v s="$(elapsed "$t0" "$t1")" 'BEGIN {printf "%.0f", n / s}') $(grep -m1 ERROR "$WORK/out")"
    PB=$(awk -v n="$N" '{printf "%.2f", (n > 0 ? ($1+$2)*1e6/n : 0)}' "$WORK/time")
    MACHINE=$(echo "$b0 $b1" | awk -v n="$N" -v hz="$HZ" \
        '{printf "%.2f idle=%.0f%%", (n > 0 ? ($3-$1)/hz*1e6/n : 0), ($4-$2)/(($3-$1)+($4-$2))*100}')
}

for r in $(seq 1 "$ROUNDS"); do
    for m in $MODES; do
        mode=${m//_/ }
        echo "-- round $r: pgbench $mode"
        for j in $(seq 0 $((i - 1))); do
            B_UP_PID=${UPS[$j]}
            B_DATA=${DATAS[$j]}
            cpu_snapshot >"$WORK/c0"
            if [ "$m" = copy ]; then
                run_copy "${PORTS[$j]}" "$PGPASS_borealis"
            else
                run_point "${PORTS[$j]}" "$PGPASS_borealis" "$mode"
            fi
            cpu_snapshot >"$WORK/c1"
            cpu=$(LC_ALL=C join "$WORK/c0" "$WORK/c1" | awk -v hz="$HZ" -v n="$N" \
                '{s = n > 0 ? ($7-$3)/hz*1e6/n : 0; k = n > 0 ? ($8-$4)/hz*1e6/n : 0; f = n > 0 ? ($9-$5)/n : 0
                  t += s; if (s >= 0.01) printf "%s=%.2f(k%.2f,f%.2f) ", $2, s, k, f} END {printf "| cluster=%.2f", t}')
            echo "bin$j $OUT  $cpu pgbench=$PB machine=$MACHINE"
        done
        if [ -n "${WITH_PG:-}" ]; then
            if [ "$m" = copy ]; then run_copy "$PORT_pg" unused; else run_point "$PORT_pg" unused "$mode"; fi
            echo "pg   $OUT  pgbench=$PB machine=$MACHINE"
        fi
    done
done
