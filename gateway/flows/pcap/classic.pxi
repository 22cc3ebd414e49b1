# The compiled mirror of classic.py's walk_records + pipeline.FrameTracker.feed_pcap
# (included by _compiled.pyx): every complete record of a chunk straight from the bytes
# into the tracker.

cdef uint32_t MAX_SNAPLEN_C = 262144  # common.MAX_SNAPLEN


cdef tuple walk_pcap(Tracker tr, bytes buf, Py_ssize_t pos, bint little, bint nano, int linktype):
    """(stop, bad_len, frames, wire_bytes, first_ts, last_ts) of a chunk; the records of
    the connections that ended are in tr._out."""
    cdef const uint8_t* b = <const uint8_t*>PyBytes_AS_STRING(buf)
    cdef Py_ssize_t n = len(buf), end
    cdef uint32_t sec, frac, incl, wire
    cdef int64_t count = 0, wire_bytes = 0
    cdef double ts = 0.0, first_ts = 0.0
    bad_len = None
    while pos + 16 <= n:
        if little:
            sec, frac, incl, wire = le32(b + pos), le32(b + pos + 4), le32(b + pos + 8), le32(b + pos + 12)
        else:
            sec, frac, incl, wire = be32(b + pos), be32(b + pos + 4), be32(b + pos + 8), be32(b + pos + 12)
        if incl > MAX_SNAPLEN_C:
            bad_len = incl
            break
        end = pos + 16 + incl
        if end > n:
            break
        if nano:
            frac //= 1000
        ts = <double>sec + <double>frac / 1e6
        if count == 0:
            first_ts = ts
        count += 1
        wire_bytes += wire
        tr._frame(b + pos + 16, incl, wire, ts, linktype, buf, pos + 16)
        pos = end
    if count == 0:
        return (pos, bad_len, 0, 0, None, None)
    return (pos, bad_len, count, wire_bytes, first_ts, ts)
