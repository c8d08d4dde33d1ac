"""Latency, throughput and cost tables of the deployable network: ``python -m blindnet.benchmarks`` (see results/README.md)."""
