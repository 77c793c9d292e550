"""The pure core: desired state, kernel objects, ops, render, planner, firewall compiler.

Nothing here is to import the drivers, the dataplane, the control client, the entry points,
pyroute2, nftables or grpc."""
