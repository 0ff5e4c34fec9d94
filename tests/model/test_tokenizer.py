"""Tokenizer from HF files and GGUF metadata, chat templates, streaming detokenization."""

import json

import gguf
import jinja2
import pytest
import tokenizers
from conftest import spm_corpus, train_sentencepiece
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from tetrispec.model.tokenizer import LLAMA3_SPLIT, IncrementalDetokenizer, Tokenizer

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog.", "Paris is the capital of France, 12345 people.",
          "def f(x):\n    return x * 2\n", "Hello, world! It's 2024; we'll see."] * 20
TEXTS = ["Hello world, it's 12345 o'clock!", "  spaces\n\nand\ttabs 🦙🙂 héllo",
         "<|im_start|>user\nhi<|im_end|>", "3.14159 ÿ ∑ 中文"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def train_byte_bpe(pre: pre_tokenizers.PreTokenizer) -> tokenizers.Tokenizer:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


def write_gguf_tokenizer(path, tok: tokenizers.Tokenizer, pre: str, template: str | None = TEMPLATE) -> None:
    """tokenizer.ggml.* metadata as llama.cpp's converter writes it (no tensors)."""
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(tok.to_str())["model"]["merges"]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_add_bos_token(False)
    if template:
        w.add_chat_template(template)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gguf_tokenizer(tmp_path, pre_name: str, pre: pre_tokenizers.PreTokenizer, **kw):
    src = train_byte_bpe(pre)
    write_gguf_tokenizer(tmp_path / "tok.gguf", src, pre_name, **kw)
    return src, Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "tok.gguf"))


SMOLLM_PRE = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                      pre_tokenizers.ByteLevel(add_prefix_space=False)])
LLAMA3_PRE = pre_tokenizers.Sequence([
    pre_tokenizers.Split(tokenizers.Regex(LLAMA3_SPLIT), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
])


@pytest.mark.parametrize("pre_name,pre", [("smollm", SMOLLM_PRE), ("llama-bpe", LLAMA3_PRE),
                                          ("gpt-2", pre_tokenizers.ByteLevel(add_prefix_space=False))])
def test_gguf_byte_bpe_matches_source(tmp_path, pre_name, pre):
    src, tok = gguf_tokenizer(tmp_path, pre_name, pre)
    src.add_special_tokens(SPECIALS)
    assert tok.vocab() == src.get_vocab(with_added_tokens=True)
    assert tok.vocab_size == src.get_vocab_size()
    for text in TEXTS:
        ids = tok.encode(text)
        assert ids == src.encode(text).ids
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("<|im_start|>x") == [1, *src.encode("x").ids]  # special text -> one id, no BOS
    assert tok.decode(tok.encode("<|im_start|>hi<|im_end|>")) == "hi"
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos_token) == (0, [2], False)


def test_smollm_pre_splits_digits(tmp_path):
    _, tok = gguf_tokenizer(tmp_path, "smollm", SMOLLM_PRE)
    assert len(tok.encode("12345")) == 5


def write_spm_gguf(path) -> list[str]:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "he", "ll", "llo", "hello", "▁hello", "▁w", "or", "ld"]
    tokens += pieces
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores([0.0] * 259 + [-float(i) for i in range(len(pieces))][::-1])  # longer = better
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * len(pieces))
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tokens


def test_gguf_sentencepiece(tmp_path):
    tokens = write_spm_gguf(tmp_path / "spm.gguf")
    tok = Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "spm.gguf"))
    ids = tok.encode("hello world é")
    assert ids[0] == 1  # SPM models add BOS by default
    assert [tokens[i] for i in ids[1:5]] == ["▁hello", "▁w", "or", "ld"]
    assert [tokens[i] for i in ids[-3:]] == ["▁", "<0xC3>", "<0xA9>"]  # byte fallback
    assert tok.decode(ids) == "hello world é"


def test_unsupported_gguf_tokenizer(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "t.gguf"), "llama")
    w.add_tokenizer_model("bert")
    w.add_token_list(["a"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="unsupported GGUF tokenizer model 'bert'"):
        Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "t.gguf"))


