"""The gateway's built-in status page: :mod:`gateway.web.server` serves it."""
