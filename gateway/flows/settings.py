"""Limits of packet decoding and connection tracking: one frozen dataclass, the gateway's
``[flows]`` section and the defaults of every pcap/live entry point.

Memory is bounded by these whatever the traffic: past ``max_connections`` the connection
idle longest is ended early (``connection_table_full``); past ``max_fragment_buffers``
the oldest incomplete IP datagram is dropped (``fragment_buffer_overflow``), and one
older than ``fragment_timeout_s`` is dropped too (``fragment_timeout``).  Both tables
cost O(log n) per packet when full (docs/flows-performance.md measures it).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class FlowSettings:
    """``[flows]``: bounds of the connection table and of IP fragment reassembly.

    max_connections [1000000]: connections tracked at once (about 0.3-1 KiB each).
    max_fragment_buffers [10000]: incomplete IP datagrams kept for reassembly.
    fragment_timeout_s [60.0]: how long an incomplete datagram waits for its fragments.
    """

    max_connections: int = 1_000_000
    max_fragment_buffers: int = 10_000
    fragment_timeout_s: float = 60.0

    def __post_init__(self) -> None:
        for name, value, low, high in (("max_connections", self.max_connections, 1, 100_000_000),
                                       ("max_fragment_buffers", self.max_fragment_buffers, 1, 10_000_000)):
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"flows.{name}: must be an integer in {low}..{high}, got {value!r}")
        t = self.fragment_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 3600:
            raise ValueError(f"flows.fragment_timeout_s: must be in (0, 3600] seconds, got {t!r}")
