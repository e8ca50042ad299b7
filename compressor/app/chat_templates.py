"""The ``chat_template`` of a mergekit config: a template name, ``auto``, or Jinja text.

The names are mergekit's (``alpaca``, ``chatml``, ``exaone``, ``llama3``, ``mistral``);
the templates are written here and render the same text as mergekit's for the same
conversation (a test renders both), except that ``exaone`` leaves out the indentation
mergekit's template leaks into the text. ``auto`` takes the template most of the merged
models' tokenizers carry, as mergekit does; text under 20 characters or without a
``{`` that names no template is refused, as mergekit refuses it.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from compressor.errors import UsageError

NAMED = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
        "message['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + "
        "message['content'] | trim }}{{ '<|eot_id|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{% endif %}"
    ),
    "alpaca": (
        "{% set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ (system | last).content | trim if system else '' }}{{ '\\n\\n' }}"
        "{% set headers = {'user': 'Instruction', 'assistant': 'Response', "
        "'user_context': 'Input'} %}"
        "{% for message in messages %}{% if message['role'] in headers %}"
        "{{ '### ' + headers[message['role']] + ':\\n' + message['content'] | trim }}"
        "{% if not loop.last %}{{ '\\n\\n' }}{% endif %}{% endif %}{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{{ '### Response:\\n' }}{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}"
        "{% if loop.first and message['role'] != 'system' %}"
        "{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
    "mistral": (
        "{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
        "{% set turns = messages[1:] %}{% else %}{% set turns = messages %}{% endif %}"
        "{{ bos_token }}{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('After the optional system message, conversation roles must "
        "alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if message['role'] == 'user' %}"
        "{% if loop.first and system is defined %}"
        "{{ ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' [INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
        "{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'] + eos_token }}"
        "{% else %}{{ raise_exception('Only user and assistant roles are supported, with the "
        "exception of an initial optional system message!') }}{% endif %}{% endfor %}"
    ),
}


def check_chat_template(value, where: str) -> str:
    """The config's ``chat_template`` checked: a name, ``auto`` or Jinja text."""
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where}: chat_template must be a template name, auto or Jinja text")
    if value in NAMED or value == "auto":
        return value
    if len(value) < 20 or "{" not in value:
        names = ", ".join(sorted(NAMED))
        raise UsageError(
            f"{where}: chat_template '{value}' is neither a template name ({names}, auto) "
            "nor a Jinja template"
        )
    return value


def carried_template(source) -> str | None:
    """The chat template a model's tokenizer carries (chat_template.jinja, else the
    tokenizer_config.json key), stripped; None without one."""
    from compressor.io.integrity import read_checked

    files = source.files
    if "chat_template.jinja" in files:
        text = read_checked(Path(files["chat_template.jinja"]), source.label, "chat_template.jinja")
        return text.decode().strip() or None
    if "tokenizer_config.json" in files:
        raw = read_checked(
            Path(files["tokenizer_config.json"]), source.label, "tokenizer_config.json"
        )
        try:
            template = json.loads(raw).get("chat_template")
        except (ValueError, AttributeError):
            return None
        if isinstance(template, list):  # several named templates: the default one
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        return template.strip() if isinstance(template, str) and template.strip() else None
    return None


def resolve_template(choice: str, models: list) -> str | None:
    """The template text for a checked choice; for ``auto`` the one most models carry
    (the first of equals, in config order), None when none carries one."""
    if choice == "auto":
        found = [t for t in map(carried_template, models) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    return NAMED.get(choice, choice)


def with_chat_template(source, template: str, tmp: Path) -> None:
    """Make ``source`` carry ``template``: its tokenizer_config.json rewritten with the
    key, written to ``tmp`` (and a chat_template.jinja it carries replaced, since
    transformers prefers that file)."""
    from compressor.io.integrity import read_checked

    files = dict(source.files)
    if "tokenizer_config.json" not in files:
        return
    raw = read_checked(Path(files["tokenizer_config.json"]), source.label, "tokenizer_config.json")
    config = json.loads(raw)
    config["chat_template"] = template
    path = Path(tmp) / "tokenizer_config.json"
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    files["tokenizer_config.json"] = path
    if "chat_template.jinja" in files:
        jinja = Path(tmp) / "chat_template.jinja"
        jinja.write_text(template)
        files["chat_template.jinja"] = jinja
    source.files = files
