"""The throughput suite and its scripts; ``benchmarks.common`` is what they share."""
