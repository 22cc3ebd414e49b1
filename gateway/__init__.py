"""fedgate gateway: the edge side (flows, model, inference, store, federated client).

Also owns what both sides share: ``gateway.protocol`` and ``gateway.model``.
"""

__version__ = "0.1.0"
