"""fedgate: cloud_aggregator/strategies."""
