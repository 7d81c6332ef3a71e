"""Benchmarks (`make bench`): the sidecar against the mock provider and a bare pass-through."""
