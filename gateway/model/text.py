"""Flows as text, for pretrained language models (``fedgate model train --base-model DIR``).

A pretrained OPT checkpoint knows words, not fedgate's 442 flow tokens.  The
``flow-text`` template writes a flow's facts as a short English sentence
(:func:`flow_sentence`), the checkpoint's own byte-level BPE tokenizer encodes it, and
fine-tuning starts from the checkpoint's embeddings and layers unchanged: no row of its
vocabulary is dropped or re-ordered.

The tokenizer travels in the model directory as a standard ``tokenizer.json`` (the
checkpoint's, with its padding and truncation set to the template's length and the
template marker ``[TEMPLATE:flow-text:v1]`` added as a special token, which takes one of
the checkpoint's spare embedding rows, or one new row past them).  :class:`TextTokenizer`
reads it with the same interface as the flow tokenizer, so training, export, the
engine and federated learning need nothing of their own.

Prompts are padded on the right with the checkpoint's pad token.  The classifier reads
the last non-pad position (Hugging Face's rule, which the ONNX graph mirrors), and in a
causal model the pads after it change nothing, so no attention mask is needed.  The
most telling facts come first, so a long flow cut at the template's length loses only
its tail.
"""

from __future__ import annotations

import math
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

from gateway.flows.record import ConnRecord
from gateway.model.prompt import COMPACT_FIELDS, Template, host_class, port_word, register
from gateway.model.tokenizer import FlowTokenizer, TokenizerError, marker_token

TEXT_LENGTH = 96  # BPE tokens: a GPT-2-style tokenizer spends 45-75 on a flow sentence

STATES = {
    "S0": "a connection attempt with no reply",
    "S1": "an established connection, not closed",
    "SF": "a normal connection, established and closed",
    "REJ": "a connection attempt that was rejected",
    "S2": "an established connection closed by the originator only",
    "S3": "an established connection closed by the responder only",
    "RSTO": "a connection the originator aborted",
    "RSTR": "a connection the responder aborted",
    "RSTOS0": "a SYN then a reset from the originator, no reply",
    "RSTRH": "a SYN-ACK then a reset from the responder, no SYN seen",
    "SH": "a SYN then a FIN from the originator, no reply",
    "SHR": "a SYN-ACK then a FIN from the responder, no SYN seen",
    "OTH": "traffic without a connection handshake",
}
HOSTS = {"priv": "a private address", "pub": "a public address", "bcast": "a broadcast address",
         "mcast": "a multicast address", "loop": "the loopback address", "ll": "a link-local address",
         "unspec": "an unspecified address", "bad": "a malformed address", "-": "an unknown address"}


def _amount(value: int | float | None, unit: str) -> str:
    """``0 bytes``, ``1 packet``, ``about 1500 bytes``: exact below 16, else rounded to
    two significant figures (the quarter-octave buckets of the flow template, in words)."""
    if value is None:
        return f"unknown {unit}s"
    if isinstance(value, float) and not math.isfinite(value):
        return f"unknown {unit}s"
    v = int(value)
    if v < 0:
        return f"a negative number of {unit}s"
    if v < 16:
        return f"{v} {unit}" + ("" if v == 1 else "s")
    digits = len(str(v)) - 2
    return f"about {round(v, -digits):d} {unit}s"


def _duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "an unknown time"
    if seconds < 0.001:
        return "under a millisecond"
    if seconds < 1:
        return f"{max(1, round(seconds * 1000, -1 if seconds > 0.1 else 0)):.0f} milliseconds"
    if seconds < 120:
        return f"{seconds:.0f} seconds" if seconds >= 10 else f"{seconds:.1f} seconds"
    return f"{seconds / 60:.0f} minutes"


def _port(port: int | None) -> str:
    word = port_word(port)
    if word in ("wk", "reg", "dyn"):
        return {"wk": "a well-known port", "reg": "a registered port", "dyn": "a dynamic port"}[word]
    return f"port {word}" if word != "-" else "no port"


def flow_sentence(r: ConnRecord) -> str:
    """A flow's facts in words (no address, no label).  PURE."""
    proto = (r.proto or "unknown").upper()
    service = f" {r.service}" if r.service and r.service != "-" else ""
    state = STATES.get(r.conn_state or "", f"connection state {r.conn_state or 'unknown'}")
    per_packet = ""
    if r.orig_pkts and r.orig_bytes is not None and r.orig_pkts > 0:
        try:
            per_packet = f", {_amount(r.orig_bytes / r.orig_pkts, 'byte')} of payload per packet"
        except OverflowError:
            per_packet = ""
    return (
        f"{proto}{service} from {HOSTS.get(host_class(r.orig_h), 'an address')} {_port(r.orig_p)} "
        f"to {HOSTS.get(host_class(r.resp_h), 'an address')} {_port(r.resp_p)}: {state}. "
        f"The originator sent {_amount(r.orig_pkts, 'packet')} with {_amount(r.orig_bytes, 'byte')}"
        f"{per_packet}; the responder sent {_amount(r.resp_pkts, 'packet')} with "
        f"{_amount(r.resp_bytes, 'byte')}. It lasted {_duration(r.duration)}. "
        f"History {r.history or 'none'}."
    )


