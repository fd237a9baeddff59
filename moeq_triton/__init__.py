"""moeq-triton: grouped NVFP4/FP8 weight quantization of Mixture-of-Experts models.

``moeq_triton.kernels`` is the compute layer; this package is the integration layer.
"""

__version__ = "0.1.0"
