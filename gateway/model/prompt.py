"""Flow prompts: named, registered templates that turn a conn record into words.

A template is a pure function ``ConnRecord -> tuple[str, ...]`` of a fixed length, so
that every prompt has the same number of tokens and the model needs no padding (the
last word is always ``[END]``, whose hidden state the OPT classifier head reads).  The
words are mapped to ids by a Hugging Face WordLevel ``tokenizer.json`` (see
``gateway.model.tokenizer``); a word never seen in training becomes ``[UNK]``.

Numbers are log-bucketed (``quarter-octaves``: four buckets per doubling) so that a flow
of 1,000 bytes and one of 1,010 bytes read the same word, while small counts, which are
distinctive in IoT traffic (a 48-byte NTP packet, a 1-packet SYN probe), stay exact.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

from gateway.flows.record import ConnRecord

END = "[END]"
UNK = "[UNK]"
PAD = "[PAD]"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, END)

# Ports that name a service IoT malware and devices use; any other port reads as its
# IANA range (wk < 1024 <= reg < 49152 <= dyn).
KNOWN_PORTS: frozenset[int] = frozenset(
    {
        0, 1, 7, 20, 21, 22, 23, 25, 37, 53, 67, 68, 69, 80, 81, 88, 110, 111, 123, 135,
        136, 137, 138, 139, 143, 161, 162, 389, 443, 445, 465, 502, 554, 587, 993, 995,
        1080, 1194, 1723, 1883, 1900, 2323, 2375, 3074, 3306, 3389, 3478, 4433, 4567, 4975,
        5000, 5060, 5222, 5353, 5355, 5358, 5683, 5900, 6379, 6667, 6668, 6697, 7547, 8000,
        8008, 8080, 8081, 8088, 8443, 8883, 9000, 9527, 37215, 49152, 52869, 60001,
    }
)
EXACT_BELOW = 16  # counts below this keep their exact value
HISTORY_LETTERS = 6  # positional history letters after the whole-history word
HISTORY_MAX = 16  # longer histories are cut (the tail is mostly repeated letters)


def port_word(port: int | None) -> str:
    if port is None:
        return "-"
    if port in KNOWN_PORTS:
        return str(port)
    if port < 1024:
        return "wk"
    if port < 49152:
        return "reg"
    return "dyn"


def count_bucket(value: int | float | None) -> str:
    """Exact below ``EXACT_BELOW``, else quarter-octave bucket ``q<n>`` (n = floor(4*log2 v))."""
    if value is None:
        return "-"
    if value < 0:
        return "neg"
    if isinstance(value, float) and not math.isfinite(value):
        return "bad"
    if value < EXACT_BELOW:
        return str(int(value))
    return f"q{int(4 * math.log2(value))}"


def duration_bucket(seconds: float | None) -> str:
    """Half-octave buckets of the duration in milliseconds (0 for under 1 ms)."""
    if seconds is None:
        return "-"
    if not math.isfinite(seconds) or seconds < 0:
        return "bad"
    ms = seconds * 1000.0
    if not math.isfinite(ms):  # a finite duration near float max overflows in ms
        return "bad"
    if ms < 1.0:
        return "0"
    return str(1 + int(2 * math.log2(ms)))


@lru_cache(maxsize=4096)
def host_class(addr: str | None) -> str:
    if not addr:
        return "-"
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return "bad"
    if addr == "255.255.255.255" or (ip.version == 4 and addr.endswith(".255")):
        return "bcast"
    if ip.is_multicast:
        return "mcast"
    if ip.is_unspecified:
        return "unspec"
    if ip.is_loopback:
        return "loop"
    if ip.is_link_local:
        return "ll"
    if ip.is_private:
        return "priv"
    return "pub"


def compact_words(r: ConnRecord) -> tuple[str, ...]:
    """The edge template: 24 words describing one flow without naming its hosts."""
    history = (r.history or "")[:HISTORY_MAX]
    letters = [f"h:{c}" for c in history[:HISTORY_LETTERS]]
    letters += ["h:."] * (HISTORY_LETTERS - len(letters))
    return (
        f"p:{r.proto or '-'}",
        f"s:{r.service or '-'}",
        f"c:{r.conn_state or '-'}",
        f"H:{history or '-'}",
        *letters,
        f"rp:{port_word(r.resp_p)}",
        f"op:{port_word(r.orig_p)}",
        f"rh:{host_class(r.resp_h)}",
        f"oh:{host_class(r.orig_h)}",
        f"d:{duration_bucket(r.duration)}",
        f"ob:{count_bucket(r.orig_bytes)}",
        f"rb:{count_bucket(r.resp_bytes)}",
        f"opk:{count_bucket(r.orig_pkts)}",
        f"rpk:{count_bucket(r.resp_pkts)}",
        f"oib:{count_bucket(r.orig_ip_bytes)}",
        f"rib:{count_bucket(r.resp_ip_bytes)}",
        f"mb:{count_bucket(r.missed_bytes)}",
        f"lo:{_flag(r.local_orig)}{_flag(r.local_resp)}",
        END,
    )


def _flag(value: bool | None) -> str:
    return "-" if value is None else ("T" if value else "F")


# The record fields a template reads: records equal on these give the same words, which
# is what lets the tokenizer cache by key.
COMPACT_FIELDS: tuple[str, ...] = (
    "proto", "service", "conn_state", "history", "resp_p", "orig_p", "resp_h", "orig_h",
    "duration", "orig_bytes", "resp_bytes", "orig_pkts", "resp_pkts", "orig_ip_bytes",
    "resp_ip_bytes", "missed_bytes", "local_orig", "local_resp",
)


@dataclass(frozen=True)
class Template:
    """A registered prompt template: a name, a version and a fixed length."""

    name: str
    version: int
    length: int
    words: Callable[[ConnRecord], tuple[str, ...]]
    key_fields: tuple[str, ...]
    description: str

    @property
    def ident(self) -> str:
        return f"{self.name}/v{self.version}"


TEMPLATES: dict[str, Template] = {}
"""The newest registered version of each template name."""
TEMPLATE_VERSIONS: dict[tuple[str, int], Template] = {}
"""Every registered (name, version): older models keep loading after a template moves on."""


def register(template: Template) -> Template:
    key = (template.name, template.version)
    if key in TEMPLATE_VERSIONS:
        raise ValueError(f"template {template.ident!r} is already registered")
    TEMPLATE_VERSIONS[key] = template
    newest = TEMPLATES.get(template.name)
    if newest is None or template.version > newest.version:
        TEMPLATES[template.name] = template
    return template


class UnknownTemplateError(KeyError, ValueError):
    """No registered template of that name or version.  A ``KeyError`` for lookups and a
    ``ValueError`` for the commands and settings that take a template by name."""

    def __str__(self) -> str:  # KeyError's own quotes the message
        return str(self.args[0])


_IDENT_RE = re.compile(r"(?P<name>.+)/v(?P<version>[0-9]{1,9})")


def get_template(name: str, version: int | None = None) -> Template:
    """The template ``name`` at ``version``; ``name`` may carry the version itself
    (``edge-compact/v2``, a template's ``ident``); without one, its newest version."""
    if version is None and (m := _IDENT_RE.fullmatch(name)):
        name, version = m["name"], int(m["version"])
    try:
        return TEMPLATES[name] if version is None else TEMPLATE_VERSIONS[(name, version)]
    except KeyError:
        registered = ", ".join(sorted(t.ident for t in TEMPLATE_VERSIONS.values()))
        wanted = name if version is None else f"{name}/v{version}"
        raise UnknownTemplateError(f"unknown prompt template {wanted!r}; registered: {registered}") from None


COMPACT = register(
    Template(
        name="edge-compact",
        version=1,
        length=24,
        words=compact_words,
        key_fields=COMPACT_FIELDS,
        description="protocol, service, state, history, port and host classes, "
        "log-bucketed duration/bytes/packets; no addresses",
    )
)


def compact_words_v2(r: ConnRecord) -> tuple[str, ...]:
    """Edge template v2: v1 with the two IP-byte words replaced by bytes per packet.

    The rare IoT-23 labels (FileDownload, C&C-FileDownload, C&C-Torii) have one to a
    dozen training flows whose totals (bytes, packets, duration) fall in other buckets
    than their test twins; the payload size per packet (e.g. ~1,300 B/packet of an HTTP
    download vs ~1.5 B/packet of the request side) is stable across them.  The IP-byte
    totals it replaces are nearly the payload totals plus 40 bytes a packet, so the
    prompt keeps its length (24 words) and the student its speed.
    """
    words = compact_words(r)
    i = words.index(f"oib:{count_bucket(r.orig_ip_bytes)}")
    return (
        *words[:i],
        f"obp:{per_packet_bucket(r.orig_bytes, r.orig_pkts)}",
        f"rbp:{per_packet_bucket(r.resp_bytes, r.resp_pkts)}",
        *words[i + 2 :],
    )


def per_packet_bucket(total: int | None, packets: int | None) -> str:
    """Payload bytes per packet, bucketed like counts; ``-`` without packets."""
    if total is None or not packets or packets < 0:
        return "-"
    try:
        return count_bucket(total / packets)
    except OverflowError:  # a corrupt count too large for a float
        return "bad"


COMPACT_V2 = register(
    Template(
        name="edge-compact",
        version=2,
        length=24,
        words=compact_words_v2,
        key_fields=COMPACT_FIELDS,
        description="v1 with payload bytes per packet (each direction) instead of the "
        "IP-byte totals; no addresses",
    )
)


def compact_words_v3(r: ConnRecord) -> tuple[str, ...]:
    """Edge template v3: v2 where the originator sent no payload, its payload-per-packet
    word (``obp:-``/``obp:0``, saying nothing) gives instead the size of its packets.

    A lone SYN says little by its counts, but its size names the sender's TCP stack: a
    phone or PC sends 60 bytes (MSS, SACK, timestamps, window scale) where Mirai's
    raw-socket flood sends 40.  In v2 those SYNs to port 80 read the same words, and the
    benign ones among them were called DDoS.  Only payload-less flows change: with
    payload, Zeek's byte count comes from sequence numbers (gaps included) and the
    IP-byte remainder is noise that would split a rare download from its one training
    twin.  Every other word is v2's, so a flow with payload reads exactly as in v2 (two
    variants that added a word of their own made federated learning less stable: see
    the README's "Model quality").
    """
    words = compact_words_v2(r)
    if r.orig_bytes:  # None (Zeek's "-") and 0 both mean no payload
        return words
    size = bare_packet_size(r.orig_ip_bytes, r.orig_pkts)
    if size == "-":
        return words
    i = words.index(f"obp:{per_packet_bucket(r.orig_bytes, r.orig_pkts)}")
    return (*words[:i], f"obp:b{size}", *words[i + 1 :])


def bare_packet_size(ip_bytes: int | None, packets: int | None) -> str:
    """IP bytes per packet of a direction that carried no payload, to TCP's 4-byte
    option words (``60``, ``40``; a bare UDP datagram is ``28``); beyond 255 bytes
    bucketed like counts; ``-`` without packets or IP bytes."""
    if ip_bytes is None or not packets or packets < 0:
        return "-"
    try:
        size = ip_bytes / packets
    except OverflowError:  # a corrupt count too large for a float
        return "bad"
    if size < 0:
        return "neg"
    return str(4 * round(size / 4)) if size < 256 else count_bucket(size)


COMPACT_V3 = register(
    Template(
        name="edge-compact",
        version=3,
        length=24,
        words=compact_words_v3,
        key_fields=COMPACT_FIELDS,
        description="v2, with the originator's packet size (TCP options tell stacks "
        "apart) in place of its payload per packet when it sent no payload; no addresses",
    )
)
# What new models are built with unless a template is named.  v3 removes the v2
# prompts' only benign/DDoS collisions, but federated learning from scratch is less
# stable with it (GSFS ends at or above 0.99 on 4 of 8 seeds against 7 of 8 with v2);
# the README's "Model quality" has both measurements.
DEFAULT_TEMPLATE = COMPACT_V2.ident
