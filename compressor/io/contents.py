"""What an artifact's tensors are: the content vocabulary and its rules, in one place.

``model``: full weights, exportable and evaluable as they are. ``delta``: a task
vector, needs a base to become a model. ``adapter``: PEFT LoRA factors, needs a
base. ``tensors``: plain tensors, neither. A method that makes something new
declares it here with the same rules.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Content:
    """One kind of artifact content and what can be done with it."""

    name: str
    description: str  # "a task vector"
    is_model: bool = False  # exportable and evaluable as it is
    needs_base: bool = False  # becomes a model when added to a base
    has_config: bool = False  # a directory export carries config.json (transformers, PEFT load it)


CONTENTS: dict[str, Content] = {
    c.name: c
    for c in (
        Content("model", "a model", is_model=True, has_config=True),
        Content("delta", "a task vector", needs_base=True),
        Content("adapter", "a PEFT adapter", needs_base=True, has_config=True),
        Content("tensors", "plain tensors"),
    )
}


def content_rules(name: str) -> Content:
    """The rules of a content; an unknown one is treated as plain tensors."""
    return CONTENTS.get(name) or Content(name, f"'{name}' content")


def describe_content(name: str) -> str:
    """A phrase for messages: "a task vector"."""
    return content_rules(name).description
