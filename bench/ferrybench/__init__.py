"""ferrybench: the modules of bench/run (docs/benchmarks.md)."""
