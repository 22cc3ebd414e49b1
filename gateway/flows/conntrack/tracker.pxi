# The compiled mirror of tracker.py (included by _compiled.pyx), fused with the frame
# pipeline of pcap/pipeline.py (FrameTracker): frames in, conn records out.  A frame of a
# common shape (packets.pxi) is decoded, sharded, filtered and tracked without a Python
# object; any other frame goes to the PacketDecoder and the Packet it makes is tracked
# like one fed with feed().  Connections live in an open-addressing table (linear
# probing, backward-shift deletion, at most half full) of strong references.


cdef inline object payload_bytes(Pkt* p):
    """The captured payload as bytes (made only for the analyzers' first payloads)."""
    if p.payload_obj != NULL:
        return <object>p.payload_obj
    return PyBytes_FromStringAndSize(<const char*>p.payload, p.captured)


cdef object packet_object(Pkt* p):
    """A decoded frame as the Packet PacketDecoder would have made (for a capture filter)."""
    src = PyBytes_FromStringAndSize(<const char*>p.src, p.alen)
    dst = PyBytes_FromStringAndSize(<const char*>p.dst, p.alen)
    opts = PyBytes_FromStringAndSize(<const char*>p.opts, p.opts_len)
    return tuple.__new__(Packet, (p.ts, src, dst, p.proto, p.sport, p.dport, p.ip_len, p.payload_len, p.flags,
                                  p.seq, p.ack, p.window, p.checksum_ok, payload_bytes(p), opts, None, None))


