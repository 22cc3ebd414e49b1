"""Click commands of ``fedgate``, one module per area (see ``gateway/cli.py``)."""
