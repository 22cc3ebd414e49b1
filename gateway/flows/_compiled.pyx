# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compiled hot path of gateway.flows: frames in, Zeek conn records out.

One extension module built from ``.pxi`` files that each sit beside the Python module
they mirror (issue 19: the pure-Python path is the reference and the fallback):

* ``packets.pxi`` - the common frame shapes of ``packets.py`` (Ethernet / VLAN / PPPoE,
  SLL, raw IP; IPv4, IPv6; TCP, UDP, ICMP), decoded straight from the capture's bytes;
* ``conntrack/conn.pxi``, ``timers.pxi``, ``tcp.pxi``, ``udp.pxi``, ``icmp.pxi``,
  ``tracker.pxi`` - ``conntrack``'s per-packet logic (the one compiled copy of the TCP
  state machine), with the connection table, timers and eviction in C;
* ``pcap/classic.pxi`` - the classic pcap record walk of ``pcap/classic.py``.

What runs once per connection or per record - the port's analyzer, payload sniffing,
DNS/NTP flips, FTP data channels, conn_state, uids, address text, the record itself - is
the Python code of ``conntrack``, called on this module's connections.  Frames of other
shapes go to :class:`~gateway.flows.packets.PacketDecoder` and the Packet it makes is
tracked here.  tests/unit/test_conntrack_compiled.py and test_pcap_pipeline.py hold the
records equal to the reference's, hypothesis included.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from cpython.ref cimport Py_DECREF, Py_INCREF, PyObject
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy, memset

import os

from gateway.flows.conntrack.conn import DEFAULT_LOCAL_NETS, AddressBook, build_record, conn_uid, tunnel_uid
from gateway.flows.conntrack.icmp import ICMP4_COUNTERPART, ICMP6_COUNTERPART, icmp_summary, unknown_summary
from gateway.flows.conntrack.services import (
    DEFAULT_LIKELY_SERVER_PORTS,
    PORT_INACTIVITY,
    ExpectedChannels,
    add_service,
    app_for,
    detect_tcp_service,
    udp_app,
)
from gateway.flows.conntrack.tcp import TCP_TRANSITIONS, IllegalTransition, TcpState, covered, merge_blocks, tcp_conn_state
from gateway.flows.conntrack.tracker import IDLE_HEAP_SLACK
from gateway.flows.conntrack.udp import udp_summary
from gateway.flows.packets import UDP_TUNNEL_PORTS, Packet, PacketDecoder
from gateway.flows.settings import FlowSettings
from gateway.flows.shard import packet_shard

include "packets.pxi"
include "conntrack/conn.pxi"
include "conntrack/timers.pxi"
include "conntrack/tcp.pxi"
include "conntrack/udp.pxi"
include "conntrack/icmp.pxi"
include "conntrack/tracker.pxi"
include "pcap/classic.pxi"
