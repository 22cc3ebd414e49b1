"""Field-by-field agreement between two sets of conn records (e.g. Zeek's and ours).

Records are paired on the 5-tuple in order of appearance (the k-th baseline record of a
5-tuple with the k-th candidate record of the same 5-tuple), as Zeek's own log comparisons
do; ts and uid are never compared.  Used by the conformance test and
``benchmarks/zeek_conformance.py``.
"""

from __future__ import annotations

import io
import json
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from gateway.flows.record import ConnRecord

CORE_FIELDS = ("duration", "orig_bytes", "resp_bytes", "conn_state", "history", "missed_bytes",
               "orig_pkts", "orig_ip_bytes", "resp_pkts", "resp_ip_bytes")
DURATION_TOLERANCE = 1e-5


def _key(r: ConnRecord) -> tuple:
    return (r.orig_h, r.orig_p, r.resp_h, r.resp_p, r.proto)


def _equal(name: str, a, b) -> bool:
    if name == "duration":
        if a is None or b is None:
            return a is None and b is None
        return abs(a - b) <= DURATION_TOLERANCE
    return a == b


@dataclass
class Comparison:
    baseline: int = 0
    candidate: int = 0
    matched: int = 0
    missing: list[ConnRecord] = field(default_factory=list)
    extra: list[ConnRecord] = field(default_factory=list)
    agree: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CORE_FIELDS + ("service",), 0))
    mismatches: list[tuple[tuple, str, object, object]] = field(default_factory=list)

    @property
    def core_agreement(self) -> float:
        total = self.matched * len(CORE_FIELDS)
        return sum(self.agree[f] for f in CORE_FIELDS) / total if total else 0.0

    def merge(self, other: Comparison) -> None:
        self.baseline += other.baseline
        self.candidate += other.candidate
        self.matched += other.matched
        self.missing += other.missing
        self.extra += other.extra
        for k, v in other.agree.items():
            self.agree[k] += v
        self.mismatches += other.mismatches


def compare_records(baseline: Iterable[ConnRecord], candidate: Iterable[ConnRecord]) -> Comparison:
    base = list(baseline)
    cand = list(candidate)
    result = Comparison(baseline=len(base), candidate=len(cand))
    pool: dict[tuple, list[ConnRecord]] = defaultdict(list)
    for r in cand:
        pool[_key(r)].append(r)
    for b in base:
        options = pool.get(_key(b))
        if not options:
            result.missing.append(b)
            continue
        c = options.pop(0)
        result.matched += 1
        for name in CORE_FIELDS:
            va, vb = getattr(b, name), getattr(c, name)
            if _equal(name, va, vb):
                result.agree[name] += 1
            else:
                result.mismatches.append((_key(b), name, va, vb))
        if set((b.service or "").split(",")) == set((c.service or "").split(",")):
            result.agree["service"] += 1
    result.extra = [r for rs in pool.values() for r in rs]
    return result


_MASKED_TS = re.compile(rb"^X+\.X+(?=\t)", re.MULTILINE)


def read_baseline(path: str | Path) -> list[ConnRecord]:
    """Read a Zeek btest baseline conn.log (its masked ``ts`` column becomes 0)."""
    from gateway.flows.zeek import iter_records

    data = _MASKED_TS.sub(b"0.000000", Path(path).read_bytes())
    return list(iter_records(io.BytesIO(data)))


def load_manifest(root: str | Path) -> list[dict]:
    return json.loads((Path(root) / "manifest.json").read_text())


def case_options(case: dict) -> dict:
    """``convert_captures``/``pcap_records`` options matching a manifest case's Zeek flags."""
    from gateway.flows.conntrack import likely_server_ports_for

    protocols = None
    if case.get("bare_mode") or "-b" in case.get("zeek_flags", []):
        protocols = tuple(s.rsplit("/", 1)[-1] for s in case.get("scripts_loaded", []) if "/protocols/" in s)
        protocols = tuple(p for p in protocols if p != "conn")
    return {
        "ignore_checksums": bool(case.get("ignore_checksums") or "-C" in case.get("zeek_flags", [])),
        "likely_server_ports": likely_server_ports_for(protocols),
        "protocols": protocols,
    }
