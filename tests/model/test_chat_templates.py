"""--chat-template: a name, a file or the Jinja text; bad values fail at start-up with one clear line."""

from __future__ import annotations

import pytest

from tetrispec import LLM
from tetrispec.model.chat_templates import CHAT_TEMPLATES, resolve_chat_template

USER = [{"role": "user", "content": "hi"}]


def test_resolve_by_name_file_and_text(tmp_path):
    assert resolve_chat_template("vicuna_v1.1") == CHAT_TEMPLATES["vicuna_v1.1"]
    (tmp_path / "t.jinja").write_text("{{ messages[0]['content'] | upper }}")
    assert resolve_chat_template(str(tmp_path / "t.jinja")) == "{{ messages[0]['content'] | upper }}"
    assert resolve_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}").startswith("{% for")
    # checked in the environment that renders it: loop controls, as transformers allows them
    assert "{% break %}" in resolve_chat_template("{% for m in messages %}{{ m['content'] }}{% break %}{% endfor %}")


@pytest.mark.parametrize("value, message", [
    ("vicuna", "not a file, not a Jinja template, and not one of vicuna_v1.1, llama-3"),
    ("/no/such/template.jinja", "not a file"),
    ("{% if %}", "does not parse"),
    ("{{ messages[0] ", "does not parse"),
])
def test_bad_templates_are_clear_errors(value, message):
    with pytest.raises(ValueError, match=message):
        resolve_chat_template(value)


def test_engine_uses_the_given_template(tiny_pair):
    own = LLM(tiny_pair[0], spec_method="none", device="cpu", kv_cache_memory_gb=0.05)
    vicuna = LLM(tiny_pair[0], spec_method="none", device="cpu", kv_cache_memory_gb=0.05, chat_template="vicuna_v1.1")
    assert vicuna.tokenizer.apply_chat_template(USER).endswith("USER: hi ASSISTANT:")
    assert own.tokenizer.apply_chat_template(USER).startswith("<|im_start|>user\nhi")
    out = vicuna.chat(USER, use_tqdm=False)[0]
    assert out.prompt_token_ids == vicuna.tokenizer.encode(vicuna.tokenizer.apply_chat_template(USER),
                                                           add_special_tokens=False)
