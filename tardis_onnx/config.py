"""The settings of one optimisation run: one documented dataclass, copied into the JSON report."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from tardis_onnx.predictor import PREDICTORS

FALLBACKS = ("auto", "portable", "custom")
WINDOWS = ("narrowest", "least-error")
ALLOCATIONS = ("uniform", "layer", "global")
DEFAULT_GRID = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.975, 0.99, 1.0)
# Named bundles of settings. "accurate" is what the MiniLM evaluation found best (DESIGN.md §7):
# least-error windows, per-neuron coverage under each layer's budget, and the least-squares refit.
PRESETS = {
    "plain": {"window": "narrowest", "allocation": "uniform", "refit": False},
    "accurate": {"window": "least-error", "allocation": "layer", "refit": True},
}


@dataclass
class TardisConfig:
    """How the pass folds FFNs.

    coverage: fraction of each neuron's calibration pre-activations its linear
        window must hold (0 = every neuron always falls back: exact).
    fallback: "portable" (standard ONNX ops only), "custom" (the ``ai.tardis``
        kernel library) or "auto" (custom when the library is built).
    margin: widen each window by this much when flagging outliers.
    predictor: what computes the pre-activations the outlier test reads: "exact" (x·W1: the
        exact outlier set, reads all of W1), "int4" (a 4-bit copy of W1, ``MatMulNBits``) or
        "lowrank" (``(x·U)·V`` of rank ``predictor_rank`` fitted on the calibration inputs).
    predictor_uncertainty: flag a neuron when its prediction is within this many of the predictor's
        per-neuron error standard deviations (measured on the calibration tokens) of a window edge.
    target_reduction: when set, the fallback reduction ``1 − (d² + f·2dh)/(2dh)`` (DESIGN §2) each
        FFN must reach on the calibration tokens; it sets the outlier budget ``f`` (and replaces
        ``coverage``, whose budget is ``f = 1 − coverage``).
    window: "narrowest" (the narrowest window holding the coverage) or "least-error" (among those
        windows, the one whose line has the least in-window squared error).
    allocation: "uniform" (one coverage for every neuron), "layer" (per-neuron coverage from
        ``coverage_grid`` by a Lagrangian on in-window SSE · ‖W2[i,:]‖², each FFN meeting its budget)
        or "global" (the same with one multiplier for all FFNs: only the total budget is met).
    coverage_grid: the coverages the per-neuron allocation chooses from.
    refit: refit the folded d×d map and bias by least squares on the calibration tokens (target:
        true FFN output minus the exact fallback term); no extra weights at inference.
    refit_ridge: relative shrinkage of the refit towards the plain fold.
    max_samples: calibration tokens kept per FFN (a uniform reservoir beyond that; memory
        ``max_samples · (4·d + 8)`` bytes per FFN).
    calib_batch, calib_sequence, calib_batches: shape of the random calibration
        feeds used when no calibration data is given.
    seed: seed of random feeds and subsampling.
    """

    coverage: float = 0.9
    fallback: str = "auto"
    margin: float = 0.0
    predictor: str = "exact"
    predictor_rank: int = 64
    predictor_uncertainty: float = 1.0
    target_reduction: float | None = None
    window: str = "narrowest"
    allocation: str = "uniform"
    coverage_grid: tuple[float, ...] = DEFAULT_GRID
    refit: bool = False
    refit_ridge: float = 1e-6
    max_samples: int = 16384
    calib_batch: int = 2
    calib_sequence: int = 32
    calib_batches: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.coverage <= 1.0:
            raise ValueError(f"coverage must be in [0, 1], got {self.coverage}")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if self.predictor not in PREDICTORS:
            raise ValueError(f"predictor must be one of {PREDICTORS}, got {self.predictor!r}")
        if self.predictor_rank < 1:
            raise ValueError(f"predictor rank must be >= 1, got {self.predictor_rank}")
        if self.predictor_uncertainty < 0:
            raise ValueError(f"predictor uncertainty must be >= 0, got {self.predictor_uncertainty}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")
        if self.target_reduction is not None and not 0.0 <= self.target_reduction < 1.0:
            raise ValueError(f"target reduction must be in [0, 1), got {self.target_reduction}")
        if self.window not in WINDOWS:
            raise ValueError(f"window must be one of {WINDOWS}, got {self.window!r}")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"allocation must be one of {ALLOCATIONS}, got {self.allocation!r}")
        self.coverage_grid = tuple(float(t) for t in self.coverage_grid)
        if not self.coverage_grid or not all(0.0 <= t <= 1.0 for t in self.coverage_grid):
            raise ValueError(f"coverage grid values must be in [0, 1], got {self.coverage_grid}")
        if self.max_samples < 1:
            raise ValueError(f"max samples must be >= 1, got {self.max_samples}")

    def to_dict(self) -> dict:
        return asdict(self)
