"""Each ModelOpt patch: its target still looks as the patch assumes, and a change is caught loudly.

These tests fail when a ModelOpt release changes a patched target, so the patch is revisited instead
of silently misbehaving.  Registration never raises inside another package's import; the user's own
call raises, naming the ModelOpt version found and the supported one.
"""

from __future__ import annotations

import inspect
import subprocess
import sys

import modelopt
import modelopt.torch.quantization as mtq
import pytest
import torch
from modelopt.torch.quantization import model_calib
from modelopt.torch.quantization.config import QuantizerAttributeConfig
from modelopt.torch.quantization.mode import MaxCalibrateModeDescriptor
from modelopt.torch.quantization.nn import TensorQuantizer

import moeq_triton
from moeq_triton.modelopt import patches, weight_calibration
from moeq_triton.modelopt.calibrator import TritonGroupedCalibrator

EXPECTED = {
    "calibrator_name",
    "calibrator_constructor",
    "max_calibrate",
    "weight_only_quantize",
    "distributed_sync",
    "moe_completeness",
    "checked_amax",
    "modelopt_state_properties",
}


# max_calibrate's parameters per release, read from each release's source (0.45 has no shared states)
BASE = ["model", "forward_loop", "distributed_sync", "sync_expert_weight_amax"]
MAX_CALIBRATE_PARAMS = {
    "0.45": BASE,
    "0.46": [*BASE, "shared_states", "skip_forward_without_activation_calib"],
    "0.47": [*BASE, "shared_states", "skip_forward_without_activation_calib"],
}
RELEASE = ".".join(modelopt.__version__.split(".")[:2])
RANGE = ">=0.45,<0.48"


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_every_patch_is_installed_once_over_modelopts_own_function():
    moeq_triton.register()
    assert patches.preflight().name == RELEASE  # the installed ModelOpt still matches every target
    assert patches.active_release().name == RELEASE
    assert set(patches.PATCHES) == EXPECTED
    assert patches.PATCHES["max_calibrate"].original is model_calib.max_calibrate
    assert MaxCalibrateModeDescriptor._calib_func is patches.PATCHES["max_calibrate"].replacement
    assert model_calib.weight_only_quantize is patches.PATCHES["weight_only_quantize"].replacement
    for name in ("weight_only_quantize", "moe_completeness"):
        assert patches.PATCHES[name].original.__module__ == "modelopt.torch.quantization.model_calib", name
    for name in ("calibrator_constructor", "distributed_sync"):
        assert "modelopt" in patches.PATCHES[name].original.__module__, name


def test_patches_close_over_the_function_they_replace():
    """Issue 24: each replacement holds ModelOpt's original in its closure and hands it to our code
    (nothing fetches it back from a registry); our dispatchers are the other free variable."""
    moeq_triton.register()
    for name, ours in (
        ("max_calibrate", weight_calibration.max_calibrate),
        ("weight_only_quantize", weight_calibration.grouped_weight_only_quantize),
    ):
        patch = patches.PATCHES[name]
        free = inspect.getclosurevars(patch.replacement).nonlocals
        assert patch.original in free.values() and ours in free.values(), (name, free)
    for name in ("calibrator_constructor", "distributed_sync", "moe_completeness", "checked_amax"):
        patch = patches.PATCHES[name]
        assert patch.original in inspect.getclosurevars(patch.replacement).nonlocals.values(), name
    assert not hasattr(patches, "original")


def test_max_calibrate_hands_modelopts_own_function_the_options_it_was_given():
    """A call the whole-model path refuses (here: a forward loop) reaches the ModelOpt function the patch
    handed over with exactly the options ModelOpt's mode passed (the release's MaxCalibConfig fields)."""
    from tests.calibration_models import per_expert_qwen3_moe

    moeq_triton.register()
    model = per_expert_qwen3_moe(layers=1, experts=2)
    mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)  # converted and calibrated once
    options = {"distributed_sync": False, "sync_expert_weight_amax": False}
    if "shared_states" in MAX_CALIBRATE_PARAMS[RELEASE]:
        options.update(shared_states=None, skip_forward_without_activation_calib=False)
    seen = []

    def loop(m):
        pass

    weight_calibration.max_calibrate(lambda *a, **kw: seen.append((a, kw)), model, forward_loop=loop, **options)
    assert seen == [((model,), {"forward_loop": loop, **options})]
    assert weight_calibration.LAST_PATH.reason == "a forward loop is given"


@pytest.mark.slow  # a fresh Python process that imports ModelOpt
def test_calibrator_name_patch_is_still_needed_and_modelopts_validator_unchanged():
    """ModelOpt's own validator accepts exactly "max" and "histogram"; without the patch (a fresh
    process that never imports moeq_triton) the name is rejected."""
    validate = patches.PATCHES["calibrator_name"].original.func
    assert validate("max", None) == "max" and validate("histogram", None) == "histogram"
    with pytest.raises(AssertionError):
        validate("triton_grouped", None)
    run = _run(
        "from modelopt.torch.quantization.config import QuantizerAttributeConfig\n"
        "try:\n    QuantizerAttributeConfig(calibrator='triton_grouped')\nexcept Exception:\n    print('rejected')\n"
    )
    assert "rejected" in run.stdout, run.stderr[-2000:]


