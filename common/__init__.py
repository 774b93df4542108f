"""Shared code: config schema, clinical encoding, the fusion model, statistics.

`common` never imports `client`, `server`, `simulation` or `deploy`.
"""
__version__ = "0.1.0"
