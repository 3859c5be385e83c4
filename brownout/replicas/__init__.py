"""Brownout engines as Ray Serve replicas: SLO-aware routing, brownout-aware autoscaling and
one /metrics for the fleet (`brownout serve --replicas N`; docs/replicas.md)."""
