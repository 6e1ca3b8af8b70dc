"""How an operator sees a process: health probes and heartbeats, Prometheus metrics, logs."""
