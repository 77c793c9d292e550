"""The pure core: desired state, kernel objects, ops, render, planner, firewall compiler.

Nothing here imports the drivers, the dataplane, the control client, the entry points,
pyroute2, nftables or grpc (tests/test_layers.py checks it)."""
