"""Benchmark scripts (not tests): ``python -m promptfleet.bench.<name>`` or
``promptfleet bench <name>``; each prints one JSON line."""
