#!/usr/bin/env bash
# The checked-in CPU sweep (README "Benchmarks and sweeps"): the default pair (SmolLM2-135M-Instruct
# target + the shipped draft), 256 ShareGPT requests sent as a burst, max-num-seqs 32, temperature 0;
# no speculation, fixed k 1..4, Tetris k 1..4 x e 1..2, DSD with K_max 4; 2 repeats of each.
# Writes results.csv, results.json, three PNG plots and server logs to benchmarks/results/sweep_cpu/.
#
# Resumable: after an interruption, run the same command again and finished runs are skipped.
# Extra flags are appended and win over the ones below, e.g. a quick smoke run:
#   OUT=/tmp/smoke benchmarks/sweep_default_pair.sh --num-requests 16 --num-speculative-tokens 1,2 --repeats 1
# Redraw the plots only: tetrispec sweep --plot-only benchmarks/results/sweep_cpu
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results/sweep_cpu}
exec tetrispec sweep \
  --methods none,fixed,tetris,dsd \
  --num-speculative-tokens 1,2,3,4 \
  --tetris-extra-proposals 1,2 \
  --dataset sharegpt --num-requests 256 --seed 0 \
  --request-rate inf \
  --max-num-seqs 32 --engine-seed 0 \
  --device cpu --dtype float32 \
  --repeats 2 \
  --output-dir "$OUT" \
  "$@"
