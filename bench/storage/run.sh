#!/bin/sh
# Storage benchmark: 6 local storage nodes, real TCP + fdatasync. See
# crates/sim/src/bin/storage-bench.rs. Usage: bench/storage/run.sh [--seconds N] [--dir DIR]
set -e
cd "$(dirname "$0")/../.."
exec cargo run --release -q -p borealis-sim --bin storage-bench -- "$@"
