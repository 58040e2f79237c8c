"""Settings of one ACIP pass."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from ..errors import HfCompressError

BASES = ("whitened", "plain")
OBJECTIVES = ("saliency", "acip", "torque", "drr", "nuclear", "pmmp")  # acip/objectives.py: one class each
LAMBDA_SCHEDULES = ("controller", "geometric")
UNITS = ("values", "channels", "all")  # acip/gates.py
LOSSES = ("labels", "dense")
LORA_RANK = 8  # saliency's default; it hurts the other objectives (docs/BENCHMARKS.md)


@dataclass
class AcipConfig:
    """One ACIP pass: which layers, which basis, how long, how hard.

    The pass stops when the alive size ratio reaches `stop_ratio` or after `max_steps` optimizer
    steps. `objective` names what moves the masks (acip/objectives.py). Lambda (its strength)
    is steered by the controller: it grows geometrically each step while the size of the alive
    factors lags a linear trajectory down to `stop_ratio` over `schedule_fraction` of the
    budget, and shrinks while ahead of it, so the pass keeps pace with any step budget. With
    `lambda_schedule="geometric"` it grows by `lambda_growth` every `lambda_every` steps
    whatever the size does, as in the ACIP paper.
    """

    stop_ratio: float = 0.4
    objective: str = "saliency"
    loss: str = "labels"  # "labels": next-token cross-entropy; "dense": KL to the dense model's distribution
    units: str | None = None  # "values" (singular values), "channels" (+ MLP channels), "all" (+ KV head groups);
    # None: "channels" for saliency (head groups die first and cost most: docs/BENCHMARKS.md), else "values"
    max_steps: int = 200
    batch_size: int = 4
    basis: str = "whitened"  # "whitened" (activation-aware, SVD-LLM) or "plain" SVD
    whitening_windows: int = 16  # calibration windows for the input covariances
    gradient_checkpointing: bool = True  # recompute block activations in backward: less memory, ~1/3 more compute
    mask_init: float = 1.0
    mask_lr: float | None = None  # None: derived from max_steps (see `learning_rate`)
    lambda_init: float = 0.5  # in units of the mean |gate gradient|: about where deaths begin
    lambda_growth: float | None = None  # per-step factor; None derives it from max_steps
    lambda_schedule: str = "controller"  # or "geometric": lambda_growth every lambda_every steps
    lambda_every: int = 1
    drr_beta: float = 5.0  # drr: how sharply 1 - exp(-beta |mask|) saturates
    nuclear_smoothness: float = 0.0  # nuclear: weight of the first-difference smoothness penalty
    schedule_fraction: float = 0.8
    lora_rank: int | None = None  # None: LORA_RANK with saliency, 0 with the other objectives
    lora_alpha: float | None = None  # None = lora_rank (scale 1)
    lora_lr: float | None = None  # None: `adapter_learning_rate`, chosen on validation (docs/BENCHMARKS.md)
    include: str | None = None  # regex on module names; None = every Linear in the blocks
    exclude: str | None = None
    seed: int = 0
    save_every: int = 10  # steps between resumable checkpoints

    def __post_init__(self):
        if not 0 < self.stop_ratio < 1:
            raise HfCompressError(f"stop ratio must be in (0, 1), got {self.stop_ratio}")
        if self.max_steps < 1 or self.batch_size < 1 or self.whitening_windows < 1:
            raise HfCompressError("max steps, batch size and whitening windows must be positive")
        if self.basis not in BASES:
            raise HfCompressError(f"basis must be one of {BASES}, not '{self.basis}'")
        if self.lora_rank is None:
            self.lora_rank = LORA_RANK if self.objective == "saliency" else 0
        if self.lora_rank < 0:
            raise HfCompressError(f"LoRA rank must be >= 0, got {self.lora_rank}")
        if self.objective not in OBJECTIVES:
            raise HfCompressError(f"objective must be one of {OBJECTIVES}, not '{self.objective}'")
        if self.loss not in LOSSES:
            raise HfCompressError(f"loss must be one of {LOSSES}, not '{self.loss}'")
        if self.units is None:
            self.units = "channels" if self.objective == "saliency" else "values"
        if self.units not in UNITS:
            raise HfCompressError(f"units must be one of {UNITS}, not '{self.units}'")
        if self.units != "values" and self.objective != "saliency":
            raise HfCompressError(f"objective '{self.objective}' ranks singular values only; "
                                  "pass --units values with it (MLP channels and head groups need saliency)")
        if self.lambda_schedule not in LAMBDA_SCHEDULES:
            raise HfCompressError(f"lambda schedule must be one of {LAMBDA_SCHEDULES}, not '{self.lambda_schedule}'")
        if self.lambda_every < 1:
            raise HfCompressError(f"lambda_every must be >= 1, got {self.lambda_every}")

    @property
    def learning_rate(self) -> float:
        """A mask pushed down at one gradient RMS per step dies within a tenth of the budget."""
        if self.mask_lr is not None:
            return self.mask_lr
        return self.mask_init / max(1.0, 0.1 * self.max_steps)

    @property
    def adapter_learning_rate(self) -> float:
        """1e-3 for up to 60 steps; a longer pass fits its calibration text at that rate, so beyond
        60 steps it shrinks as the square root of the step count (5.5e-4 at 200)."""
        if self.lora_lr is not None:
            return self.lora_lr
        return 1e-3 * min(1.0, 60 / self.max_steps) ** 0.5

    @property
    def growth(self) -> float:
        """Lambda can double in a twentieth of the budget."""
        if self.lambda_growth is not None:
            return self.lambda_growth
        return 2 ** (1 / max(1.0, 0.05 * self.max_steps))

    def target_ratio(self, step: int, start: float) -> float:
        """Linear from `start` at step 0 to `stop_ratio` after `schedule_fraction` of the budget."""
        progress = min(1.0, step / max(1.0, self.schedule_fraction * self.max_steps))
        return start - (start - self.stop_ratio) * progress

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> AcipConfig:
        names = {f.name for f in fields(cls)}
        data = {"units": "values", **data}  # passes written before units were ranked
        return cls(**{k: v for k, v in data.items() if k in names})
