"""Veilnet reference controller: network spec, host PKI, mutual-TLS gRPC, SQLite store."""

__version__ = "0.1.0"
