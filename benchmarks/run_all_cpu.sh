#!/usr/bin/env bash
# Every CPU number quoted in the README, in one sequential run (2 cores; about an hour and a half;
# the grids are reduced from the issues' to fit one session on this machine).
# Run it on an otherwise idle machine: 2-thread torch slows down badly when a core is taken.
set -u
cd "$(dirname "$0")/.."
R=benchmarks/results
mkdir -p $R
export TOKENIZERS_PARALLELISM=false
[ -d .venv ] && export PATH="$PWD/.venv/bin:$PATH"
step() { [ -z "${ONLY:-}" ] || [[ ",$ONLY," == *",$1,"* ]]; }
if step throughput; then
  for dt in float32 bfloat16; do
    python benchmarks/throughput_vs_transformers.py --batch-sizes 1 32 --new-tokens 128 --repeats 3 --dtype $dt \
      --json $R/throughput_$dt.json 2>&1 | grep --line-buffered -v torn | tee $R/throughput_$dt.log
  done
fi
if step kernel; then
  python benchmarks/cpu_attention_kernel.py --dtype float32 --json $R/cpu_attention_kernel_float32.json
fi
if step gemm; then
  python benchmarks/gemm_row_padding.py --repeats 15 --json $R/gemm_row_padding.json 2>&1 | grep -v torn
fi
PROFILE=$R/profiles/default-pair-cpu.json
if step profile; then
  # one step-time profile over batch 1..32 shared by every DSD / auto run below
  tetrispec profile --max-num-seqs 32 --dsd-max-k 4 --num-speculative-tokens 3 --tetris-extra-proposals 1 \
    --profile-path $PROFILE --force 2>&1 | tail -3
fi
if step sweep; then
  # the paper-style grid of sweep_default_pair.sh, reduced to fit this 2-core machine
  OUT=$R/sweep_cpu_small benchmarks/sweep_default_pair.sh --num-requests 64 --max-output-len 64 \
    --num-speculative-tokens 1,2 --tetris-extra-proposals 1,2 --tetris-capacity default,auto --repeats 1 \
    --profile-path $PROFILE --no-progress 2>&1 | tail -40 > $R/sweep_cpu_small.log
fi
if step spec_methods; then
  python benchmarks/spec_methods.py --num-prompts 200 --oracle-prompts 32 --max-output 32 --max-num-seqs 32 \
    --ks 1,2,3,4 --es 1,2,3 --auto --profile-path $PROFILE --out $R/spec_methods_cpu.json 2>&1 \
    | grep --line-buffered -v torn | tee $R/spec_methods_cpu.log
fi
if step concurrency; then
  rm -f $R/concurrency_cpu/results.json  # the script resumes from it; a fresh sweep starts empty
  python benchmarks/concurrency_sweep.py --concurrency 1,2,4,8,16,32 --min-prompts 20 --prompts-per-seq 4 \
    --max-output 48 --profile $PROFILE --out $R/concurrency_cpu 2>&1 | grep --line-buffered -v torn | tee $R/concurrency_cpu.log
fi
if step auto_oracle; then
  for c in 8 32; do  # where auto drafts most steps, and where it mostly decodes plainly
    python benchmarks/auto_oracle.py --num-prompts 160 --max-output 64 --max-num-seqs $c --profile-path $PROFILE \
      --out $R/auto_oracle_cpu_c$c.json 2>&1 | grep -v torn | tee $R/auto_oracle_cpu_c$c.log
  done
fi
