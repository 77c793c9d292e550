"""Thin drivers: each observes and applies one kind of kernel object."""