def test_calibrator_constructor_patch_relies_on_modelopts_constructor_path():
    """ModelOpt builds a (class, args, kwargs) calibrator by calling it: the patch maps our names to that."""
    quantizer = TensorQuantizer()
    modelopt_set = patches.PATCHES["calibrator_constructor"].original
    modelopt_set(quantizer, QuantizerAttributeConfig(calibrator=(TritonGroupedCalibrator, (), {"shared": True})))
    assert type(quantizer._calibrator) is TritonGroupedCalibrator and quantizer._calibrator.shared
    quantizer.set_from_attribute_config({"calibrator": "triton_grouped_shared", "axis": 0})
    assert type(quantizer._calibrator) is TritonGroupedCalibrator and quantizer._calibrator.shared
    assert quantizer._calibrator._axis == 0


def test_max_calibrate_patch_target_unchanged():
    """The "max" mode calls ModelOpt's max_calibrate with these parameters, and max_calibrate calls the
    weight loop and the MoE completeness check by their module-level names (what patches 4 and 6 need)."""
    assert list(inspect.signature(model_calib.max_calibrate).parameters) == MAX_CALIBRATE_PARAMS[RELEASE]
    called = inspect.unwrap(model_calib.max_calibrate).__code__.co_names
    assert {"weight_only_quantize", "_check_moe_calibration_complete", "enable_stats_collection"} <= set(called)
    assert hasattr(TensorQuantizer, "sync_amax_across_distributed_group")
    assert mtq.config.MaxCalibConfig().method == "max"


@pytest.mark.slow  # a fresh Python process that imports ModelOpt
def test_changed_target_is_reported_in_the_users_call_and_nothing_is_patched():
    """A ModelOpt whose max_calibrate changed: importing moeq_triton warns (never raises), installs no
    patch, and every route to our calibrator raises naming the patch and the supported versions."""
    run = _run(
        "import warnings\n"
        "import modelopt.torch.quantization as mtq\n"
        "from modelopt.torch.quantization import model_calib\n"
        "from modelopt.torch.quantization.mode import MaxCalibrateModeDescriptor\n"
        "def max_calibrate(model, forward_loop=None): pass\n"
        "model_calib.max_calibrate = max_calibrate\n"
        "MaxCalibrateModeDescriptor._calib_func = max_calibrate\n"
        "with warnings.catch_warnings(record=True) as seen:\n"
        "    warnings.simplefilter('always')\n"
        "    import moeq_triton\n"
        "print('WARNED', any('did not register' in str(w.message) for w in seen))\n"
        "from moeq_triton.modelopt import patches\n"
        "print('PATCHES', sorted(patches.PATCHES))\n" + ROUTES
    )
    assert "WARNED True" in run.stdout and "PATCHES []" in run.stdout, run.stdout + run.stderr[-2000:]
    _assert_every_route_raised(run, "'max_calibrate'", RANGE)


# Every route by which a user asks for our calibrator, run in a fresh process after the setup lines:
# the ready configs, register(), and a config of the user's own naming "triton_grouped" in mtq.quantize.
ROUTES = (
    "import torch\n"
    "def own_config():\n"
    "    model = torch.nn.Sequential(torch.nn.Linear(32, 32))\n"
    "    cfg = {'quant_cfg': [{'quantizer_name': '*', 'enable': False}, {'quantizer_name': '*weight_quantizer',\n"
    "           'cfg': {'num_bits': (4, 3), 'axis': None, 'calibrator': 'triton_grouped'}}], 'algorithm': 'max'}\n"
    "    mtq.quantize(model, cfg)\n"
    "for route, call in (('configs', lambda: moeq_triton.NVFP4_WEIGHT_ONLY_CFG), ('register', moeq_triton.register),\n"
    "                    ('own config', own_config)):\n"
    "    try:\n        call()\n        print('PASSED', route)\n"
    "    except Exception as e:\n        print('RAISED', route, type(e).__name__, repr(str(e)))\n"
)


def _assert_every_route_raised(run: subprocess.CompletedProcess, *needles: str) -> None:
    raised = [line for line in run.stdout.splitlines() if line.startswith("RAISED")]
    assert len(raised) == 3, run.stdout + run.stderr[-3000:]
    for line in raised:
        assert "UnsupportedModelOptError" in line and "\\n" not in line, line  # our one line, not pydantic's
        assert "Assertion failed" not in line and all(n in line for n in needles), line


