"""Connection tracking with Zeek's conn.log semantics, as a pure state machine.

Packets (:class:`gateway.flows.packets.Packet`) go in, in time order; :class:`ConnRecord`
values come out when connections end (timeouts, closes, reuse, a full table) or on
``flush()``.  No I/O: time is the packets' time.  One module per concern, as Zeek's
analyzers are laid out:

* :mod:`.tracker` - the table, dispatch, eviction, timers firing (``ConnTracker``);
* :mod:`.tcp` - TCP endpoints and the state machine (``TCPSessionAdapter.cc``,
  ``TCP_Endpoint.cc``); :mod:`.udp`; :mod:`.icmp` (and other IP protocols);
* :mod:`.timers` - Zeek's timeouts and the timer queue;
* :mod:`.services` - likely server ports, the port's analyzer, payload sniffing, the
  DNS/NTP flips, FTP data channels;
* :mod:`.conn` - the connection, uids, local networks, the record.

The compiled tracker (``gateway/flows/_compiled.pyx`` with a ``.pxi`` beside each module
it mirrors) gives the same records faster; :func:`new_tracker` picks it when it is built.
"""

from gateway.flows.conntrack.conn import DEFAULT_LOCAL_NETS, AddressBook, Conn, conn_key
from gateway.flows.conntrack.services import (
    DEFAULT_LIKELY_SERVER_PORTS,
    PROTOCOL_SERVER_PORTS,
    likely_server_ports_for,
    sniff_service,
)
from gateway.flows.conntrack.tcp import (
    ACK,
    FIN,
    PSH,
    RST,
    SYN,
    TCP_TRANSITIONS,
    URG,
    IllegalTransition,
    TcpEndpoint,
    TcpState,
    seq_delta,
    tcp_conn_state,
)
from gateway.flows.conntrack.tracker import ConnTracker

__all__ = [
    "ACK", "FIN", "PSH", "RST", "SYN", "URG", "TCP_TRANSITIONS", "DEFAULT_LIKELY_SERVER_PORTS",
    "DEFAULT_LOCAL_NETS", "PROTOCOL_SERVER_PORTS", "AddressBook", "Conn", "ConnTracker",
    "IllegalTransition", "TcpEndpoint", "TcpState", "conn_key", "likely_server_ports_for",
    "seq_delta", "sniff_service", "tcp_conn_state",
]
