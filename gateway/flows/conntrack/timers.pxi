# The compiled mirror of timers.py (included by _compiled.pyx): Zeek's timeouts and a
# binary heap of (key, tie, kind, connection), here also used for the idle heap of
# tracker.py's eviction.  Items hold a strong reference to their connection.

cdef double TCP_ATTEMPT_DELAY = 5.0
cdef double TCP_CLOSE_DELAY = 5.0
cdef double TCP_RESET_DELAY = 5.0
cdef double TCP_SYN_TIMEOUT = 5.0
cdef double TCP_SESSION_TIMER = 6.0
cdef double TCP_CONNECTION_LINGER = 5.0
cdef double TCP_INACTIVITY = 300.0
cdef double UDP_INACTIVITY = 60.0
cdef double ICMP_INACTIVITY = 60.0
cdef double UNKNOWN_INACTIVITY = 60.0
cdef double DNS_SESSION_TIMEOUT = 10.0

cdef enum:
    T_INACTIVITY = 0
    T_ATTEMPT = 1
    T_DELETE = 2
    T_EXPIRE = 3
    T_RESET = 4
    T_DNS = 5


cdef inline bint item_less(HeapItem* a, HeapItem* b) noexcept nogil:
    return a.key < b.key or (a.key == b.key and a.tie < b.tie)


cdef int heap_push(Heap* h, double key, int64_t tie, int kind, object conn) except -1:
    cdef Py_ssize_t i, parent
    cdef HeapItem item
    cdef HeapItem* grown
    if h.n == h.cap:
        grown = <HeapItem*>realloc(h.items, (h.cap * 2 + 64) * sizeof(HeapItem))
        if grown == NULL:
            raise MemoryError()
        h.items = grown
        h.cap = h.cap * 2 + 64
    item.key = key
    item.tie = tie
    item.kind = kind
    item.conn = <PyObject*>conn
    Py_INCREF(conn)
    i = h.n
    h.n += 1
    while i > 0:
        parent = (i - 1) >> 1
        if not item_less(&item, &h.items[parent]):
            break
        h.items[i] = h.items[parent]
        i = parent
    h.items[i] = item
    return 0


cdef void _sift_down(Heap* h, Py_ssize_t i) noexcept nogil:
    cdef HeapItem item = h.items[i]
    cdef Py_ssize_t child
    while True:
        child = 2 * i + 1
        if child >= h.n:
            break
        if child + 1 < h.n and item_less(&h.items[child + 1], &h.items[child]):
            child += 1
        if not item_less(&h.items[child], &item):
            break
        h.items[i] = h.items[child]
        i = child
    h.items[i] = item


cdef HeapItem heap_pop(Heap* h) noexcept nogil:
    """The smallest item; its reference passes to the caller (Py_DECREF when done)."""
    cdef HeapItem top = h.items[0]
    h.n -= 1
    if h.n:
        h.items[0] = h.items[h.n]
        _sift_down(h, 0)
    return top


cdef void heap_replace_key(Heap* h, double key) noexcept nogil:
    """Give the smallest item a new key (same tie, kind and connection)."""
    h.items[0].key = key
    _sift_down(h, 0)


cdef void heap_clear(Heap* h):
    cdef Py_ssize_t i
    for i in range(h.n):
        Py_DECREF(<object>h.items[i].conn)
    h.n = 0


cdef void heap_free(Heap* h):
    heap_clear(h)
    free(h.items)
    h.items = NULL
    h.cap = 0


cdef int heap_heapify(Heap* h) except -1:
    cdef Py_ssize_t i = h.n // 2
    while i > 0:
        i -= 1
        _sift_down(h, i)
    return 0
