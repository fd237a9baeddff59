"""moeq-triton: grouped NVFP4/FP8 weight quantization of Mixture-of-Experts models.

``moeq_triton.kernels`` is the compute layer; this package is the integration layer.

Importing the package is light (the model-free command line never loads ModelOpt, whose import alone
takes seconds).  It still makes ``"calibrator": "triton_grouped"`` valid in ModelOpt: the names are
registered at once when ModelOpt's quantization package is already imported, and otherwise right
after it is (a post-import hook).  That registration never raises inside another package's import:
a failure (e.g. an unsupported ModelOpt version) is warned about there and raised in the user's own
call (``register()``, the ready configs).  The ready configs load ModelOpt on first access.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

from moeq_triton.version import __version__ as __version__

_MODELOPT_QUANTIZATION = "modelopt.torch.quantization"
_BACKEND = ("CALIBRATOR", "CALIBRATOR_SHARED", "register")
_STATS = ("calibration_stats", "format_stats")
_CONFIGS = (
    "NVFP4_WEIGHT_ONLY_CFG",
    "FP8_WEIGHT_ONLY_CFG",
    "FP8_PER_CHANNEL_WEIGHT_ONLY_CFG",
    "FP8_BLOCK_WEIGHT_ONLY_CFG",
)

_EXPORTER = ("export_hf", "load_hf")

__all__ = [*_BACKEND, *_STATS, *_CONFIGS, *_EXPORTER]


def __getattr__(name: str):
    if name in _EXPORTER:
        from moeq_triton.export import hf as exporter

        return getattr(exporter, name)
    if name in _BACKEND or name in _CONFIGS or name in _STATS:
        from moeq_triton.modelopt import backend

        if name in _BACKEND:
            return getattr(backend, name)
        if name in _CONFIGS:
            value = backend.make_configs()[name]  # registers, or raises naming the versions
            globals()[name] = value
            return value
        backend.ensure_registered()
        from moeq_triton.modelopt import calibrator

        return getattr(calibrator, name)
    raise AttributeError(f"module 'moeq_triton' has no attribute {name!r}")


class _RegisterAfterImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Runs the backend registration right after ModelOpt's quantization package finishes importing."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _MODELOPT_QUANTIZATION:
            return None
        sys.meta_path.remove(self)  # find the real spec without us, once
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        self._loader = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        from moeq_triton.modelopt import backend

        backend.register_quietly()


if _MODELOPT_QUANTIZATION in sys.modules:
    from moeq_triton.modelopt.backend import register_quietly as _register_quietly

    _register_quietly()
elif not any(isinstance(finder, _RegisterAfterImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterImport())
