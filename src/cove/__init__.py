"""Cove: run unmodified Linux programs in attested enclaves."""

__version__ = "0.1.0"
