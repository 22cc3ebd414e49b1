"""fedgate: gateway/flows."""