FLOW_TEXT = register(Template(
    name="flow-text",
    version=1,
    length=TEXT_LENGTH,
    words=lambda r: (flow_sentence(r),),
    key_fields=COMPACT_FIELDS,
    description="the flow's facts as an English sentence for a pretrained checkpoint's own BPE "
                "tokenizer (--base-model); no addresses",
))
TEXT_TEMPLATES = frozenset({FLOW_TEXT.ident})


def is_text_template(template: Template) -> bool:
    return template.ident in TEXT_TEMPLATES


class TextTokenizer(FlowTokenizer):
    """A checkpoint's BPE tokenizer for a text template: ``encode_record`` gives the
    sentence's ids, right-padded (or cut) to the template's length.  Build one with
    :meth:`from_checkpoint`; :meth:`FlowTokenizer.load` returns one for a text model."""

    def __init__(self, tokenizer: Tokenizer, template: Template, *, cache_size: int = 200_000):
        if cache_size < 0:
            raise ValueError("cache_size must be >= 0")
        padding, truncation = tokenizer.padding, tokenizer.truncation
        if not padding or padding.get("length") != template.length or not truncation \
                or truncation.get("max_length") != template.length or padding.get("direction") != "right":
            raise TokenizerError(f"a {template.ident} tokenizer must pad on the right and cut to "
                                 f"{template.length} tokens")
        self.hf = tokenizer
        self.template = template
        self.vocab = tokenizer.get_vocab()
        self.pad_id = int(padding["pad_id"])
        self.unk_id = self.pad_id  # byte-level BPE has no unknown token; the probe reads pads
        self.cache_size = cache_size
        self._cache: dict[tuple, tuple[int, ...]] = {}
        import operator

        self._key = operator.attrgetter(*template.key_fields)

    @classmethod
    def from_checkpoint(cls, base_dir: str | Path, template: Template = FLOW_TEXT) -> TextTokenizer:
        """The checkpoint's own tokenizer (``AutoTokenizer``: tokenizer.json, or
        vocab.json + merges.txt), set up for ``template``."""
        from transformers import AutoTokenizer

        base_dir = Path(base_dir)
        if not any((base_dir / f).is_file() for f in ("tokenizer.json", "vocab.json", "tokenizer_config.json")):
            raise TokenizerError(f"{base_dir}: no tokenizer files (tokenizer.json, or vocab.json + merges.txt) "
                                 "beside the checkpoint")
        try:
            fast = AutoTokenizer.from_pretrained(base_dir, use_fast=True, local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            raise TokenizerError(f"{base_dir}: no tokenizer the checkpoint can be read with ({exc})") from None
        if not getattr(fast, "is_fast", False):
            raise TokenizerError(f"{base_dir}: only a fast (tokenizers) tokenizer can be used")
        hf = Tokenizer.from_str(fast.backend_tokenizer.to_str())
        pad_id = fast.pad_token_id if fast.pad_token_id is not None else fast.eos_token_id
        if pad_id is None:
            raise TokenizerError(f"{base_dir}: the tokenizer has neither a pad nor an end token")
        hf.add_special_tokens([AddedToken(marker_token(template), special=True)])
        hf.no_padding()
        hf.no_truncation()
        hf.enable_truncation(max_length=template.length, direction="right")
        hf.enable_padding(direction="right", pad_id=pad_id, pad_token=hf.id_to_token(pad_id) or "<pad>",
                          length=template.length)
        return cls(hf, template)

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    def encode_record(self, record: ConnRecord) -> tuple[int, ...]:
        key = self._key(record)
        ids = self._cache.get(key)
        if ids is None:
            ids = tuple(self.hf.encode(flow_sentence(record) if self.template is FLOW_TEXT
                                       else self.template.words(record)[0]).ids)
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            if self.cache_size:
                self._cache[key] = ids
        return ids

    def encode_with_library(self, records):
        import numpy as np

        encs = self.hf.encode_batch([self.template.words(r)[0] for r in records])
        return np.array([e.ids for e in encs], dtype=np.int64).reshape(len(records), self.length)
