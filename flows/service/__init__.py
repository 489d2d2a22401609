"""The service around the pipeline: local server, locks, interrupts, deployments, watcher, state, gc, status, preflight."""
