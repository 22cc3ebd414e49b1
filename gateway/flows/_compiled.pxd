# Declarations of the compiled hot path (gateway/flows/_compiled.pyx); see its docstring.
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t
from cpython.ref cimport PyObject

cdef enum:
    KEYLEN = 40  # proto, kind, address length, 0, address a (16), address b (16), port a, port b

# One decoded packet, as connection tracking needs it (the fields of packets.Packet).
cdef struct Pkt:
    double ts
    const uint8_t* src
    const uint8_t* dst
    int alen
    int proto
    int sport  # ICMP: type
    int dport  # ICMP: code
    int64_t ip_len
    int64_t payload_len
    int flags  # TCP flags; UDP: 1 = cut by the snap length
    uint32_t seq
    uint32_t ack
    int64_t window
    bint checksum_ok
    const uint8_t* payload
    Py_ssize_t captured  # payload bytes present
    const uint8_t* opts
    Py_ssize_t opts_len
    PyObject* payload_obj  # the payload as bytes when the packet came as an object, else NULL

# One side of a TCP connection (conntrack/tcp.py TcpEndpoint, the C fields).
cdef struct TcpEnd:
    int state
    int prev_state
    uint32_t start_seq
    uint32_t last_seq
    uint32_t ack_seq
    int64_t seq_wraps
    int64_t ack_wraps
    int64_t window
    int window_scale
    uint32_t window_seq
    uint32_t window_ack_seq
    int64_t fin_cnt
    int64_t rst_cnt
    int64_t fin_seq
    bint did_close
    int64_t hist_last_syn
    int64_t hist_last_fin
    int64_t hist_last_rst
    int64_t chk_cnt
    int64_t chk_thresh
    int64_t rxmt_cnt
    int64_t rxmt_thresh
    int64_t win0_cnt
    int64_t win0_thresh
    int64_t gap_cnt
    int64_t gap_thresh
    int64_t reassem_seq

cdef struct HeapItem:
    double key
    int64_t tie
    int kind
    PyObject* conn  # a strong reference

cdef struct Heap:
    HeapItem* items
    Py_ssize_t n
    Py_ssize_t cap

cdef struct Slot:
    uint64_t hash
    PyObject* conn  # a strong reference; NULL = empty


cdef class Conn:
    cdef uint8_t key[KEYLEN]
    cdef uint64_t hash
    cdef public int proto
    cdef public int ip_proto
    cdef public bytes orig_h
    cdef public bytes resp_h
    cdef uint8_t orig_a[16]
    cdef int alen
    cdef public int orig_p
    cdef public int resp_p
    cdef public double start_time
    cdef public double last_time
    cdef public str history
    cdef int64_t hist_mask
    cdef public int64_t orig_pkts
    cdef public int64_t orig_ip_bytes
    cdef public int64_t resp_pkts
    cdef public int64_t resp_ip_bytes
    cdef TcpEnd* ends  # TCP only: the two endpoints; the originator is ends[orig_i]
    cdef int orig_i
    cdef object blocks0  # out-of-order data of ends[0] / ends[1] (dict or None)
    cdef object blocks1
    cdef public int64_t orig_size
    cdef public int64_t resp_size
    cdef public bint removed
    cdef public double inactivity_timeout
    cdef public object service
    cdef public int64_t missed_bytes
    cdef bint is_partial
    cdef int first_packet_seen
    cdef bint is_active
    cdef public object app
    cdef public bint app_done
    cdef public int64_t seq_no
    cdef public object parents
    cdef public object uid
    cdef int64_t chk[4]

    cpdef flip_roles(self)


cdef class Tracker:
    cdef public object book
    cdef public object protocols
    cdef public object expected
    cdef public dict skipped
    cdef public double network_time
    cdef public int64_t max_connections
    cdef public object decoder
    cdef public object probe
    cdef public object packet_filter
    cdef public int64_t filtered
    cdef bint ignore_checksums
    cdef bint ftp_loaded  # FTP's analyzer is loaded (protocols)
    cdef bint counts_skips  # this shard counts what the decoder skips (the first one)
    cdef int shard_index
    cdef int shard_count
    cdef object _decode  # decoder.decode, or probe.decode in the shards after the first
    cdef list _out
    cdef object _parent
    cdef public object likely_server_ports
    cdef Slot* slots
    cdef Py_ssize_t cap
    cdef Py_ssize_t count
    cdef Heap timers
    cdef int64_t armed
    cdef Heap idle
    cdef int64_t seq
    cdef uint64_t k0
    cdef uint64_t k1

    cdef int _frame(self, const uint8_t* f, Py_ssize_t n, Py_ssize_t wire, double ts, int linktype,
                    object buf, Py_ssize_t at) except -1
    cdef int _track(self, Pkt* p) except -1
    cdef int _feed_obj(self, object pkt) except -1
    cdef int _dispatch_obj(self, object pkt, double t, object parent) except -1
    cdef int _clock(self, double t) except -1
    cdef int _run_timers(self, double t) except -1
    cdef Conn _lookup(self, const uint8_t* key, uint64_t h)
    cdef int _insert(self, Conn conn) except -1
    cdef int _delete(self, Conn conn) except -1
    cdef Conn _new_conn(self, const uint8_t* key, uint64_t h, int proto, const uint8_t* orig, int orig_p,
                        const uint8_t* resp, int resp_p, int alen, double t)
    cdef int remove(self, Conn conn) except -1
    cdef int _evict_idlest(self) except -1
    cdef int _push_timer(self, double when, int kind, Conn conn) except -1
    cdef int skip(self, str reason) except -1