def write_hf_dir(path, config: dict, post_bos: bool = False, generation: dict | None = None) -> None:
    src = train_byte_bpe(SMOLLM_PRE)
    src.add_special_tokens(SPECIALS)
    if post_bos:
        src.post_processor = processors.TemplateProcessing(single="<|endoftext|> $A",
                                                           special_tokens=[("<|endoftext|>", 0)])
    path.mkdir(exist_ok=True)
    src.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    if generation:
        (path / "generation_config.json").write_text(json.dumps(generation))


def test_hf_dir_special_tokens(tmp_path):
    cfg = {"bos_token": {"content": "<|endoftext|>"}, "eos_token": "<|im_end|>", "chat_template": TEMPLATE}
    write_hf_dir(tmp_path / "a", cfg, post_bos=True, generation={"eos_token_id": [2, 0]})
    tok = Tokenizer.from_hf_dir(tmp_path / "a")
    assert tok.bos_token_id == 0 and tok.eos_token_ids == [2, 0]
    assert tok.add_bos_token  # inferred from the post-processor
    ids = tok.encode("hi")
    assert ids[0] == 0 and ids.count(0) == 1  # BOS once, not twice
    assert tok.encode("hi", add_special_tokens=False) == ids[1:]
    write_hf_dir(tmp_path / "b", {**cfg, "add_bos_token": False}, post_bos=True)
    assert not Tokenizer.from_hf_dir(tmp_path / "b").add_bos_token  # explicit flag wins
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_save_hf_round_trip(tmp_path):
    _, tok = gguf_tokenizer(tmp_path, "smollm", SMOLLM_PRE)
    tok.save_hf(tmp_path / "out")
    back = Tokenizer.from_hf_dir(tmp_path / "out")
    assert back.vocab() == tok.vocab()
    assert (back.bos_token_id, back.eos_token_ids, back.add_bos_token) == (0, [2], False)
    assert back.chat_template == tok.chat_template
    for text in TEXTS:
        assert back.encode(text) == tok.encode(text)


def test_chat_template(tmp_path):
    _, tok = gguf_tokenizer(tmp_path, "smollm", SMOLLM_PRE)
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tok.apply_chat_template(msgs, add_generation_prompt=False).endswith("<|im_end|>\n")
    tok.chat_template = "{{ raise_exception('no ' + bos_token + eos_token) }}"
    with pytest.raises(jinja2.TemplateError, match="no <\\|endoftext\\|><\\|im_end\\|>"):
        tok.apply_chat_template(msgs)
    _, bare = gguf_tokenizer(tmp_path, "smollm", SMOLLM_PRE, template=None)
    with pytest.raises(ValueError, match="no chat template"):
        bare.apply_chat_template(msgs)


def stream(tok: Tokenizer, ids: list[int], num_prompt: int, chunk: int) -> list[str]:
    detok = IncrementalDetokenizer(tok, num_prompt_tokens=num_prompt)
    pieces = [detok.step(ids[:n]) for n in range(num_prompt + chunk, len(ids) + chunk, chunk)]
    pieces = [p for p in pieces if p]
    assert "".join(pieces) == detok.text
    return pieces


@pytest.mark.parametrize("chunk", [1, 3])
def test_incremental_detokenizer_multibyte(tmp_path, chunk):
    _, tok = gguf_tokenizer(tmp_path, "smollm", SMOLLM_PRE)
    text = "Hi 🦙🙂 héllo 中文 world"
    ids = tok.encode(text)
    assert len(ids) > len(text.split()) + 8  # the emoji really are split into byte tokens
    pieces = stream(tok, ids, 0, chunk)
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    prompt = tok.encode("Say: ")
    pieces = stream(tok, prompt + ids, len(prompt), chunk)
    assert "".join(pieces) == tok.decode(prompt + ids)[len("Say: "):]


