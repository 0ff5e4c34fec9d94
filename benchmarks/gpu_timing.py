"""Output tokens/s of plain decoding vs speculation methods on one device, one process.

    python benchmarks/gpu_timing.py --model T.gguf --draft DRAFT_DIR --num-prompts 128 --max-tokens 128
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tetrispec import LLM, SamplingParams

TOPICS = ["the history of Rome", "how vaccines work", "a recipe for bread", "sorting algorithms", "black holes",
          "the French revolution", "photosynthesis", "how to learn a language", "the stock market", "volcanoes"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--draft", default="default")
    ap.add_argument("--num-prompts", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--methods", default="none,fixed,tetris,auto")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    configs = [dict(spec_method="none"), dict(spec_method="fixed", num_speculative_tokens=3),
               dict(spec_method="tetris", num_speculative_tokens=3, tetris_extra_proposals=1),
               dict(spec_method="tetris", num_speculative_tokens=3, tetris_extra_proposals=1, tetris_capacity="auto")]
    names = {"none": 0, "fixed": 1, "tetris": 2, "auto": 3}
    configs = [configs[names[m]] for m in args.methods.split(",")]
    rows, reference = [], None
    for cfg in configs:
        kw = dict(cfg, max_num_seqs=args.max_num_seqs, dtype=args.dtype, kv_cache_memory_gb=8)
        if cfg["spec_method"] != "none":
            kw["speculative_model"] = args.draft
        llm = LLM(args.model, **kw)
        tok = llm.tokenizer
        prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": f"Tell me about {t} ({i})."}]),
                              add_special_tokens=False)
                   for i, t in zip(range(args.num_prompts), TOPICS * (args.num_prompts // len(TOPICS) + 1))]
        params = SamplingParams(temperature=0, max_tokens=args.max_tokens)
        llm.generate(prompts[:4], params, use_tqdm=False)  # warm-up
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        ids = [o.token_ids for o in outs]
        reference = reference or ids
        stats = llm.spec_stats()
        row = {**cfg, "device": str(llm.engine.device), "tokens_per_s": round(sum(map(len, ids)) / elapsed, 1),
               "vsr": stats["verification_success_rate"], "mean_accepted_length": stats["mean_accepted_length"],
               "greedy_equal_to_none": ids == reference}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del llm
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
