"""The demo's data and small models (also the tests' and benchmarks' model builders)."""
