"""Developer tools that are not benchmarks: the static SASS budget (the CI gate) and one-off GPU probes."""
