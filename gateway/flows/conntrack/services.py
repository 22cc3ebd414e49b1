"""Which application a connection carries: ports, payload sniffing, FTP data channels.

Zeek attaches application analyzers by port and by signature; for ``conn.log`` what
matters is ``service`` (the analyzers that confirmed), the orientation fixes the DNS and
NTP analyzers make, and the longer inactivity timeouts of interactive services.  This
module holds those rules once.  The functions that act on a connection read and set only
``app``, ``app_done``, ``service``, ``inactivity_timeout``, ``orig_h``, ``resp_h`` and call
``flip_roles()``, so they serve the pure-Python tracker and the compiled one alike (they
run on a connection's first payloads only, never per packet once ``app_done`` is set).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable

from gateway.flows.packets import PROTO_TCP as TCP
from gateway.flows.packets import PROTO_UDP as UDP

# Ports each of Zeek's base protocol scripts adds to ``likely_server_ports``
# (``redef likely_server_ports += { ports }`` in scripts/base/protocols/*/main.zeek).
# IRC, POP3 and others register analyzers for ports but do not add them here.
PROTOCOL_SERVER_PORTS: dict[str, frozenset[tuple[int, int]]] = {
    "dce-rpc": frozenset({(TCP, 135)}),
    "dhcp": frozenset({(UDP, 67)}),
    "dnp3": frozenset({(TCP, 20000), (UDP, 20000)}),
    "dns": frozenset({(UDP, 53), (TCP, 53), (UDP, 137), (UDP, 5353), (UDP, 5355)}),
    "ftp": frozenset({(TCP, 21), (TCP, 2811)}),
    "http": frozenset({(TCP, p) for p in (80, 81, 631, 1080, 3128, 8000, 8080, 8888)}),
    "krb": frozenset({(UDP, 88), (TCP, 88)}),
    "ldap": frozenset({(TCP, 389), (TCP, 3268), (UDP, 389)}),
    "modbus": frozenset({(TCP, 502)}),
    "mysql": frozenset({(TCP, 1434), (TCP, 3306)}),
    "ntp": frozenset({(UDP, 123)}),
    "radius": frozenset({(UDP, 1812)}),
    "rdp": frozenset({(TCP, 3389), (UDP, 3389)}),
    "sip": frozenset({(UDP, 5060)}),
    "smb": frozenset({(TCP, 139), (TCP, 445)}),
    "smtp": frozenset({(TCP, 25), (TCP, 587)}),
    "snmp": frozenset({(UDP, 161), (UDP, 162)}),
    "socks": frozenset({(TCP, 1080)}),
    "ssh": frozenset({(TCP, 22)}),
    "ssl": frozenset({(TCP, p) for p in (443, 563, 585, 614, 636, 989, 990, 992, 993, 995, 5223)}
                     | {(UDP, 443)}),
    "syslog": frozenset({(UDP, 514)}),
    "tunnels": frozenset({(UDP, 5072), (UDP, 3544), (UDP, 2152), (UDP, 2123), (UDP, 4789), (UDP, 6081)}),
    "xmpp": frozenset({(TCP, 5222), (TCP, 5269)}),
}
DEFAULT_LIKELY_SERVER_PORTS: frozenset[tuple[int, int]] = frozenset().union(*PROTOCOL_SERVER_PORTS.values())

# scripts/base/protocols/conn/inactivity.zeek: long-lived interactive services.
PORT_INACTIVITY = {21: 3600.0, 22: 3600.0, 23: 3600.0, 513: 3600.0}
ANALYZER_INACTIVITY = {"ssh": 3600.0, "ftp": 3600.0}

# Application analyzers attached by port (what Zeek's DPD would try first) for `service`.
APP_BY_PORT: dict[tuple[int, int], str] = {
    (TCP, 80): "http", (TCP, 81): "http", (TCP, 631): "http", (TCP, 1080): "http",
    (TCP, 3128): "http", (TCP, 8000): "http", (TCP, 8080): "http", (TCP, 8888): "http",
    (TCP, 21): "ftp", (TCP, 2811): "ftp", (TCP, 22): "ssh", (TCP, 25): "smtp", (TCP, 587): "smtp",
    (TCP, 443): "ssl", (TCP, 563): "ssl", (TCP, 585): "ssl", (TCP, 614): "ssl", (TCP, 636): "ssl",
    (TCP, 989): "ssl", (TCP, 990): "ssl", (TCP, 992): "ssl", (TCP, 993): "ssl", (TCP, 995): "ssl",
    (TCP, 5223): "ssl", (TCP, 53): "dns", (UDP, 53): "dns", (UDP, 137): "dns", (UDP, 5353): "dns",
    (UDP, 5355): "dns", (UDP, 123): "ntp", (UDP, 67): "dhcp", (UDP, 68): "dhcp",
    (TCP, 110): "pop3", (TCP, 143): "imap", (TCP, 6666): "irc", (TCP, 6667): "irc",
    (TCP, 6668): "irc", (TCP, 6669): "irc", (UDP, 161): "snmp", (UDP, 162): "snmp",
    (UDP, 514): "syslog", (UDP, 5060): "sip", (TCP, 3306): "mysql", (TCP, 1883): "mqtt",
}

_HTTP_METHODS = (b"GET ", b"POST ", b"HEAD ", b"PUT ", b"DELETE ", b"OPTIONS ", b"CONNECT ",
                 b"TRACE ", b"PATCH ", b"PROPFIND ")


def likely_server_ports_for(protocols: Iterable[str] | None) -> frozenset[tuple[int, int]]:
    """``likely_server_ports`` when only ``protocols`` are loaded (``None``: all, Zeek's default)."""
    if protocols is None:
        return DEFAULT_LIKELY_SERVER_PORTS
    # the tunnel packet analyzers (base/packet-protocols) are loaded even in bare mode
    ports: set[tuple[int, int]] = set(PROTOCOL_SERVER_PORTS["tunnels"])
    for name in protocols:
        ports |= PROTOCOL_SERVER_PORTS.get(name, frozenset())
    return frozenset(ports)


def app_for(proto: int, port: int, protocols: frozenset[str] | None) -> str | None:
    """The analyzer attached to a new connection by its responder port (if loaded)."""
    app = APP_BY_PORT.get((proto, port))
    if app is None or (protocols is not None and app not in protocols):
        return None
    return app


def sniff_service(proto: int, payload: bytes, is_orig: bool) -> str | None:
    """Light payload checks for the protocols Zeek's DPD signatures recognise most often."""
    if not payload:
        return None
    if proto == TCP:
        if is_orig and payload.startswith(_HTTP_METHODS):
            return "http"
        if not is_orig and payload.startswith(b"HTTP/1."):
            return "http"
        if payload.startswith(b"SSH-") and len(payload) > 6:
            return "ssh"
        if (len(payload) >= 6 and payload[0] == 0x16 and payload[1] == 0x03 and payload[2] <= 0x04
                and payload[5] in (1, 2)):
            return "ssl"
        if is_orig and payload[:5].upper() in (b"USER ", b"AUTH "):
            return "ftp"
        if is_orig and payload[:5].upper() in (b"EHLO ", b"HELO "):
            return "smtp"
    return None


def dns_plausible(payload: bytes) -> bool:
    """A DNS header that could start a message (Zeek's DNS analyzer would accept it)."""
    if len(payload) < 12:
        return False
    qd = payload[4] << 8 | payload[5]
    opcode = (payload[2] >> 3) & 0xF
    return qd <= 16 and opcode in (0, 1, 2, 4, 5)


def is_multicast(raw: bytes) -> bool:
    if len(raw) == 4:
        return 224 <= raw[0] <= 239
    return raw[0] == 0xFF


def add_service(conn, name: str) -> None:
    if conn.service is None:
        conn.service = set()
    conn.service.add(name)


# ---------------------------------------------------------------------------- TCP

def detect_tcp_service(tracker, conn, payload: bytes, is_orig: bool, t: float) -> None:
    """A payload of a TCP connection whose analyzer has not confirmed yet (``app_done``
    unset): confirm a service from the payload or the port's analyzer, note FTP data
    channels."""
    protocols = tracker.protocols
    app = conn.app
    if app == "ftp" and (protocols is None or "ftp" in protocols):
        tracker.expected.announce(payload, is_orig, conn.orig_h, conn.resp_h, t)
        if conn.service:
            return
    found = sniff_service(TCP, payload, is_orig)
    if found is None and app is not None:
        if app == "ftp" and not is_orig and payload[:4] in (b"220 ", b"220-"):
            found = "ftp"
        elif app == "smtp" and not is_orig and payload[:4] in (b"220 ", b"220-"):
            found = "smtp"
        elif app == "dns" and len(payload) > 14 and dns_plausible(payload[2:]):
            found = "dns"
        elif app in ("pop3", "imap") and not is_orig and payload[:3] in (b"+OK", b"* O"):
            found = app
    if found is not None and (protocols is None or found in protocols):
        add_service(conn, found)
        if found in ANALYZER_INACTIVITY:  # inactivity.zeek, on analyzer confirmation
            conn.inactivity_timeout = ANALYZER_INACTIVITY[found]
        if app != "ftp":  # FTP control keeps announcing data channels
            conn.app_done = True


# ---------------------------------------------------------------------------- UDP

def udp_app(conn, payload: bytes, is_orig: bool) -> None:
    """A UDP payload for the port's analyzer (DNS, NTP, DHCP), until it is done.

    Port-based analyzers see the packet before ConnSize does, so a flip they make happens
    before the packet is counted, under its pre-flip direction."""
    app = conn.app
    if app == "dns":
        if len(payload) < 12:
            return  # DNS_truncated_len_lt_hdr_len: still waiting for a first message
        conn.app_done = True
        # DNS_Interpreter::ParseMessage: a first message that is a reply from the
        # originator flips the connection (unless the responder is multicast)
        if payload[2] & 0x80 and is_orig and not is_multicast(conn.resp_h):
            conn.flip_roles()
        if dns_plausible(payload):
            add_service(conn, "dns")
    elif app == "ntp":
        if len(payload) < 48:
            return
        add_service(conn, "ntp")
        mode = payload[0] & 7
        # ntp-analyzer.pac: a server message from the originator or a client message
        # from the responder flips the connection, once
        if (mode == 4 and is_orig) or (mode == 3 and not is_orig):
            conn.flip_roles()
            conn.app_done = True
    elif app == "dhcp":
        conn.app_done = True
        if len(payload) >= 240 and payload[236:240] == b"\x63\x82\x53\x63":
            add_service(conn, "dhcp")
    else:
        conn.app_done = True


# ---------------------------------------------------------------------------- FTP data

# what a PORT/EPRT command line contains, ASCII case-insensitively (as bytes.lower() + in)
_FTP_PORT_COMMAND = re.compile(rb"(?i)port|eprt")
_PASV = re.compile(rb"(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3}),(\d{1,3})")
_EPSV = re.compile(rb"\((.)\1\1(\d+)\1\)")
FTP_DATA_EXPIRY = 300.0


def ftp_data_channel(line: bytes, is_orig: bool, orig_h: bytes, resp_h: bytes):
    """The (orig_h, resp_h, resp_p) an FTP control line announces, or None."""
    upper = line[:5].upper()
    if is_orig and upper == b"PORT ":
        m = _PASV.search(line)
        if m:
            nums = [int(x) for x in m.groups()]
            if all(n < 256 for n in nums):
                return resp_h, bytes(nums[:4]), nums[4] * 256 + nums[5]
    elif is_orig and upper == b"EPRT ":
        parts = line[5:].strip().split(line[5:6] or b"|")
        if len(parts) >= 4:
            try:
                host = ipaddress.ip_address(parts[2].decode()).packed
                return resp_h, host, int(parts[3])
            except ValueError:
                return None
    elif not is_orig and line[:4] == b"227 ":
        m = _PASV.search(line)
        if m:
            nums = [int(x) for x in m.groups()]
            if all(n < 256 for n in nums):
                return orig_h, bytes(nums[:4]), nums[4] * 256 + nums[5]
    elif not is_orig and line[:4] == b"229 ":
        m = _EPSV.search(line)
        if m:
            return orig_h, resp_h, int(m.group(2))
    return None


class ExpectedChannels:
    """FTP data channels announced on control connections (ftp/main.zeek): a connection
    that opens to one within :data:`FTP_DATA_EXPIRY` seconds is ``ftp-data``.

    Bounded: past ``limit`` announcements the expired ones are dropped; the limit doubles
    (amortised) while they are all live."""

    __slots__ = ("channels", "limit")

    def __init__(self, limit: int = 10_000):
        self.channels: dict[tuple[bytes, bytes, int], float] = {}
        self.limit = limit

    def __bool__(self) -> bool:
        return bool(self.channels)

    def announce(self, payload: bytes, is_orig: bool, orig_h: bytes, resp_h: bytes, t: float) -> None:
        """Note the data channels PORT/EPRT and 227/229 replies in ``payload`` announce."""
        if is_orig:
            if _FTP_PORT_COMMAND.search(payload) is None:  # (no lower-cased copy per packet)
                return
        elif b"227" not in payload and b"229" not in payload:
            return
        for line in payload.split(b"\n"):
            found = ftp_data_channel(line.strip(), is_orig, orig_h, resp_h)
            if found is not None:
                if len(self.channels) >= self.limit:
                    self.channels = {k: v for k, v in self.channels.items() if v >= t}
                    self.limit = max(10_000, 2 * len(self.channels))
                self.channels[found] = t + FTP_DATA_EXPIRY

    def apply(self, conn, t: float) -> None:
        """A new TCP connection: ``ftp-data`` if it was announced (and not expired)."""
        key = (conn.orig_h, conn.resp_h, conn.resp_p)
        expiry = self.channels.get(key)
        if expiry is not None:
            if expiry >= t:
                add_service(conn, "ftp-data")
                conn.app_done = True
            else:
                del self.channels[key]
