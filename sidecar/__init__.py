"""AI gateway sidecar: access keys in, provider keys out."""

__version__ = "0.1.0"
