"""The calibrator names moeq-triton registers with ModelOpt.

A module of its own so that the registration (``backend``) and the calibrator it registers
(``calibrator``, ``weight_calibration``) both import the names from below, and neither imports the other
for them.
"""

CALIBRATOR = "triton_grouped"
"""One amax per expert (ModelOpt >= 0.47 semantics)."""

CALIBRATOR_SHARED = "triton_grouped_shared"
"""Every expert of one grouped linear takes the max over that linear's experts (ModelOpt <= 0.46 semantics)."""

NAMES = (CALIBRATOR, CALIBRATOR_SHARED)
