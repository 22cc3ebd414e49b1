"""fedgate: gateway/fl."""
