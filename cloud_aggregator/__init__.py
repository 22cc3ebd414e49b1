"""fedgate cloud aggregator: pools gateway updates, aggregates, broadcasts global models."""
