"""The settings of one optimisation run: one documented dataclass, copied into the JSON report."""

from __future__ import annotations

from dataclasses import asdict, dataclass

FALLBACKS = ("auto", "portable", "custom")


@dataclass
class TardisConfig:
    """How the pass folds FFNs.

    coverage: fraction of each neuron's calibration pre-activations its linear
        window must hold (0 = every neuron always falls back: exact).
    fallback: "portable" (standard ONNX ops only), "custom" (the ``ai.tardis``
        kernel library) or "auto" (custom when the library is built).
    margin: widen each window by this much when flagging outliers.
    max_samples: calibration tokens kept per FFN (a uniform subsample beyond that).
    calib_batch, calib_sequence, calib_batches: shape of the random calibration
        feeds used when no calibration data is given.
    seed: seed of random feeds and subsampling.
    """

    coverage: float = 0.9
    fallback: str = "auto"
    margin: float = 0.0
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
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin}")

    def to_dict(self) -> dict:
        return asdict(self)
