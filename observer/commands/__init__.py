"""On-call commands talking to the daemon (or the kernel when no daemon runs)."""