def test_incremental_detokenizer_sentencepiece_spaces(tmp_path):
    write_spm_gguf(tmp_path / "spm.gguf")
    tok = Tokenizer.from_gguf(gguf.GGUFReader(tmp_path / "spm.gguf"))
    ids = tok.encode("hello world hello é")
    assert "".join(stream(tok, ids, 1, 1)) == tok.decode(ids)  # after BOS: no leading space lost/added


def test_incremental_detokenizer_final_flush(tmp_path):
    _, tok = gguf_tokenizer(tmp_path, "smollm", SMOLLM_PRE)
    ids = tok.encode("a🦙")[:-1]  # the sequence stops inside the emoji
    detok = IncrementalDetokenizer(tok)
    assert detok.step(ids) == ""  # incomplete character: wait
    assert detok.step(ids, final=True) == tok.decode(ids) == "a\ufffd"


# ---- SentencePiece tokenizer.model (Llama 1/2, Vicuna, Mistral HF directories) ------------------
SPM_TEXTS = ["the quick brown fox", "  two  spaces ", " lead", "12345 digits", "é ü 中文 and ☃ snowman",
             "newline\nhere\n\n", "tabs\tand\u00a0nbsp", "", "verifies them"] + spm_corpus(40, seed=1)


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_sentencepiece_model_encodes_like_sentencepiece(tmp_path, model_type):
    import sentencepiece

    proto = train_sentencepiece(tmp_path, model_type, vocab_size=800 if model_type == "bpe" else 500)
    sp = sentencepiece.SentencePieceProcessor(model_proto=proto)
    tok = Tokenizer.from_hf_dir(tmp_path)  # no tokenizer.json, no tokenizer_config.json
    for text in SPM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids)
    # ids, specials and BOS from the model file, as LlamaTokenizer does
    assert (tok.bos_token_id, tok.eos_token_ids, tok.add_bos_token) == (1, [2], True)
    assert tok.encode("the fox")[0] == 1 and tok.vocab_size == sp.get_piece_size()
    assert tok.encode("the</s>", add_special_tokens=False)[-1] == 2


def test_sentencepiece_legacy_flag(tmp_path):
    """legacy (transformers' default for Llama): every stretch between special tokens gets the
    dummy-prefix space; legacy=false: only the start of the text."""
    train_sentencepiece(tmp_path)
    after = {}
    for legacy in (True, False):
        (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": legacy, "bos_token": "<s>"}))
        tok = Tokenizer.from_hf_dir(tmp_path)
        ids = tok.encode("a</s>the fox", add_special_tokens=False)
        after[legacy] = tok.tok.id_to_token(ids[ids.index(2) + 1])
        assert tok.decode(tok.encode("the fox")) == "the fox"
    assert after[True].startswith("▁") and not after[False].startswith("▁")


def test_sentencepiece_added_tokens_and_errors(tmp_path):
    train_sentencepiece(tmp_path, vocab_size=800)
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
           "added_tokens_decoder": {"800": {"content": "<pad>", "special": True},
                                    "0": {"content": "<unk>", "special": True}}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = Tokenizer.from_hf_dir(tmp_path)
    assert tok.encode("the<pad>")[-1] == 800 and tok.vocab_size == 801 and tok.add_bos_token is False
    cfg["added_tokens_decoder"] = {"805": {"content": "<pad>", "special": True}}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="'<pad>' as id 805, but the next free id is 800"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a\xff\xff\xff")
    with pytest.raises(ValueError, match="not a SentencePiece model"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json or tokenizer.model"):
        Tokenizer.from_hf_dir(tmp_path)


def test_text_that_is_not_unicode_is_a_value_error():
    """A lone surrogate ("\\ud800", valid in JSON and Python strings) was the tokenizers library's
    TypeError, which the engine's callers do not treat as bad input."""
    tok = Tokenizer(train_byte_bpe(pre_tokenizers.ByteLevel(add_prefix_space=False)), None, [], False, None)
    assert tok.encode("hello world") == tok.tok.encode("hello world", add_special_tokens=False).ids
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("a\ud800b")
    with pytest.raises(ValueError, match="must be a string"):
        tok.encode(None)
