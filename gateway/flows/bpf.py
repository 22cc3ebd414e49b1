"""A small tcpdump-filter subset evaluated on decoded packets (for replaying files).

Live capture hands the filter to the kernel (through scapy); files are filtered here, because
compiling real BPF needs libpcap.  Supported: ``tcp``, ``udp``, ``icmp``, ``icmp6``, ``ip``,
``ip6``, ``ip proto N``, ``[src|dst] host ADDR``, ``[src|dst] net CIDR``, ``[tcp|udp]
[src|dst] port N``, ``portrange A-B``, joined with ``and``/``&&``, ``or``/``||``,
``not``/``!`` and parentheses.  Anything else raises :class:`FilterSyntaxError` naming the
token, so a filter is never silently ignored.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

from gateway.flows.packets import PROTO_ICMP, PROTO_ICMP6, PROTO_TCP, PROTO_UDP, Packet

Predicate = Callable[[Packet], bool]

_TOKEN = re.compile(r"\s*(\(|\)|&&|\|\||!|[^\s()!]+)")


class FilterSyntaxError(ValueError):
    pass


def _tokens(text: str) -> list[str]:
    pos, out = 0, []
    text = text.strip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            raise FilterSyntaxError(f"cannot read filter at {text[pos:]!r}")
        out.append(m.group(1))
        pos = m.end()
    return out


def compile_filter(text: str) -> Predicate:
    """A predicate for ``text`` (tcpdump syntax subset)."""
    toks = _tokens(text)
    if not toks:
        return lambda p: True
    parser = _Parser(toks, text)
    pred = parser.expr()
    if parser.i != len(toks):
        raise FilterSyntaxError(f"unexpected {toks[parser.i]!r} in filter {text!r}")
    return pred


class _Parser:
    def __init__(self, toks: list[str], text: str):
        self.t = toks
        self.i = 0
        self.text = text

    def peek(self) -> str | None:
        return self.t[self.i] if self.i < len(self.t) else None

    def take(self) -> str:
        tok = self.peek()
        if tok is None:
            raise FilterSyntaxError(f"filter {self.text!r} ends too early")
        self.i += 1
        return tok

    def expr(self) -> Predicate:
        left = self.conj()
        while self.peek() in ("or", "||"):
            self.take()
            right = self.conj()
            left = (lambda a, b: lambda p: a(p) or b(p))(left, right)
        return left

    def conj(self) -> Predicate:
        left = self.unary()
        while self.peek() in ("and", "&&"):
            self.take()
            right = self.unary()
            left = (lambda a, b: lambda p: a(p) and b(p))(left, right)
        return left

    def unary(self) -> Predicate:
        tok = self.peek()
        if tok in ("not", "!"):
            self.take()
            inner = self.unary()
            return lambda p: not inner(p)
        if tok == "(":
            self.take()
            inner = self.expr()
            if self.take() != ")":
                raise FilterSyntaxError(f"missing ')' in filter {self.text!r}")
            return inner
        return self.primitive()

    def primitive(self) -> Predicate:
        tok = self.take()
        proto = None
        if tok in ("tcp", "udp") and self.peek() in ("port", "src", "dst", "portrange"):
            proto = PROTO_TCP if tok == "tcp" else PROTO_UDP
            tok = self.take()
        if tok == "tcp":
            return lambda p: p.proto == PROTO_TCP
        if tok == "udp":
            return lambda p: p.proto == PROTO_UDP
        if tok == "icmp":
            return lambda p: p.proto == PROTO_ICMP
        if tok == "icmp6":
            return lambda p: p.proto == PROTO_ICMP6
        if tok == "ip" and self.peek() == "proto":
            self.take()
            number = self._int(self.take())
            return lambda p: p.proto == number
        if tok == "ip":
            return lambda p: len(p.src) == 4
        if tok == "ip6":
            return lambda p: len(p.src) == 16
        direction = None
        if tok in ("src", "dst"):
            direction = tok
            tok = self.take()
            if tok in ("or", "and"):  # "src or dst host X"
                other = self.take()
                direction = None if {direction, other} == {"src", "dst"} else direction
                tok = self.take()
        if tok == "host":
            addr = self._addr(self.take())
            return self._by_addr(direction, lambda a: a == addr)
        if tok == "net":
            try:
                net = ipaddress.ip_network(self.take(), strict=False)
            except ValueError as exc:
                raise FilterSyntaxError(str(exc)) from None
            return self._by_addr(direction, lambda a: len(a) == len(net.network_address.packed)
                                 and ipaddress.ip_address(a) in net)
        if tok in ("port", "portrange"):
            value = self.take()
            if tok == "port":
                lo = hi = self._int(value)
            else:
                a, _, b = value.partition("-")
                lo, hi = self._int(a), self._int(b)
            return self._by_port(direction, proto, lo, hi)
        if direction is None and re.fullmatch(r"[0-9a-fA-F:.]+", tok):
            addr = self._addr(tok)  # a bare address means "host ADDR"
            return self._by_addr(None, lambda a: a == addr)
        raise FilterSyntaxError(f"unsupported filter term {tok!r} in {self.text!r}")

    @staticmethod
    def _int(text: str) -> int:
        try:
            return int(text, 0)
        except ValueError:
            raise FilterSyntaxError(f"{text!r} is not a number") from None

    @staticmethod
    def _addr(text: str) -> bytes:
        try:
            return ipaddress.ip_address(text).packed
        except ValueError:
            raise FilterSyntaxError(f"{text!r} is not an IP address") from None

    @staticmethod
    def _by_addr(direction, test) -> Predicate:
        if direction == "src":
            return lambda p: test(p.src)
        if direction == "dst":
            return lambda p: test(p.dst)
        return lambda p: test(p.src) or test(p.dst)

    @staticmethod
    def _by_port(direction, proto, lo, hi) -> Predicate:
        protos = (proto,) if proto else (PROTO_TCP, PROTO_UDP)

        def test(p: Packet) -> bool:
            if p.proto not in protos:
                return False
            if direction == "src":
                return lo <= p.sport <= hi
            if direction == "dst":
                return lo <= p.dport <= hi
            return lo <= p.sport <= hi or lo <= p.dport <= hi

        return test
