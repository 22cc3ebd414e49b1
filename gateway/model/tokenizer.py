"""The flow tokenizer: a prompt template plus a WordLevel vocabulary in ``tokenizer.json``.

The file is a standard Hugging Face ``tokenizers`` file (``Tokenizer.from_file`` reads
it); the template it was built for travels inside it as a special marker token
``[TEMPLATE:<name>:v<version>]``, because the format rejects unknown keys.  Loading
checks that marker against the registered template, so a model can never be fed
prompts of a template it was not trained on.

Encoding is the hot path of replay: the words of a record depend only on the template's
``key_fields``, and real logs repeat the same flow shape again and again, so ids are
cached by that key (a bounded dict) and the template runs once per distinct shape.
"""

from __future__ import annotations

import json
import operator
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

from gateway.flows.record import ConnRecord
from gateway.model.prompt import PAD, SPECIAL_TOKENS, UNK, Template, get_template

MARKER_RE = re.compile(r"^\[TEMPLATE:(?P<name>[A-Za-z0-9_.-]+):v(?P<version>\d+)\]$")


class TokenizerError(ValueError):
    """A tokenizer file is missing, unreadable or of another template/version."""


class TokenizerVersionError(TokenizerError):
    """The tokenizer was built for another template version than the one registered."""


def marker_token(template: Template) -> str:
    return f"[TEMPLATE:{template.name}:v{template.version}]"


class FlowTokenizer:
    """Turns conn records into fixed-length id rows (``int64[N, template.length]``).

    Build one with :meth:`build` (from training records) or :meth:`load`
    (``tokenizer.json``).  ``encode`` is thread-safe: the cache is a plain dict whose
    single-key reads and writes are atomic under the GIL.
    """

    def __init__(self, tokenizer: Tokenizer, template: Template, *, cache_size: int = 200_000):
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        self.hf = tokenizer
        self.template = template
        self.vocab: dict[str, int] = tokenizer.get_vocab()
        for special in SPECIAL_TOKENS:
            if special not in self.vocab:
                raise TokenizerError(f"tokenizer vocabulary lacks the special token {special}")
        self.unk_id = self.vocab[UNK]
        self.pad_id = self.vocab[PAD]
        self.cache_size = cache_size
        self._cache: dict[tuple, tuple[int, ...]] = {}
        self._key = operator.attrgetter(*template.key_fields)

    # -- construction -------------------------------------------------------------------
    @classmethod
    def build(
        cls, records: Iterable[ConnRecord], template: Template, *, min_count: int = 1
    ) -> FlowTokenizer:
        """A vocabulary of every word the template produces at least ``min_count`` times."""
        if min_count < 1:
            raise ValueError("min_count must be >= 1")
        counts: Counter[str] = Counter()
        for r in records:
            counts.update(template.words(r))
        words = sorted(w for w, n in counts.items() if n >= min_count and w not in SPECIAL_TOKENS)
        specials = [*SPECIAL_TOKENS, marker_token(template)]
        vocab = {w: i for i, w in enumerate(specials + words)}
        hf = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        # Prompts are joined by single spaces when a string is tokenised directly.
        hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        hf.add_special_tokens(specials)
        return cls(hf, template)

    @classmethod
    def load(cls, path: str | Path) -> FlowTokenizer:
        """Read ``tokenizer.json``; raise :class:`TokenizerError` naming the file if bad."""
        path = Path(path)
        if not path.is_file():
            raise TokenizerError(f"{path}: tokenizer file is missing")
        try:
            hf = Tokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({exc})") from exc
        return cls.from_hf(hf, source=str(path))

    @classmethod
    def from_hf(cls, hf: Tokenizer, *, source: str = "tokenizer") -> FlowTokenizer:
        markers = [m for t in hf.get_vocab() if (m := MARKER_RE.match(t))]
        if len(markers) != 1:
            raise TokenizerError(f"{source}: expected one [TEMPLATE:name:vN] marker, found {len(markers)}")
        name, version = markers[0]["name"], int(markers[0]["version"])
        from gateway.model import text  # registers the text templates (a circular import at the top)

        try:
            newest = get_template(name)
        except KeyError as exc:
            raise TokenizerError(f"{source}: {exc.args[0]}") from None
        try:
            template = get_template(name, version)
        except KeyError:
            raise TokenizerVersionError(
                f"{source}: built for template {name} v{version}, but this fedgate has "
                f"v{newest.version} (and none of that version); rebuild the model (fedgate model train)"
            ) from None
        kind = text.TextTokenizer if text.is_text_template(template) else FlowTokenizer
        try:
            return kind(hf, template)
        except TokenizerError as exc:
            raise TokenizerError(f"{source}: {exc}") from None

    def save(self, path: str | Path) -> None:
        self.hf.save(str(path), pretty=True)

    def to_str(self) -> str:
        return self.hf.to_str()

    # -- encoding -----------------------------------------------------------------------
    @property
    def length(self) -> int:
        return self.template.length

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size()

    def words(self, record: ConnRecord) -> tuple[str, ...]:
        return self.template.words(record)

    def encode_record(self, record: ConnRecord) -> tuple[int, ...]:
        key = self._key(record)
        ids = self._cache.get(key)
        if ids is None:
            get, unk = self.vocab.get, self.unk_id
            ids = tuple(get(w, unk) for w in self.template.words(record))
            if len(self._cache) >= self.cache_size:
                self._cache.clear()  # cheap bound; shapes repeat so it refills fast
            if self.cache_size:
                self._cache[key] = ids
        return ids

    def encode(self, records: Sequence[ConnRecord]) -> np.ndarray:
        """``int64[len(records), length]`` token ids; unknown words become ``[UNK]``."""
        enc = self.encode_record
        out = np.array([enc(r) for r in records], dtype=np.int64)
        if out.size == 0:
            return np.zeros((0, self.length), dtype=np.int64)
        return out

    def encode_with_library(self, records: Sequence[ConnRecord]) -> np.ndarray:
        """The same ids through the ``tokenizers`` library (slow path, for checks)."""
        encs = self.hf.encode_batch([list(self.template.words(r)) for r in records], is_pretokenized=True)
        return np.array([e.ids for e in encs], dtype=np.int64).reshape(len(records), self.length)

    def describe(self) -> dict:
        return {"template": self.template.name, "template_version": self.template.version,
                "vocab_size": self.vocab_size, "length": self.length}


def tokenizer_digest(tokenizer: FlowTokenizer) -> str:
    import hashlib

    vocab = sorted(tokenizer.vocab.items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]
