"""Zeek ``conn.log`` in and out: an incremental parser, readers and writers.

Formats read (auto-detected, line by line):

* Zeek TSV with its header block (``#separator`` with ``\\x..`` escapes,
  ``#set_separator``, ``#empty_field``, ``#unset_field``, ``#path``, ``#open``,
  ``#fields``, ``#types``, ``#close``); several header blocks in one stream; columns in
  any order; columns unknown to :class:`ConnRecord` kept raw in ``ConnRecord.extra``.
* IoT-23 ``conn.log.labeled``: Zeek TSV whose last column holds ``tunnel_parents``,
  ``label`` and ``detailed-label`` joined by three spaces (in ``#fields``/``#types`` too).
* Zeek JSON logs (``LogAscii::use_json``): one object per line, ``ts`` as epoch seconds
  or ISO-8601, flat ``id.orig_h`` keys (a nested ``{"id": {...}}`` is accepted too).
* gzip-compressed versions of all three (Zeek archives rotated logs as ``.gz``).

The parser (:class:`ZeekLogParser`) is pure: bytes in, records out, no file or socket.
It keeps a partial last line until its newline arrives, so any split of a byte stream
gives the same records.  Bad lines become :class:`Rejection` values (source, line
number, reason, text), counted and logged; the good records around them are kept.

The hot path is columnar: a block of about 64 KiB of lines whose field counts all match
the header is split once into a flat list and sliced into columns, and each column is
converted by a converter chosen when the header was read (``map(int, col)`` and friends
run in C); only a column that fails falls back to a per-value pass that pinpoints the
bad rows.  Records are built with ``tuple.__new__`` through ``map``, with the cyclic GC
paused while a chunk is parsed.

Modules: :mod:`.header` (header state, rejections, format constants), :mod:`.parser`
(the incremental parser), :mod:`.tsv` and :mod:`.json` (data lines of each format),
:mod:`.readers` (paths, files, bytes, chunk streams; gzip through
:mod:`gateway.flows.gz`), :mod:`.writer` (Zeek TSV and JSON lines out).
"""

from gateway.flows.zeek.header import LogHeader, Rejection, ZeekParseError
from gateway.flows.zeek.json import json_record
from gateway.flows.zeek.parser import ZeekLogParser
from gateway.flows.zeek.readers import iter_record_batches, iter_records, open_log, read_log
from gateway.flows.zeek.writer import ZeekTsvWriter, to_tsv_bytes, write_tsv, zeek_json_line

__all__ = [
    "LogHeader",
    "Rejection",
    "ZeekLogParser",
    "ZeekParseError",
    "ZeekTsvWriter",
    "iter_record_batches",
    "iter_records",
    "json_record",
    "open_log",
    "read_log",
    "to_tsv_bytes",
    "write_tsv",
    "zeek_json_line",
]
