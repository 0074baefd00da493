"""Benchmarks (not part of the tests): `python -m bench` runs them all; see bench/__main__.py."""
