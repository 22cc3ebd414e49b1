"""Which worker tracks a packet (``--workers``): a hash of its address pair.

Symmetric (a sum of per-address hashes), so both directions of a connection land on the
same worker; the compiled tracker computes the same hash on the raw header bytes.
Tunnelled packets are sharded by the addresses the decoder reports (the inner pair of
GRE / IP-in-IP, the carrier's pair of a UDP tunnel).
"""

from __future__ import annotations


def _mix(x: int) -> int:
    """Multiplicative hash of a 32-bit value."""
    return ((x * 0x9E3779B1) & 0xFFFFFFFF) >> 16


def address_hash(addr: bytes) -> int:
    """Hash of one IPv4/IPv6 address: its 32-bit words XOR-folded, then mixed."""
    v = int.from_bytes(addr, "big")
    x = 0
    while v:
        x ^= v & 0xFFFFFFFF
        v >>= 32
    return _mix(x)


def packet_shard(src: bytes, dst: bytes, count: int) -> int:
    """Shard of an address pair (symmetric: both directions of a connection agree)."""
    return (address_hash(src) + address_hash(dst)) % count