@pytest.mark.slow  # fresh Python processes that import ModelOpt
@pytest.mark.parametrize("order", ["moeq_triton first", "modelopt first"])
def test_unsupported_modelopt_version_fails_loudly_in_the_users_call_only(order):
    """Issue 26 item 2 (a faked 0.48.0): ModelOpt's own imports (its plugins included) finish cleanly
    after `import moeq_triton`, whichever is imported first; every way of asking for triton_grouped
    raises our one-line error naming the version found and the supported range; nothing is patched
    but the refusal, and a config that does not name our calibrator still quantizes."""
    imports = ["import moeq_triton\n", "import modelopt.torch.quantization as mtq\n"]  # the hook runs on the 2nd
    run = _run(
        "import warnings\n"
        "warnings.simplefilter('always')\n"
        "import modelopt\n"
        "modelopt.__version__ = '0.48.0'\n"
        + "".join(imports if order == "moeq_triton first" else imports[::-1])
        + "import modelopt.torch.opt\n"
        "import modelopt.torch.quantization as mtq\n"
        "print('IMPORTED')\n"
        "from moeq_triton.modelopt import patches\n"
        "print('PATCHES', sorted(patches.PATCHES))\n" + ROUTES + "import torch\n"
        "model = torch.nn.Sequential(torch.nn.Linear(32, 32))\n"
        "mtq.quantize(model, {'algorithm': 'max', 'quant_cfg': [\n"
        "    {'quantizer_name': '*input_quantizer', 'enable': False},\n"
        "    {'quantizer_name': '*weight_quantizer', 'cfg': {'num_bits': (4, 3), 'axis': None}}]})\n"
        "print('MAX', float(model[0].weight_quantizer.amax) == float(model[0].weight.abs().max()))\n"
    )
    assert "IMPORTED" in run.stdout, run.stderr[-3000:]
    assert "Failed to import" not in run.stdout + run.stderr, run.stdout + run.stderr[-3000:]
    assert "PATCHES []" in run.stdout and "MAX True" in run.stdout, run.stdout + run.stderr[-3000:]
    _assert_every_route_raised(run, "found nvidia-modelopt 0.48.0", RANGE)


def test_checked_amax_patch_skips_only_an_unchanged_checked_amax():
    """A marked amax is not checked again only while it is the same tensor at the same version: the
    mark is put on a negative amax here (the whole-model path marks only amaxes it found valid) to
    show the skip; an in-place change or a new buffer is checked by ModelOpt's code again."""
    moeq_triton.register()
    quantizer = TensorQuantizer(QuantizerAttributeConfig(calibrator="triton_grouped"))
    quantizer.register_buffer("_amax", torch.tensor(-1.0))
    with pytest.warns(UserWarning, match="contains invalid values"):
        assert not quantizer.validate_attr(attr_name="_amax", warn_error=True, name="q")
    patches.mark_amax_checked(quantizer, quantizer._buffers["_amax"])
    assert quantizer.validate_attr(attr_name="_amax", warn_error=True)  # skipped: no warning, True
    assert not quantizer.validate_attr(attr_name="amax")  # other names: ModelOpt's check
    quantizer._buffers["_amax"].mul_(2)  # in place: the version moves on
    with pytest.warns(UserWarning, match="contains invalid values"):
        assert not quantizer.validate_attr(attr_name="_amax", warn_error=True, name="q")
    patches.mark_amax_checked(quantizer, quantizer._buffers["_amax"])
    quantizer._buffers["_amax"] = torch.tensor(float("inf"))  # another tensor
    with pytest.warns(UserWarning, match="contains invalid values"):
        assert not quantizer.validate_attr(attr_name="_amax", warn_error=True, name="q")


def test_modelopt_state_properties_patch_gives_modelopts_own_answer():
    """The cached module attribute names give the same property set (hence the same quantizer_state) as
    ModelOpt's function, which builds a fresh nn.Module() each call, on fresh and calibrated quantizers."""
    from tests.calibration_models import per_expert_qwen3_moe

    moeq_triton.register()
    original = patches.PATCHES["modelopt_state_properties"].original
    model = per_expert_qwen3_moe(layers=1, experts=2)
    mtq.quantize(model, moeq_triton.NVFP4_WEIGHT_ONLY_CFG)
    quantizers = [m for m in model.modules() if isinstance(m, TensorQuantizer)] + [TensorQuantizer()]
    assert any(patches.has_amax(q) for q in quantizers)
    for quantizer in quantizers:
        assert quantizer._get_properties_for_modelopt_state() == original(quantizer)


def test_shared_pattern_tails_are_understood():
    """The group discovery looks at module names ending in ModelOpt's pattern tails only; a pattern of
    another form would silently fall back to matching every name (correct, slower): catch it here.
    0.45 has no shared states at all: nothing is attached there, and the patches know it."""
    from modelopt.torch.quantization import utils

    if RELEASE == "0.45":
        assert not hasattr(utils, "SharedWeightGlobalAmaxState") and not hasattr(utils, "SHARED_PATTERNS")
        assert not patches.shared_states_supported()
        return
    from modelopt.torch.quantization.utils import SHARED_PATTERNS, SharedWeightGlobalAmaxState

    from moeq_triton.modelopt.shared_amax import pattern_tails

    patterns = SharedWeightGlobalAmaxState.resolve_patterns(shared_states=None)
    assert patterns == list(SHARED_PATTERNS)
    assert pattern_tails(patterns) == {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "w1", "w3"}
