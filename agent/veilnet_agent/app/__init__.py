"""Entry points: the command line, file mode (daemon) and controller mode (controlled)."""
