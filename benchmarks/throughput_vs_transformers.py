"""Output tokens/s of tetrispec vs transformers `generate` on the default model, greedy.

Same weights (the dequantized GGUF loaded once and handed to both), same prompts (ShareGPT
first turns in the chat template), same number of new tokens (EOS ignored), in one process.

    python benchmarks/throughput_vs_transformers.py --batch-sizes 1 32 --new-tokens 128
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import transformers

from tetrispec import LLM, SamplingParams
from tetrispec.bench.datasets import load_dataset


def hf_model_from(llm: LLM) -> transformers.LlamaForCausalLM:
    model = llm.engine.target.model
    cfg = model.config.to_hf()
    cfg["torch_dtype"] = "float32"
    ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    weights = model.hf_state_dict()
    if cfg["tie_word_embeddings"]:
        weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
    ref.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    return ref


def prompts_for(llm: LLM, n: int) -> list[list[int]]:
    reqs = load_dataset("sharegpt", None, llm.tokenizer, num_requests=4 * n, seed=0)
    out = []
    for r in reqs:
        text = llm.tokenizer.apply_chat_template([{"role": "user", "content": r.prompt}])
        ids = llm.tokenizer.encode(text, add_special_tokens=False)
        if 16 <= len(ids) <= 256:
            out.append(ids)
        if len(out) == n:
            break
    return out


def run_tetrispec(llm: LLM, prompts: list[list[int]], new_tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return sum(len(o.token_ids) for o in outs) / elapsed


@torch.inference_mode()
def run_transformers(model, prompts: list[list[int]], new_tokens: int, pad_id: int) -> float:
    longest = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts])
    start = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=pad_id)
    elapsed = time.perf_counter() - start
    return (out.shape[1] - longest) * len(prompts) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    llm = LLM(spec_method="none", max_num_seqs=max(args.batch_sizes), dtype=args.dtype)
    ref = hf_model_from(llm).to(getattr(torch, args.dtype))
    pad = llm.tokenizer.eos_token_ids[0]
    rows = []
    for bs in args.batch_sizes:
        prompts = prompts_for(llm, bs)
        run_tetrispec(llm, prompts[:1], 4)  # warm-up
        ours = [run_tetrispec(llm, prompts, args.new_tokens) for _ in range(args.repeats)]
        theirs = [run_transformers(ref, prompts, args.new_tokens, pad) for _ in range(args.repeats)]
        row = {"batch": bs, "tetrispec_tok_s": statistics.median(ours),
               "transformers_tok_s": statistics.median(theirs)}
        row["speedup"] = row["tetrispec_tok_s"] / row["transformers_tok_s"]
        rows.append(row)
        print(f"batch {bs:3d}: tetrispec {row['tetrispec_tok_s']:7.1f} tok/s   transformers "
              f"{row['transformers_tok_s']:7.1f} tok/s   speedup {row['speedup']:.2f}x", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"threads": torch.get_num_threads(), "dtype": args.dtype, "new_tokens": args.new_tokens,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
