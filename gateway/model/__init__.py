"""fedgate: gateway/model."""
