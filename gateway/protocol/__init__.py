"""fedgate wire protocol (pure: bytes, arrays and clocks in, records out; no I/O).

topics       topic names under the configurable prefix (default ``fedgate/v1``)
envelope     update / global-model envelopes: versioned JSON header + zstd(safetensors)
compression  int8 / top-k delta compression with error feedback (residual as a value)
chunking     numbered chunks for large payloads and the Reassembler (injected clock)
signing      Ed25519 keys (0600 files) and signatures of global models
validation   ``validate_envelope``: the one check every receiver runs
errors       ``RejectReason`` (typed rejection reasons), ``Rejection``, ``EnvelopeError``
"""
