"""A training job's settings: one dataclass, its defaults (the CLI's --help reads them), its validation."""

from __future__ import annotations

import os
from dataclasses import dataclass

from edge_agent.protocol.constants import IMPORTANCE_METHODS

from ..masks import MASK_POLICIES
from ..strategy import AGGREGATIONS

UPDATE_FORMATS = ("auto", "fp32", "fp16", "int8", "int6", "int4")


@dataclass
class TrainConfig:
    model: str = "digits_cnn"
    rounds: int = 10
    sparsity: float = 0.8
    schedule: str = "polynomial"
    ramp_fraction: float = 0.8
    clients_per_round: int | None = None
    fraction: float | None = None
    min_clients: int = 1
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 2e-3
    optimizer: str = "adam"
    granularity: str = "unstructured"
    mask_policy: str = "global"
    update_format: str = "auto"
    regrow: float = 0.5
    round_timeout_s: float = 600.0
    seed: int = 0
    eval_data: str | None = "digits"
    eval_every: int = 1  # evaluate every K rounds (and in each of the last 10, where the metrics are read)
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    devices: list[str] | None = None
    wait_for_devices: int = 0
    wait_timeout_s: float = 60.0
    aggregation: str = "fedavg"
    trim: float = 0.1
    clip_norm: float = 0.0
    max_norm_ratio: float = 10.0
    structured: float = 0.0
    structured_every: int = 2
    importance: str = "activation"

    def validate(self) -> None:
        if self.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError("--sparsity must be in [0, 1)")
        if self.granularity == "2:4" and self.sparsity not in (0.0, 0.5):
            raise ValueError("--granularity 2:4 means exactly 50% sparsity: use --sparsity 0.5")
        if self.mask_policy not in MASK_POLICIES:
            raise ValueError(f"--mask-policy must be one of {', '.join(MASK_POLICIES)}")
        if self.granularity == "2:4" and self.mask_policy in ("union", "intersection"):
            raise ValueError("--granularity 2:4 keeps its pattern only with --mask-policy global or layer")
        if self.update_format not in UPDATE_FORMATS:
            raise ValueError(f"--update-format must be one of {', '.join(UPDATE_FORMATS)}")
        if not 0.0 <= self.regrow < 1.0:
            raise ValueError("--regrow must be in [0, 1): the fraction of local steps before the prune")
        if self.min_clients < 1 or self.local_epochs < 1 or self.batch_size < 1 or self.round_timeout_s <= 0:
            raise ValueError("--min-clients, --local-epochs, --batch-size and --round-timeout must be positive")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError("--fraction must be in (0, 1]")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"--aggregation must be one of {', '.join(AGGREGATIONS)}")
        if not 0.0 <= self.trim < 0.5:
            raise ValueError("--trim must be in [0, 0.5)")
        if self.clip_norm < 0 or self.max_norm_ratio < 0:
            raise ValueError("--clip-norm and --max-norm-ratio must be >= 0 (0 = off)")
        if not 0.0 <= self.structured <= 1.0 or self.structured_every < 1:
            raise ValueError("--structured is a fraction of each layer's units in [0, 1]; --structured-every >= 1")
        if self.structured and self.rounds <= self.structured_every:
            raise ValueError(
                f"--structured needs more --rounds than --structured-every ({self.structured_every}): "
                "at least one shrinking step and a round of recovery training after it"
            )
        if self.structured and self.granularity in ("2:4", "block"):
            raise ValueError(
                f"--structured cannot be combined with --granularity {self.granularity} (its groups "
                "span input channels, which the cuts would split)"
            )
        if self.eval_every < 1:
            raise ValueError("--eval-every must be >= 1")
        if self.importance not in IMPORTANCE_METHODS:
            raise ValueError(f"--importance must be one of {', '.join(IMPORTANCE_METHODS)}")
        check_model_ref(self.model)

    @property
    def pruning_on(self) -> bool:
        return self.sparsity > 0.0

    @property
    def values_format(self) -> str:
        """auto: int4 deltas when pruning (unbiased stochastic rounding; measured no accuracy loss
        on digits against fp32, see benchmarks/fl_pruning.py), plain fp32 for dense FedAvg."""
        if self.update_format != "auto":
            return self.update_format
        return "int4" if self.pruning_on else "fp32"

    def structured_step(self, rnd: int) -> float | None:
        """The fraction of each layer's original units gone after this round, if the round shrinks the
        model: steps every ``structured_every`` rounds, reaching the target with at least one round of
        recovery training after the last step."""
        if not self.structured or rnd % self.structured_every:
            return None
        steps = max(1, (self.rounds - 1) // self.structured_every)
        i = rnd // self.structured_every
        return self.structured * i / steps if 1 <= i <= steps else None

    @property
    def regrow_fraction(self) -> float:
        """2:4 keeps one fixed pattern (TF-MOT sets it once), so it never regrows."""
        return self.regrow if self.pruning_on and self.granularity != "2:4" else 0.0


def check_model_ref(ref: str) -> None:
    """A built-in model name or an existing model file; checked before any device starts a worker."""
    from edge_agent.ml.models import BUILTIN

    if ref in BUILTIN or os.path.exists(ref):
        return
    if os.sep in ref or ref.endswith((".keras", ".h5")):
        raise ValueError(f"--model {ref!r}: no such file")
    raise ValueError(
        f"--model {ref!r}: unknown built-in model; choose from {', '.join(BUILTIN)} or give a "
        f"tf-keras model file (.keras, .h5 or a SavedModel directory)"
    )
