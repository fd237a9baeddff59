"""The throughput suite and its scripts; ``moeq_triton.testing`` is what they share."""
