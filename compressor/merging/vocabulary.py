"""Merging models whose tokenizers differ: one output vocabulary, every model's
token-indexed rows (embeddings, LM head) moved to it, as mergekit's
``tokenizer_source`` does.

The output tokenizer is the base model's (``base``), one model's, or the
``union``: the base tokenizer with every other model's tokens added after its
own, in the config's model order (mergekit adds them in the order of a Python
set, so its token ids can differ from run to run; the rows per token agree).
A model's row for a token it lacks is, as in mergekit's PermutedVocabulary:
the one model's row that has it; else the base model's row when the base has
it; else the mean of the rows of the models that have it; zero when none has.
Rows past the vocabulary (``pad_to_multiple_of``) are each model's mean row.
See https://github.com/arcee-ai/mergekit/blob/main/mergekit/tokenizer/embed.py
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
from pathlib import Path

import torch

from compressor.errors import UsageError
from compressor.io.sources import RewrittenConfig, TensorSource

# files that make up a saved Hugging Face tokenizer; replaced by the output tokenizer's
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)
# what in each tokenizer file decides token ids (None: the whole file); padding, truncation,
# chat templates, max lengths and the like are runtime settings and do not count
_ID_DECIDING = {
    "tokenizer.json": ("model", "added_tokens", "normalizer", "pre_tokenizer"),
    "tokenizer_config.json": ("added_tokens_decoder",),
    "added_tokens.json": None,
    "vocab.txt": None,
    "vocab.json": None,
    "merges.txt": None,
    "tokenizer.model": None,
}


def token_id_rules(source: TensorSource) -> dict[str, object]:
    """Per tokenizer file a model carries, the part that decides token ids (hash-checked
    when read from the store): two models whose rules are equal number tokens alike."""
    from compressor.io.integrity import read_checked

    rules = {}
    for rel, keys in _ID_DECIDING.items():
        if rel not in source.files:
            continue
        data = read_checked(Path(source.files[rel]), source.label, rel)
        if keys is None:
            rules[rel] = data
            continue
        try:
            doc = json.loads(data)
        except ValueError:
            rules[rel] = data  # not JSON: compared as bytes
            continue
        rules[rel] = {k: doc.get(k) for k in keys} if isinstance(doc, dict) else doc
    return rules


# token-indexed tensors: input and output embeddings (and a vocabulary bias) by module name
_VOCAB_MODULE = re.compile(
    r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out|decoder)\.(weight|bias)$"
    r"|(^|\.)predictions\.bias$"
)


def origin(source: TensorSource, name: str) -> TensorSource:
    """The source a tensor is really read from (through a restacking of layers)."""
    mapping = getattr(source, "mapping", None)
    return mapping[name][0] if mapping is not None and name in mapping else source


def vocab_size(source: TensorSource, where: str) -> int:
    """The ``vocab_size`` in a model's config.json."""
    size = (source.config() or {}).get("vocab_size")
    if not isinstance(size, int) or isinstance(size, bool):
        raise UsageError(f"{where}: {source.label} has no vocab_size in its config.json")
    return size


def is_vocab_tensor(name: str, shape: tuple[int, ...], size: int) -> bool:
    """Whether a tensor's first axis is indexed by token id."""
    return bool(shape) and shape[0] == size and _VOCAB_MODULE.search(name) is not None


@dataclasses.dataclass
class Vocabulary:
    """The output tokenizer (saved in ``directory``), its row count and, per model, the
    row each output token comes from (-1 where the model lacks the token)."""

    directory: Path
    tokens: int
    rows: int
    permutations: dict[int, torch.Tensor]  # id(model source) -> long tensor of ``tokens``
    _tmp: tempfile.TemporaryDirectory


