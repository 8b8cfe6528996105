"""Benchmark harness: ``python -m bench`` measures this tunnel against direct loopback and frp.

See bench/README.md. Nothing here is imported by the ``tunnel`` package or its tests.
"""
