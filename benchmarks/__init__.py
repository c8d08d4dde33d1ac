"""Latency, throughput and cost tables of the deployable network: ``python -m benchmarks`` (see results/README.md)."""