@cython.final
cdef class Tracker:
    """Frames (or Packets) in, Zeek conn records out: the compiled ConnTracker + FrameTracker.

    Keyword-only configuration as :class:`gateway.flows.conntrack.ConnTracker`, plus those
    of :class:`gateway.flows.pcap.pipeline.FrameTracker`: ``decoder`` (the PacketDecoder
    uncommon frames go to), ``probe``, ``shard`` and ``packet_filter``."""

    def __cinit__(self):
        self.slots = NULL
        self.cap = 0
        self.count = 0
        memset(&self.timers, 0, sizeof(Heap))
        memset(&self.idle, 0, sizeof(Heap))

    def __init__(self, *, local_nets=DEFAULT_LOCAL_NETS, likely_server_ports=DEFAULT_LIKELY_SERVER_PORTS,
                 protocols=None, max_connections=FlowSettings.max_connections, decoder=None, probe=None,
                 shard=None, packet_filter=None):
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        self.book = AddressBook(local_nets)
        self.likely_server_ports = frozenset(likely_server_ports)
        self.protocols = None if protocols is None else frozenset(protocols)
        self.ftp_loaded = self.protocols is None or "ftp" in self.protocols
        self.max_connections = max_connections
        self.expected = ExpectedChannels()
        self.skipped = {}
        self.network_time = 0.0
        self.decoder = decoder if decoder is not None else PacketDecoder()
        self.probe = probe
        self.ignore_checksums = self.decoder.ignore_checksums
        index, count = shard if shard is not None else (0, 1)
        if not 0 <= index < count:
            raise ValueError("shard must be (index, count) with 0 <= index < count")
        self.shard_index = index
        self.shard_count = count
        self.counts_skips = index == 0 or probe is None
        self._decode = (self.decoder if self.counts_skips else probe).decode
        self.packet_filter = packet_filter
        self.filtered = 0
        self._out = []
        self._parent = None
        self.seq = 0
        self.armed = 0
        key = os.urandom(16)
        self.k0 = int.from_bytes(key[:8], "little")
        self.k1 = int.from_bytes(key[8:], "little")
        self.slots = <Slot*>calloc(1024, sizeof(Slot))
        if self.slots == NULL:
            raise MemoryError()
        self.cap = 1024

    def __dealloc__(self):
        cdef Py_ssize_t i
        if self.slots != NULL:
            for i in range(self.cap):
                if self.slots[i].conn != NULL:
                    Py_DECREF(<object>self.slots[i].conn)
            free(self.slots)
        heap_free(&self.timers)
        heap_free(&self.idle)

    @property
    def local_nets(self):
        return self.book.local_nets

    @property
    def open_connections(self):
        return self.count

    # ------------------------------------------------------------------ packets (ConnTracker's API)
    def feed(self, pkt):
        """Process one Packet; the records of connections that ended meanwhile."""
        self._feed_obj(pkt)
        if self._out:
            out, self._out = self._out, []
            return out
        return ()

    def feed_many(self, packets):
        for pkt in packets:
            self._feed_obj(pkt)
        out, self._out = self._out, []
        return out

    def advance(self, double now):
        """Let time pass without a packet (live capture): fire due timers."""
        if now > self.network_time:
            self.network_time = now
            self._run_timers(now)
        out, self._out = self._out, []
        return out

    def flush(self):
        """End every open connection (end of trace) and return their records."""
        cdef Py_ssize_t i
        conns = [<object>self.slots[i].conn for i in range(self.cap) if self.slots[i].conn != NULL]
        conns.sort(key=_start_order)
        for conn in conns:
            self.remove(conn)
        heap_clear(&self.timers)
        heap_clear(&self.idle)
        out, self._out = self._out, []
        return out

    # ------------------------------------------------------------------ frames (FrameTracker's API)
    def feed_frame(self, int linktype, bytes frame, double ts, Py_ssize_t wire_len):
        self._frame(<const uint8_t*>PyBytes_AS_STRING(frame), len(frame), wire_len, ts, linktype, frame, 0)
        if self._out:
            out, self._out = self._out, []
            return out
        return ()

    def feed_pcap(self, bytes buf, Py_ssize_t pos, header):
        """The complete records of a classic pcap chunk, tracked (see pcap/classic.pxi)."""
        from gateway.flows.pcap.classic import Walked

        walked = walk_pcap(self, buf, pos, header.little, header.nano, header.linktype)
        out, self._out = self._out, []
        return Walked(out, *walked)

    # ------------------------------------------------------------------ internals
    cdef int _frame(self, const uint8_t* f, Py_ssize_t n, Py_ssize_t wire, double ts, int linktype,
                    object buf, Py_ssize_t at) except -1:
        cdef Pkt p
        cdef int count = self.shard_count
        cdef int shape = decode_fast(f, n, wire, linktype, ts, self.ignore_checksums, &p)
        if shape < 0:
            if self.counts_skips:
                reason = "non_ip_packet" if shape == FAST_NON_IP else "bad_IP_checksum"
                skipped = self.decoder.skipped
                skipped[reason] = skipped.get(reason, 0) + 1
            return 0
        if shape == FAST_PACKET:
            if count > 1 and (address_hash(p.src, p.alen) + address_hash(p.dst, p.alen)) % count != self.shard_index:
                return 0
            if self.packet_filter is not None and not self.packet_filter(packet_object(&p)):
                self.filtered += 1
                return 0
            self._clock(ts)
            self._track(&p)
            return 0
        frame = buf if at == 0 and n == len(buf) else buf[at:at + n]
        pkt = self._decode(linktype, frame, ts, wire)
        if pkt is None or pkt.__class__ is str:
            return 0
        if count > 1 and packet_shard(pkt.src, pkt.dst, count) != self.shard_index:
            return 0
        if self.packet_filter is not None and not self.packet_filter(pkt):
            self.filtered += 1
            return 0
        self._feed_obj(pkt)
        return 0

    cdef int _clock(self, double t) except -1:
        # an out-of-order packet keeps its own time for the connection (as in Zeek); only
        # network time, which drives the timers, never goes back
        if t > self.network_time:
            self.network_time = t
            if self.timers.n and self.timers.items[0].key <= t:
                self._run_timers(t)
        return 0

    cdef int _track(self, Pkt* p) except -1:
        """A decoded frame (no tunnel): tracker._dispatch's first branches."""
        if p.proto == 6:
            tcp_packet(self, p, p.ts)
        elif p.proto == 17:
            udp_packet(self, p, p.ts)
        else:
            icmp_packet(self, p, p.ts)
        return 0

    cdef int _feed_obj(self, object pkt) except -1:
        cdef double t = pkt[0]
        self._clock(t)
        self._dispatch_obj(pkt, t, None)
        return 0

    cdef int _dispatch_obj(self, object pkt, double t, object parent) except -1:
        """tracker._dispatch for a Packet object (tunnels included)."""
        cdef Pkt p
        cdef Conn outer
        (_ts, src, dst, proto, sport, dport, ip_len, payload_len, flags, seq, ack, window, ok, payload, opts,
         tunnel, inner) = pkt
        if parent is None and tunnel is not None:
            parent = (tunnel_uid(tunnel),)
        self._parent = parent
        if len(src) != len(dst) or len(src) > 16:
            raise ValueError("a packet's addresses must be 4 or 16 bytes each")
        p.ts = t
        p.src = <const uint8_t*>PyBytes_AS_STRING(src)
        p.dst = <const uint8_t*>PyBytes_AS_STRING(dst)
        p.alen = len(src)
        p.proto = proto
        p.sport = sport
        p.dport = dport
        p.ip_len = ip_len
        p.payload_len = payload_len
        p.flags = flags
        p.seq = seq
        p.ack = ack
        p.window = window
        p.checksum_ok = ok
        p.payload = <const uint8_t*>PyBytes_AS_STRING(payload)
        p.captured = len(payload)
        p.payload_obj = <PyObject*>payload
        p.opts = <const uint8_t*>PyBytes_AS_STRING(opts)
        p.opts_len = len(opts)
        if p.proto == 6:
            tcp_packet(self, &p, t)
        elif p.proto == 17:
            outer = udp_packet(self, &p, t)
            if inner is not None:
                # a UDP tunnel (VXLAN, Geneve, Teredo, GTP-U): the carrier is a connection of
                # its own, and what it carries is tracked with the carrier as parent
                kind = UDP_TUNNEL_PORTS.get(outer.resp_p) or UDP_TUNNEL_PORTS.get(outer.orig_p)
                if kind and (self.protocols is None or "tunnels" in self.protocols):
                    add_service(outer, kind)
                self._dispatch_obj(inner, t, (conn_uid(outer),))
        elif p.proto == 1 or p.proto == 58:
            icmp_packet(self, &p, t)
        else:
            unknown_packet(self, &p, t)
        self._parent = None
        return 0

    cdef int _run_timers(self, double t) except -1:
        cdef HeapItem item
        cdef Conn conn
        cdef double due
        while self.timers.n and self.timers.items[0].key <= t:
            item = heap_pop(&self.timers)
            conn = <Conn>item.conn
            Py_DECREF(conn)  # the heap's reference (conn keeps its own)
            if conn.removed:
                continue
            if item.kind == T_INACTIVITY:
                due = conn.last_time + conn.inactivity_timeout
                if due <= item.key:
                    self.remove(conn)
                else:
                    self._push_timer(due, T_INACTIVITY, conn)
            elif item.kind == T_DELETE:
                self.remove(conn)
            elif item.kind == T_ATTEMPT:
                attempt_timer(self, conn)
            elif item.kind == T_RESET:
                if conn.is_active:
                    self.remove(conn)
            elif item.kind == T_EXPIRE:
                expire_timer(self, conn, item.key)
            elif item.kind == T_DNS:
                # DNS_Analyzer::ExpireTimer: a UDP DNS session ends after dns_session_timeout
                # (less a second of slack) without packets
                if item.key - conn.last_time >= DNS_SESSION_TIMEOUT - 1.0:
                    self.remove(conn)
                else:
                    self._push_timer(item.key + DNS_SESSION_TIMEOUT, T_DNS, conn)
        return 0

    cdef int _push_timer(self, double when, int kind, Conn conn) except -1:
        self.armed += 1
        return heap_push(&self.timers, when, self.armed, kind, conn)

    cdef int skip(self, str reason) except -1:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1
        return 0

    # ------------------------------------------------------------------ the table
    cdef Conn _lookup(self, const uint8_t* key, uint64_t h):
        cdef Py_ssize_t mask = self.cap - 1, i = h & mask
        cdef Conn conn
        while self.slots[i].conn != NULL:
            if self.slots[i].hash == h:
                conn = <Conn>self.slots[i].conn
                if memcmp(conn.key, key, KEYLEN) == 0:
                    return conn
            i = (i + 1) & mask
        return None

    cdef int _insert(self, Conn conn) except -1:
        cdef Py_ssize_t mask, i, j, cap
        cdef Slot* old
        if (self.count + 1) * 2 > self.cap:
            old, cap = self.slots, self.cap
            self.slots = <Slot*>calloc(cap * 2, sizeof(Slot))
            if self.slots == NULL:
                self.slots = old
                raise MemoryError()
            self.cap = cap * 2
            mask = self.cap - 1
            for j in range(cap):
                if old[j].conn != NULL:
                    i = old[j].hash & mask
                    while self.slots[i].conn != NULL:
                        i = (i + 1) & mask
                    self.slots[i] = old[j]
            free(old)
        mask = self.cap - 1
        i = conn.hash & mask
        while self.slots[i].conn != NULL:
            i = (i + 1) & mask
        self.slots[i].hash = conn.hash
        self.slots[i].conn = <PyObject*>conn
        Py_INCREF(conn)
        self.count += 1
        return 0

    cdef int _delete(self, Conn conn) except -1:
        """Take ``conn`` out of the table (if it is there): backward-shift deletion."""
        cdef Py_ssize_t mask = self.cap - 1, i = conn.hash & mask, j, k
        while self.slots[i].conn != NULL and self.slots[i].conn != <PyObject*>conn:
            i = (i + 1) & mask
        if self.slots[i].conn == NULL:
            return 0
        j = i
        while True:
            j = (j + 1) & mask
            if self.slots[j].conn == NULL:
                break
            k = self.slots[j].hash & mask  # where the entry at j wants to be
            if (i <= j and i < k <= j) or (i > j and (i < k or k <= j)):
                continue  # it may stay: its home lies after the hole
            self.slots[i] = self.slots[j]
            i = j
        self.slots[i].conn = NULL
        self.count -= 1
        Py_DECREF(conn)
        return 0

    cdef Conn _new_conn(self, const uint8_t* key, uint64_t h, int proto, const uint8_t* orig, int orig_p,
                        const uint8_t* resp, int resp_p, int alen, double t):
        cdef Conn conn
        cdef Py_ssize_t i
        if self.count >= self.max_connections:
            self._evict_idlest()
        conn = Conn.__new__(Conn)
        memcpy(conn.key, key, KEYLEN)
        conn.hash = h
        conn.proto = conn.ip_proto = proto
        conn.orig_h = PyBytes_FromStringAndSize(<const char*>orig, alen)
        conn.resp_h = PyBytes_FromStringAndSize(<const char*>resp, alen)
        memcpy(conn.orig_a, orig, alen)
        conn.alen = alen
        conn.orig_p = orig_p
        conn.resp_p = resp_p
        conn.start_time = conn.last_time = t
        conn.history = ""
        conn.hist_mask = 0
        conn.orig_pkts = conn.orig_ip_bytes = conn.resp_pkts = conn.resp_ip_bytes = 0
        conn.orig_size = conn.resp_size = -1
        conn.removed = False
        conn.inactivity_timeout = UDP_INACTIVITY
        conn.service = None
        conn.missed_bytes = 0
        conn.is_partial = False
        conn.first_packet_seen = 0
        conn.is_active = True
        conn.app = None
        conn.app_done = False
        conn.parents = self._parent
        conn.uid = None
        conn.chk[0] = conn.chk[2] = 0
        conn.chk[1] = conn.chk[3] = 1
        self.seq += 1
        conn.seq_no = self.seq
        self._insert(conn)
        heap_push(&self.idle, t, conn.seq_no, 0, conn)
        if self.idle.n > 2 * self.count + IDLE_HEAP_SLACK:
            heap_clear(&self.idle)
            for i in range(self.cap):
                if self.slots[i].conn != NULL:
                    other = <Conn>self.slots[i].conn
                    heap_push(&self.idle, other.last_time, other.seq_no, 0, other)
        return conn

    cdef int remove(self, Conn conn) except -1:
        if conn.removed:
            return 0
        conn.removed = True
        self._delete(conn)
        proto = conn.proto
        if proto == 6:
            summary = tcp_summary_c(conn)
        elif proto == 17:
            summary = udp_summary(conn)
        elif proto == 1 or proto == 58:
            summary = icmp_summary(conn)
        else:
            summary = unknown_summary(conn)
        self._out.append(build_record(self.book, conn, *summary))
        return 0

    cdef int _evict_idlest(self) except -1:
        """End the connection idle longest (the table is full)."""
        cdef HeapItem item
        cdef Conn conn
        while self.idle.n:
            conn = <Conn>self.idle.items[0].conn
            if conn.removed:
                item = heap_pop(&self.idle)
                Py_DECREF(conn)
            elif conn.last_time != self.idle.items[0].key:  # it had packets since: requeue
                heap_replace_key(&self.idle, conn.last_time)
            else:
                item = heap_pop(&self.idle)
                Py_DECREF(conn)
                self.skip("connection_table_full")
                self.remove(conn)
                return 0
        return 0


def _start_order(conn):
    return (conn.start_time, conn.seq_no)
