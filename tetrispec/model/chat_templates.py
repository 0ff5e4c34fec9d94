"""Chat templates: rendering (the sandboxed environment transformers uses), and templates for
checkpoints that ship none (Vicuna's repositories, base models), by name.

`--chat-template` (vLLM's flag) takes one of these names, a file holding a Jinja template, or the
template text itself; it replaces whatever template the checkpoint ships.
"""

from __future__ import annotations

import functools
import json
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox

_VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHAT_TEMPLATES: dict[str, str] = {
    # FastChat's vicuna_v1.1: system + " " + "USER: q ASSISTANT: a</s>USER: q2 ASSISTANT:"
    "vicuna_v1.1": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set loop_messages = messages[1:] %}"
        "{% else %}{% set system = '" + _VICUNA_SYSTEM.replace("'", "\\'") + "' %}"
        "{% set loop_messages = messages %}{% endif %}"
        "{{ system + ' ' }}"
        "{% for m in loop_messages %}"
        "{% if m['role'] == 'user' %}{{ 'USER: ' + m['content'] + ' ' }}"
        "{% else %}{{ 'ASSISTANT: ' + m['content'] + '</s>' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
    ),
    "llama-3": (
        "{{ '<|begin_of_text|>' }}"
        "{% for m in messages %}"
        "{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + m['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
}



def resolve_chat_template(value: str) -> str:
    """The Jinja text `value` stands for; a clear error when it is none of the three forms or
    does not parse, at start-up rather than at the first chat request."""
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    path = Path(value)
    if "{" not in value and len(value) < 4096 and path.is_file():
        text = path.read_text(encoding="utf-8")
    elif "{{" in value or "{%" in value:
        text = value
    else:
        raise ValueError(f"chat template {value!r}: not a file, not a Jinja template, and not one of "
                         f"{', '.join(CHAT_TEMPLATES)}")
    try:
        _compile(text)  # the environment that renders it (loop controls parse there, not in a bare one)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template {value[:60]!r} does not parse: {e.message} (line {e.lineno})") from None
    return text


def render(template: str, **variables) -> str:
    """Render chat-template text: the server's templates and the benchmark client's alike."""
    return _compile(template).render(**variables)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


@functools.lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: (
        json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    )
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
