"""Peak resident memory and time of loading a checkpoint, each load in a fresh process.

    python benchmarks/load_memory.py --make /tmp/llama-1b     # a random TinyLlama-shaped bf16 checkpoint
    python benchmarks/load_memory.py --model /tmp/llama-1b --dtype bfloat16 float32

The number that matters on a small machine: how far above the model's own size loading peaks.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

# peak_rss counts the checkpoint's memory-mapped file pages too (page cache the kernel can drop);
# peak_anon, sampled every 5 ms, is the process's own memory: what has to fit.
CHILD = """
import json, resource, sys, threading, time, torch
from tetrispec.model.loader import load_model
peak_anon, done = [0], threading.Event()
def sample():
    while not done.is_set():
        for line in open("/proc/self/status"):
            if line.startswith("RssAnon:"):
                peak_anon[0] = max(peak_anon[0], int(line.split()[1]) * 1024)
        time.sleep(0.005)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
model, _ = load_model(sys.argv[1] or None, getattr(torch, sys.argv[2]), "cpu")
seconds = time.perf_counter() - start
done.set()
size = sum(p.numel() * p.element_size() for p in model.parameters())
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
gb = lambda n: round(n / 2**30, 2)
print(json.dumps({"dtype": sys.argv[2], "model_gb": gb(size), "peak_anon_gb": gb(peak_anon[0]), "peak_rss_gb": gb(peak),
                  "load_s": round(seconds, 1)}))
"""


def make(path: str) -> None:
    """TinyLlama-1.1B's shape with random weights, saved in bfloat16 like the real one."""
    import torch

    from tetrispec.model.config import ModelConfig
    from tetrispec.model.llama import LlamaForCausalLM
    from tetrispec.model.loader import default_target_path, save_checkpoint

    cfg = ModelConfig(vocab_size=49152, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                      num_attention_heads=32, num_key_value_heads=4, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    save_checkpoint(model, default_target_path(), path)  # the default target's tokenizer (49152 tokens)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--make", default=None, help="write a random 1.1B checkpoint here and exit")
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"])
    args = ap.parse_args()
    if args.make:
        make(args.make)
        return
    for dtype in args.dtype:
        out = subprocess.run([sys.executable, "-c", CHILD, args.model or "", dtype], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(out.stderr.strip().splitlines()[-1])
        print(json.dumps({"model": args.model or "default", **json.loads(out.stdout)}), flush=True)


if __name__ == "__main__":
    main()
