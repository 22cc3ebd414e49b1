"""Capture files and live capture -> Zeek conn records.

* :mod:`.classic` and :mod:`.pcapng` read the two file formats (either one gzip'd,
  through :mod:`gateway.flows.gz`); :mod:`.common` holds their errors, counters and the
  format sniffing.
* :mod:`.pipeline` turns frames into records: decoding, the capture filter, the worker's
  shard and connection tracking, in plain Python or compiled (the same records).
* :mod:`.convert` is ``fedgate flows`` (files -> one log, optionally over worker
  processes); :mod:`.live` sniffs an interface.

Public API used by the replay, the gateway service and the CLI:

* :func:`is_capture_file` - sniff the first bytes.
* :func:`pcap_records` - a file object -> iterator of :class:`ConnRecord` (open connections are
  flushed at the end of the file, as Zeek does).
* :func:`live_records` - sniff an interface, yield records as connections end.
* :func:`convert_captures` - files -> a Zeek TSV or JSON log.
* :class:`CaptureStats` - packets, bytes, flows, skipped packets per reason.
"""

from gateway.flows.pcap.common import (
    MAX_SNAPLEN,
    CaptureError,
    CaptureStats,
    Frame,
    NotACaptureError,
    UnsupportedLinkTypeError,
    is_capture_file,
)
from gateway.flows.pcap.convert import AUTO_WORKERS_MAX, AUTO_WORKERS_MIN_BYTES, auto_workers, convert_captures
from gateway.flows.pcap.live import live_records
from gateway.flows.pcap.pipeline import (
    FrameTracker,
    compiled_available,
    iter_frames,
    new_frame_tracker,
    pcap_records,
    record_batches,
    records_from_frames,
)
from gateway.flows.zeek.writer import zeek_json_line

__all__ = [
    "AUTO_WORKERS_MAX", "AUTO_WORKERS_MIN_BYTES", "MAX_SNAPLEN", "CaptureError", "CaptureStats", "Frame",
    "FrameTracker", "NotACaptureError", "UnsupportedLinkTypeError", "auto_workers", "compiled_available",
    "convert_captures", "is_capture_file", "iter_frames", "live_records", "new_frame_tracker", "pcap_records",
    "record_batches", "records_from_frames", "zeek_json_line",
]
