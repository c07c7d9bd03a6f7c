"""Guards: benchmarks re-run to catch regressions (serving, engines, protocols, stream, memory, soak...)."""