def build_vocabulary(
    models: list[TensorSource],
    base: TensorSource | None,
    choice: str | int,
    where: str,
    pad_to_multiple_of: int | None = None,
) -> Vocabulary:
    """The output vocabulary of ``models`` (the base among them, if any) for ``choice``:
    ``base``, ``union`` or the index in ``models`` of the model whose tokenizer to use."""
    from compressor.models.modeling import source_tokenizer

    first = base if base is not None else models[0]
    tokenizers = {id(m): source_tokenizer(m) for m in models}
    sizes = {id(m): vocab_size(m, where) for m in models}
    chosen = None if choice in ("base", "union") else tokenizers[id(models[choice])]
    # tokens at or past a model's vocab_size have no embedding row: absent from that model
    # (the permutations below); the base's tokenizer loses them, as mergekit strips it
    tokenizers[id(first)] = _stripped(tokenizers[id(first)], sizes[id(first)], first, where)
    tmp = tempfile.TemporaryDirectory(prefix="compress-tokenizer-")
    out = Path(tmp.name)
    if choice == "union":
        tokenizer = _union(first, models, tokenizers, sizes, out)
    else:
        tokenizer = chosen or tokenizers[id(first)]  # a model named as the source: as it is
        tokenizer.save_pretrained(out)
    vocab = tokenizer.get_vocab()
    tokens = len(vocab)
    rows = tokens
    if pad_to_multiple_of and rows % pad_to_multiple_of:
        rows += pad_to_multiple_of - rows % pad_to_multiple_of
    permutations = {}
    for m in models:
        own, size = tokenizers[id(m)].get_vocab(), sizes[id(m)]
        p = torch.full((tokens,), -1, dtype=torch.long)
        for tok, new in vocab.items():
            old = own.get(tok)
            if old is not None and old < size:
                p[new] = old
        permutations[id(m)] = p
    return Vocabulary(out, tokens, rows, permutations, tmp)


def _stripped(tokenizer, size: int, model: TensorSource, where: str):
    """The tokenizer without the tokens at or past ``size`` (a tokenizer padded past its
    model's embedding rows): gone from the vocabulary, the added tokens and BPE merges."""
    beyond = {t for t, i in tokenizer.get_vocab().items() if i >= size}
    if not beyond:
        return tokenizer
    from tokenizers import Tokenizer

    doc = json.loads(tokenizer.backend_tokenizer.to_str()) if tokenizer.is_fast else None
    kind = (doc or {}).get("model", {}).get("type")
    if kind not in ("BPE", "WordLevel"):
        raise UsageError(
            f"{where}: {model.label}'s tokenizer has {len(beyond)} tokens at or past its "
            f"vocab_size {size}, and only a fast BPE or word-level tokenizer can be cut "
            "back to its embedding rows"
        )
    doc["added_tokens"] = [e for e in doc.get("added_tokens", []) if e["id"] < size]
    doc["model"]["vocab"] = {t: i for t, i in doc["model"]["vocab"].items() if t not in beyond}
    if kind == "BPE":  # a merge goes when a part or its result goes
        pairs = [m.split(" ") if isinstance(m, str) else m for m in doc["model"]["merges"]]
        doc["model"]["merges"] = [
            m
            for m, pair in zip(doc["model"]["merges"], pairs, strict=True)
            if not ({*pair, "".join(pair)} & beyond)
        ]
    tokenizer._tokenizer = Tokenizer.from_str(json.dumps(doc))
    return tokenizer


def _union(first, models, tokenizers, sizes, out: Path):
    """The base tokenizer with every other model's tokens added after its own (what
    mergekit's build_union_tokenizer adds, in the config's model order)."""
    import transformers

    order = [first, *[m for m in models if m is not first]]
    new_tokens, added = {}, {}
    for m in order:
        tok = tokenizers[id(m)]
        for token, i in tok.get_vocab().items():
            if i < sizes[id(m)]:
                new_tokens.setdefault(token, None)
        for i, info in tok.added_tokens_decoder.items():
            if i < sizes[id(m)]:
                added.setdefault(info.content, info)
    tokenizers[id(first)].save_pretrained(out)
    union = transformers.AutoTokenizer.from_pretrained(out, use_fast=True)
    base_vocab = tokenizers[id(first)].get_vocab()
    for token in new_tokens:
        if token not in added and token not in base_vocab:
            union.add_tokens(token)
    for info in added.values():
        union.add_tokens(info)
    union.save_pretrained(out)
    return union


