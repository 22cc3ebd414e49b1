"""fedgate: gateway/protocol."""
