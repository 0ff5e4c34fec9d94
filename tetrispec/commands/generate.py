"""`tetrispec generate`: offline generation for prompts given on the command line or in a file."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tetrispec.commands.engine_args import add_engine_args, check_paths, engine_kwargs


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate completions offline")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    p.add_argument("--prompts-file", help="one prompt per line, or a JSONL file of {\"prompt\": ...}")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="wrap prompts in the model's chat template (default on)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p times the top one's probability")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI's, in [-2, 2]")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="vLLM's, > 0 (1: off)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--min-tokens", type=int, default=0, help="no EOS, stop id or stop string before this many tokens")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    add_engine_args(p)
    p.set_defaults(func=run)


def read_prompts(args) -> list[str]:
    from tetrispec.cli import CLIError

    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.is_file():
            raise CLIError(f"--prompts-file {path}: no such file")
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"--prompts-file {path}: cannot read ({type(e).__name__}: {e})") from None
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    prompt = json.loads(line)["prompt"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise CLIError(f"--prompts-file {path}: line {n} is not a JSON object with a 'prompt'") from None
                if not isinstance(prompt, str):  # str() made null the prompt "None"
                    raise CLIError(f"--prompts-file {path}: line {n}: 'prompt' must be a string, got {prompt!r}")
                prompts.append(prompt)
            else:
                prompts.append(line)
    if not prompts:
        raise CLIError("give at least one --prompt or a --prompts-file")
    for prompt in prompts:  # argv bytes that are not UTF-8 arrive as lone surrogates, which no tokenizer encodes
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:
            raise CLIError(f"--prompt {prompt!r} is not valid UTF-8 (is the terminal's encoding UTF-8?)") from None
    return prompts


def run(args) -> int:
    from tetrispec import LLM, SamplingParams

    prompts = read_prompts(args)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens, stop=args.stop, ignore_eos=args.ignore_eos, min_p=args.min_p,
                            presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                            repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens)
    check_paths(args)
    llm = LLM(**engine_kwargs(args))
    if args.chat and llm.tokenizer.chat_template:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
        for out, p in zip(outputs, prompts):
            out.prompt = p
    else:
        outputs = llm.generate(prompts, params)
    for out in outputs:
        if args.json:
            print(json.dumps({"prompt": out.prompt, "text": out.text, "token_ids": out.token_ids,
                              "finish_reason": out.finish_reason, "metrics": out.metrics}))
        else:
            print(out.text if len(outputs) == 1 else f"### {out.prompt}\n{out.text}\n")
    stats = llm.spec_stats()
    summary = {k: v for k, v in stats.items() if k != "per_position_acceptance"}
    line = json.dumps({"spec_stats": stats}) if args.json else "spec: " + ", ".join(
        f"{k}={round(v, 4) if isinstance(v, float) else v}" for k, v in summary.items())
    print(line, file=sys.stdout if args.json else sys.stderr)
    return 0
