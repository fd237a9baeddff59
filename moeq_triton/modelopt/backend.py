"""``"calibrator": "triton_grouped"`` in ModelOpt: registration (version-checked, idempotent) and ready configs.

``register()`` installs the named patches of ``patches``; it is what ``import moeq_triton``
runs once ModelOpt's quantization package is imported, and what the ready configs require.  The
calibration itself lives in ``calibrator`` (calibrator, grouped reduction) and ``weight_calibration``, loaded
by ``register()`` only: they import ModelOpt, which this module must not need to be imported.
"""

from __future__ import annotations

import copy
import warnings

from moeq_triton.modelopt import patches
from moeq_triton.modelopt.names import CALIBRATOR, CALIBRATOR_SHARED, NAMES

SUPPORTED_MODELOPT = patches.SUPPORTED_MODELOPT
UnsupportedModelOptError = patches.UnsupportedModelOptError


class MissingExtraError(ImportError):
    """An integration was asked for whose optional dependency (a ``pip install moeq-triton[...]`` extra) is absent."""


_registered = False
_deferred_error: Exception | None = None  # a failure of the import-time registration, re-raised on use


def register() -> None:
    """Make "triton_grouped" and "triton_grouped_shared" valid calibrator names.  Idempotent.

    Raises UnsupportedModelOptError (naming the version found and the supported one) when the
    installed ModelOpt is not one the patches were written for, or a patch target changed, and
    MissingExtraError (naming the extra) when ModelOpt is not installed.
    """
    global _registered, _deferred_error
    if _registered:
        return
    try:
        import modelopt  # noqa: F401
    except ImportError as error:
        raise MissingExtraError(
            "moeq-triton's 'triton_grouped' calibrator and ready configs need NVIDIA ModelOpt, which is not "
            f"installed ({error}): pip install 'moeq-triton[modelopt]'"
        ) from error
    patches.preflight()
    _deferred_error = None
    from moeq_triton.modelopt import calibrator, weight_calibration

    def constructor(name: str) -> tuple:
        return (calibrator.TritonGroupedCalibrator, (), {"shared": name == CALIBRATOR_SHARED})

    patches.patch_calibrator_name(NAMES)
    patches.patch_calibrator_constructor(NAMES, constructor)
    patches.patch_max_calibrate(weight_calibration.max_calibrate)
    patches.patch_weight_only_quantize(weight_calibration.grouped_weight_only_quantize)
    patches.patch_distributed_sync(lambda q: getattr(patches.calibrator(q), "synced", False))
    patches.patch_validate_attr()
    patches.patch_modelopt_state_properties()
    _registered = True


def register_quietly() -> None:
    """``register()`` for an import hook: never raises into the importing package; warns and defers.

    The deferred error is raised in the user's own call (``register()``, ``ensure_registered()``,
    the ready configs).
    """
    global _deferred_error
    try:
        register()
    except Exception as error:  # noqa: BLE001 - reported loudly in the user's call instead
        _deferred_error = error
        warnings.warn(f"moeq-triton did not register its calibrator with ModelOpt: {error}", stacklevel=2)


def ensure_registered() -> None:
    """Register, or raise the error the import-time registration met (naming the versions)."""
    if _deferred_error is not None and not isinstance(_deferred_error, UnsupportedModelOptError):
        raise UnsupportedModelOptError(str(_deferred_error)) from _deferred_error
    register()  # raises UnsupportedModelOptError again, in the user's call


def _weight_only(base: dict, calibrator: str = CALIBRATOR) -> dict:
    cfg = copy.deepcopy(base)
    entries = []
    for entry in cfg["quant_cfg"]:
        name = entry.get("quantizer_name", "")
        if "input_quantizer" in name and "cfg" in entry:
            entries.append({"quantizer_name": name, "enable": False})
            continue
        if "weight_quantizer" in name and "cfg" in entry:
            entry = {**entry, "cfg": {**entry["cfg"], "calibrator": calibrator}}
        entries.append(entry)
    cfg["quant_cfg"] = entries
    return cfg


def make_configs() -> dict[str, dict]:
    """ModelOpt's own weight-only configs with the weight quantizers on "triton_grouped".

    ``FP8_BLOCK_WEIGHT_ONLY_CFG`` is ModelOpt's ``FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG`` as it is: its 128x128
    block amaxes stay on ModelOpt's ``max`` (the grouped calibrator computes per-tensor and per-channel
    amaxes only); ``export_hf`` writes such a model in the engines' ``fp8-block`` layout."""
    ensure_registered()
    import modelopt.torch.quantization as mtq

    return {
        "NVFP4_WEIGHT_ONLY_CFG": _weight_only(mtq.W4A16_NVFP4_CFG),
        "FP8_WEIGHT_ONLY_CFG": _weight_only(mtq.FP8_DEFAULT_CFG),
        "FP8_PER_CHANNEL_WEIGHT_ONLY_CFG": _weight_only(mtq.FP8_PER_CHANNEL_PER_TOKEN_CFG),
        "FP8_BLOCK_WEIGHT_ONLY_CFG": copy.deepcopy(mtq.FP8_2D_BLOCKWISE_WEIGHT_ONLY_CFG),
    }
