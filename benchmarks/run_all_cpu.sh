#!/usr/bin/env bash
# Every CPU number quoted in the README, in one sequential run (2 cores; ~1 hour).
set -u
cd "$(dirname "$0")/.."
R=benchmarks/results
mkdir -p $R
export TOKENIZERS_PARALLELISM=false
python benchmarks/throughput_vs_transformers.py --batch-sizes 1 32 --new-tokens 128 --repeats 3 \
  --json $R/throughput_fp32.json 2>&1 | grep -v torn | tee $R/throughput_fp32.log
python benchmarks/throughput_vs_transformers.py --batch-sizes 1 32 --new-tokens 128 --repeats 3 --dtype bfloat16 \
  --json $R/throughput_bf16.json 2>&1 | grep -v torn | tee $R/throughput_bf16.log
python benchmarks/concurrency_sweep.py --concurrency 1,2,4,8,16,32 --min-prompts 6 --max-output 64 \
  --methods none,fixed-k1,fixed-k2,fixed-k3,tetris-k1-e1,tetris-k2-e1,dsd,tetris-auto \
  --out $R/concurrency_cpu 2>&1 | grep -v torn | tee $R/concurrency_cpu.log
python benchmarks/spec_methods.py --num-prompts 200 --oracle-prompts 32 --max-output 64 --max-num-seqs 32 \
  --ks 1,2,3,4 --es 1,2,3 --auto --out $R/spec_methods_cpu.json 2>&1 | grep -v torn | tee $R/spec_methods_cpu.log
