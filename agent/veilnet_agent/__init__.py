"""Veilnet per-host data-plane agent."""

__version__ = "0.1.0"
