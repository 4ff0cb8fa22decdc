"""Layer-wise calibration: statistics of each decoder layer's attention input on calibration text."""

from __future__ import annotations

from attnconv.calibration.collectors import Collector, CovarianceCollector
from attnconv.calibration.memory import BATCH_TOKENS, estimate_memory
from attnconv.calibration.runner import LayerwiseModel, calibrate_layers, run_layers
from attnconv.calibration.tokens import calibration_tokens

__all__ = ["BATCH_TOKENS", "Collector", "CovarianceCollector", "LayerwiseModel", "calibrate_layers",
           "calibration_tokens", "estimate_memory", "run_layers"]
