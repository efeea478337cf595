"""Benchmarks (pytest-benchmark suites), the step cases they run and the memory harness and profiler."""
