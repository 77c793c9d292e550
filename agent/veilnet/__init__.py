"""Generated from proto/veilnet/v1 by scripts/gen-proto; do not edit."""
