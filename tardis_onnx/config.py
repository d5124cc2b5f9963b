"""The settings of one optimisation run: one documented dataclass, copied into the JSON report."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field

from tardis_onnx.emit import FALLBACK_FORMS
from tardis_onnx.predictor import PREDICTORS
from tardis_onnx.quantize import QUANTIZE_CHOICES

FALLBACKS = ("auto", *FALLBACK_FORMS)
WINDOWS = ("narrowest", "least-error")
ALLOCATIONS = ("uniform", "layer", "global")
DEFAULT_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99, 1.0)
# The budget when neither a coverage nor a target is given: 80% fallback reduction (the paper's figure).
DEFAULT_TARGET_REDUCTION = 0.8
# "auto" picks, per FFN, the predictor reading the fewest bytes whose recall of the true outliers on
# held-out calibration tokens is at least ``min_recall``.
PREDICTOR_CHOICES = ("auto", *PREDICTORS)
# Named bundles of settings. "accurate" (the default) is what the MiniLM evaluation found best:
# least-error windows, per-neuron coverage under each layer's budget, and the least-squares refit.
# The never-slower check (tardis_onnx/speed.py) is on unless this variable is "0" (reproducible output,
# independent of the machine's timings; the test suite sets it).
SPEED_CHECK_VARIABLE = "TARDIS_SPEED_CHECK"
# The shapes a model is timed at when none are named: one token (decode), one 32-token sentence or
# prompt, a batch of 32 sequences of 128 tokens.
DEFAULT_SHAPES: tuple[tuple[int, int], ...] = ((1, 1), (1, 32), (32, 128))


def _speed_check_default() -> bool:
    return os.environ.get(SPEED_CHECK_VARIABLE, "1").strip() != "0"


PRESETS = {
    "plain": {"window": "narrowest", "allocation": "uniform", "refit": False},
    "accurate": {"window": "least-error", "allocation": "layer", "refit": True},
}


@dataclass
class TardisConfig:
    """How the pass folds FFNs. The defaults are the best recipe measured (docs/defaults.md).

    coverage: fraction of each neuron's calibration pre-activations its linear window must hold
        (0 = every neuron always falls back: exact). Give a coverage or a ``target_reduction``, not
        both; with neither, the target is ``DEFAULT_TARGET_REDUCTION``.
    target_reduction: the fallback reduction ``1 − (d² + f·2dh)/(2dh)`` each FFN must reach on the
        calibration tokens; it sets the outlier budget ``f`` (a coverage's budget is ``1 − coverage``).
        Where an FFN is too narrow (``h < 4d``) for the default target, it gets the outlier budget the
        default gives an ``h = 4d`` FFN (``f = 0.075``); a target you give is an error there instead.
    fallback: "portable" (standard ONNX ops only), "custom" (the ``ai.tardis`` kernel library) or
        "auto" (custom when the library is built).
    margin: widen each window by this much when flagging outliers.
    predictor: what computes the pre-activations the outlier test reads: "exact" (x·W1: the exact
        outlier set, reads all of W1), "int4" (a 4-bit copy of W1, ``MatMulNBits``), "int2" (a 2-bit copy,
        ``MatMulNBits``, rounded on the calibration inputs; not tried by auto), "int8" (an int8
        copy of W1, ``DynamicQuantizeMatMul``; the fallback takes flagged residuals from it), "lowrank"
        (``(x·U)·V`` of rank ``predictor_rank`` fitted on the calibration inputs) or "auto" (per FFN,
        the one reading the fewest bytes, rows of flagged neurons included, whose recall of the true
        outliers on the held-out tokens is at least ``min_recall`` and, with ``speed_check``, whose
        rewrite runs no slower than the original; int4 and int8 only with the custom fallback).
    predictor_uncertainty: flag a neuron when its prediction is within this many of the predictor's
        per-neuron error standard deviations (measured on the calibration tokens) of a window edge.
    window: "narrowest" (the narrowest window holding the coverage) or "least-error" (among those
        windows, the one whose line has the least in-window squared error).
    allocation: "uniform" (one coverage for every neuron), "layer" (per-neuron coverage from
        ``coverage_grid`` by a Lagrangian on in-window SSE · ‖W2[i,:]‖², each FFN meeting its budget)
        or "global" (the same with one multiplier for all FFNs: only the total budget is met).
    coverage_grid: the coverages the per-neuron allocation chooses from.
    refit: refit the folded d×d map and bias by least squares on the calibration tokens (target:
        true FFN output minus the exact fallback term); no extra weights at inference.
    refit_ridge: the refit's shrinkage towards the plain fold, in pseudo-tokens per input dimension
        (``ρ = refit_ridge · (d + 1) · mean x²``); ``None`` chooses it on the held-out tokens.
    holdout: fraction of the kept calibration tokens (chosen at random) held out from every fit. Per
        FFN, the recipe's windows, allocation and refit are kept only where they lower the held-out
        error below the plain recipe's (narrowest windows, uniform coverage, plain fold), and the
        ``auto`` predictor's recall is measured there. 0: no held-out tokens, no such check.
    min_recall: the ``auto`` predictor's least recall of true outliers on the held-out tokens.
    max_samples: calibration tokens kept per FFN (a uniform reservoir beyond that; memory
        ``max_samples · (4·d + 8)`` bytes per FFN).
    quantize: "none", "int8" or "int4": after folding, the model's MatMuls (the folded one included) run in
        int8 as ``onnxruntime.quantization.quantize_dynamic`` makes them, or in 4 bits as its
        ``MatMulNBitsQuantizer`` does (``tardis_onnx.quantize``); the speed check then compares each rewrite
        with the original FFN quantized the same way.
    speed_check: time every FFN's rewrite against the original in ONNX Runtime on this machine at
        each of ``shapes`` (``(batch, sequence)`` pairs) on calibration inputs, and keep the original
        FFN wherever the rewrite is slower at any of them (``tardis_onnx.speed``). Default: on, unless
        the environment variable ``TARDIS_SPEED_CHECK`` is ``0``.
    calib_batch, calib_sequence, calib_batches: shape of the random calibration feeds used when no
        calibration data is given.
    seed: seed of random feeds and subsampling.
    """

    coverage: float | None = None
    target_reduction: float | None = None
    fallback: str = "auto"
    margin: float = 0.0
    predictor: str = "auto"
    predictor_rank: int = 64
    predictor_uncertainty: float = 1.0
    window: str = "least-error"
    allocation: str = "layer"
    coverage_grid: tuple[float, ...] = DEFAULT_GRID
    refit: bool = True
    refit_ridge: float | None = None
    holdout: float = 0.2
    min_recall: float = 0.95
    max_samples: int = 16384
    quantize: str = "none"
    speed_check: bool = field(default_factory=_speed_check_default)
    shapes: tuple[tuple[int, int], ...] = DEFAULT_SHAPES
    calib_batch: int = 2
    calib_sequence: int = 32
    calib_batches: int = 4
    seed: int = 0
    default_target: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        for name in ("coverage", "target_reduction", "margin", "predictor_uncertainty", "refit_ridge"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise ValueError(f"{name.replace('_', ' ')} must be a finite number, got {value}")
        if self.coverage is not None and self.target_reduction is not None:
            raise ValueError("give a coverage or a target reduction, not both")
        if self.coverage is None and self.target_reduction is None:
            self.target_reduction, self.default_target = DEFAULT_TARGET_REDUCTION, True
        if self.coverage is not None and not 0.0 <= self.coverage <= 1.0:
            raise ValueError(f"coverage must be in [0, 1], got {self.coverage}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.predictor not in PREDICTOR_CHOICES:
            raise ValueError(f"predictor must be one of {PREDICTOR_CHOICES}, got {self.predictor!r}")
        if self.predictor_rank < 1:
            raise ValueError(f"predictor rank must be >= 1, got {self.predictor_rank}")
        if self.predictor_uncertainty < 0:
            raise ValueError(f"predictor uncertainty must be >= 0, got {self.predictor_uncertainty}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.target_reduction is not None and not 0.0 <= self.target_reduction < 1.0:
            raise ValueError(f"target reduction must be in [0, 1), got {self.target_reduction}")
        if self.quantize not in QUANTIZE_CHOICES:
            raise ValueError(f"quantize must be one of {QUANTIZE_CHOICES}, got {self.quantize!r}")
        if self.window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {self.window!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        self.coverage_grid = tuple(float(t) for t in self.coverage_grid)
        if not self.coverage_grid or not all(0.0 <= t <= 1.0 for t in self.coverage_grid):
            raise ValueError(f"coverage grid values must be in [0, 1], got {self.coverage_grid}")
        if self.refit_ridge is not None and self.refit_ridge < 0:
            raise ValueError(f"refit ridge must be >= 0, got {self.refit_ridge}")
        if not 0.0 <= self.holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {self.holdout}")
        if not 0.0 <= self.min_recall <= 1.0:
            raise ValueError(f"min recall must be in [0, 1], got {self.min_recall}")
        if self.max_samples < 1:
            raise ValueError(f"max samples must be >= 1, got {self.max_samples}")
        self.shapes = tuple((int(b), int(s)) for b, s in self.shapes)
        if any(min(shape) < 1 for shape in self.shapes):
            raise ValueError(f"serving shapes must have batch and sequence >= 1, got {self.shapes}")
        if min(self.calib_batch, self.calib_sequence, self.calib_batches) < 1 or self.seed < 0:
            raise ValueError("calibration batch, sequence and batches must be >= 1 and the seed >= 0")

    @property
    def plain(self) -> bool:
        """Whether the recipe is the plain one (nothing for the held-out check to compare against)."""
        return self.window == "narrowest" and self.allocation == "uniform" and not self.refit

    def to_dict(self) -> dict:
        return asdict(self)
