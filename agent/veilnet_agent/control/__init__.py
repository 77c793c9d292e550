"""The control client: talks to the controller and serves the local API."""
