"""Dataplane orchestration: the reconciler, the firewall manager and the security events."""
