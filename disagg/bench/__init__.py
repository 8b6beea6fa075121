"""Benchmarks: scripts that print JSON and compare against a same-run baseline."""