class VocabAligner:
    """Every model's token-indexed tensors moved to one vocabulary, computed once per
    tensor name for all models together (a missing token's row depends on the others)."""

    def __init__(self, vocab: Vocabulary, sources: list[TensorSource], base: TensorSource | None):
        self.vocab = vocab
        self.sources = sources
        self.base = base
        self._name = None
        self._rows: dict[int, torch.Tensor] = {}

    def aligned(self, source: TensorSource, name: str) -> torch.Tensor:
        if name != self._name:
            self._rows = self._align(name)
            self._name = name
        return self._rows[id(source)]

    def _align(self, name: str) -> dict[int, torch.Tensor]:
        perms = [self.vocab.permutations[id(origin(s, name))] for s in self.sources]
        tensors = [s.get(name) for s in self.sources]
        dtype = tensors[0].dtype
        for t in tensors[1:]:
            dtype = torch.promote_types(dtype, t.dtype)
        present = torch.stack([p >= 0 for p in perms])  # models x tokens
        rows = [t.to(dtype)[p.clamp(min=0)] for t, p in zip(tensors, perms, strict=True)]
        shape = (-1,) + (1,) * (rows[0].dim() - 1)
        total = torch.zeros_like(rows[0])
        for r, has in zip(rows, present, strict=True):
            total = total + r * has.view(shape).to(dtype)
        count = present.sum(0)
        default = total / count.clamp(min=1).view(shape).to(dtype)
        if self.base is not None:
            b = self.sources.index(self.base)
            from_base = (present[b] & (count >= 2)).view(shape)
            default = torch.where(from_base, rows[b], default)
        out = {}
        for s, r, has in zip(self.sources, rows, present, strict=True):
            full = torch.where(has.view(shape), r, default)
            if self.vocab.rows > self.vocab.tokens:
                pad = full.mean(0, keepdim=True).expand(
                    self.vocab.rows - self.vocab.tokens, *r.shape[1:]
                )
                full = torch.cat([full, pad])
            out[id(s)] = full.contiguous()
        return out


class VocabAlignedSource(TensorSource):
    """A model seen through the output vocabulary: its token-indexed tensors aligned,
    the output tokenizer's files and a config.json with the new ``vocab_size``."""

    def __init__(self, source: TensorSource, aligner: VocabAligner, where: str):
        self.source = source
        self.aligner = aligner
        self.label = source.label
        self.content = source.content
        self.manifest = source.manifest
        vocab = aligner.vocab
        self._vocab = set()
        self._infos = {}
        for name, info in source.infos().items():
            size = vocab_size(origin(source, name), where)
            if is_vocab_tensor(name, info.shape, size):
                self._vocab.add(name)
                info = dataclasses.replace(info, shape=(vocab.rows, *info.shape[1:]))
            self._infos[name] = info
        self.files = {r: p for r, p in source.files.items() if r not in TOKENIZER_FILES}
        for path in vocab.directory.iterdir():
            if path.name in TOKENIZER_FILES or path.name == "chat_template.jinja":
                self.files[path.name] = path
        config = source.config()
        if config is not None:
            self._config = RewrittenConfig({**config, "vocab_size": vocab.rows})
            self.files["config.json"] = self._config.path

    def infos(self):
        return self._infos

    def get(self, name, rows=None):
        if name not in self._vocab:
            return self.source.get(name, rows)
        full = self.aligner.aligned(self.source, name)
        return full if rows is None else full[rows]


def aligned_sources(
    base: TensorSource | None,
    inputs: list[TensorSource],
    models: list[TensorSource],
    model_base: TensorSource | None,
    choice: str | int,
    where: str,
    pad_to_multiple_of: int | None = None,
):
    """The job's ``base`` and ``inputs`` (read from ``models``, maybe restacked by slices)
    seen through the vocabulary ``choice`` builds from the models' tokenizers."""
    vocab = build_vocabulary(models, model_base, choice, where, pad_to_multiple_of)
    job = [s for s in [base, *inputs] if s is not None]
    aligner = VocabAligner(vocab, job, base)
    wrapped = {id(s): VocabAlignedSource(s, aligner, where) for s in job}
    return (
        wrapped[id(base)] if base is not None else None,
        [wrapped[id(s)] for s in inputs],
    )
