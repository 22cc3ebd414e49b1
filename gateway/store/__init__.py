"""fedgate: gateway/store."""
