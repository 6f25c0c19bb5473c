"""A training job's settings: one dataclass whose field table (default, help, choices) drives validation
and the `edgeprune train` flags."""

from __future__ import annotations

import os
from dataclasses import Field, dataclass, field, fields
from typing import Any

from edge_agent.ml.models import BUILTIN
from edge_agent.ml.pruning import BLOCK_SHAPE, GRANULARITIES
from edge_agent.protocol.constants import IMPORTANCE_METHODS

from ..downlink import DOWNLOAD_FORMATS
from ..masks import MASK_POLICIES
from ..schedule import SCHEDULES
from ..strategy import AGGREGATIONS

UPDATE_FORMATS = ("auto", "fp32", "fp16", "int8", "int6", "int4")
OPTIMIZERS = ("adam", "sgd")
_BLOCK = f"{BLOCK_SHAPE[1]}x{BLOCK_SHAPE[0]}"


def option(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: tuple[str, ...] | None = None,
    metavar: str | None = None,
    group: str | None = None,
    show_default: bool = True,
) -> Any:
    """One row of the field table: the field's default, its `train` flag's help (and flag name, if it
    is not the field's), its choices (checked by validate()), and a mutually exclusive group."""
    meta: dict[str, Any] = {"help": help, "flag": flag, "choices": choices, "metavar": metavar, "group": group}
    meta["show_default"] = show_default
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    """A training job. Each field is one `edgeprune train` flag (coordinator/cli/train.py reads this table)."""

    model: str = option(
        "digits_cnn",
        f"built-in model ({', '.join(BUILTIN)}) or a tf-keras model file (.keras, .h5, SavedModel dir)",
    )
    rounds: int = option(10, "federated rounds")
    sparsity: float = option(0.8, "target fraction of pruned weights; 0 = dense FedAvg")
    schedule: str = option(
        "polynomial",
        "sparsity over rounds: polynomial ramp to the target, then hold; or constant from round 1",
        choices=SCHEDULES,
    )
    ramp_fraction: float = option(0.8, "polynomial: fraction of rounds to reach the target")
    regrow: float = option(
        0.5,
        "each round, clients train every weight (pruned ones from zero) for this fraction of their local "
        "steps, then prune by magnitude, so weights that matter can grow back; 0 = fixed masks that only "
        "shrink (2:4 never regrows)",
    )
    clients_per_round: int | None = option(None, "devices sampled per round (default: all eligible)", group="sample")
    fraction: float | None = option(
        None, "fraction of eligible devices sampled per round (default: all)", group="sample"
    )
    min_clients: int = option(1, "updates needed to apply a round; a run where no round applied fails")
    local_epochs: int = option(2, "local epochs per round")
    batch_size: int = option(32, "local batch size")
    lr: float = option(2e-3, "local learning rate")
    optimizer: str = option("adam", "local optimizer", choices=OPTIMIZERS)
    granularity: str = option(
        "unstructured",
        f"pruning granularity: single weights, {_BLOCK} blocks (Dense kernels; what TFLite's sparse int8 "
        f"stores compactly), or 2:4 (50%%)",
        choices=GRANULARITIES,
    )
    mask_policy: str = option(
        "global",
        "global mask each round: one magnitude threshold across all layers at the scheduled sparsity "
        "(global), the same sparsity in every layer, or the union/intersection of client masks",
        choices=MASK_POLICIES,
    )
    update_format: str = option(
        "auto",
        "upload value encoding; auto = int4 deltas with stochastic rounding when pruning, plain fp32 for "
        "dense FedAvg",
        choices=UPDATE_FORMATS,
    )
    aggregation: str = option(
        "fedavg",
        "how updates combine: sample-weighted FedAvg (streaming), or coordinate-wise median / trimmed "
        "mean among the clients that kept each weight (robust to a few bad clients; keeps all updates "
        "of a round in memory)",
        choices=AGGREGATIONS,
    )
    trim: float = option(0.1, "trimmed-mean: fraction cut at each end")
    clip_norm: float = option(0.0, "clip each update (client minus global) to this L2 norm; 0 = off")
    max_norm_ratio: float = option(
        10.0, "reject an update whose norm exceeds this multiple of the model's norm; 0 = off"
    )
    structured: float = option(
        0.0,
        "structured pruning: remove this fraction of the units/filters of every Dense and Conv2D layer "
        "that can shrink safely (ranked by the fleet's importance statistics), gradually, with recovery "
        "training between steps; weight pruning then sparsifies what remains; 0 = off",
        metavar="FRACTION",
    )
    structured_every: int = option(
        2, "one structured step every K rounds, the last at least one round before the end", metavar="K"
    )
    importance: str = option(
        "activation",
        "how devices rank units: mean |activation| on local data, weight L1/L2 norm, or a first-order " "Taylor score",
        choices=IMPORTANCE_METHODS,
    )
    download_format: str = option(
        "delta-int8",  # the smallest format that kept accuracy within 0.3 points at 80% and 90% (fl_pruning)
        "what goes down each round: the model as fp32 or fp16 values, or its change since the model the "
        "clients hold, quantised to int8 / int4 with error feedback (devices without it get the exact "
        "model)",
        choices=DOWNLOAD_FORMATS,
    )
    round_timeout_s: float = option(600.0, "seconds to wait for updates in a round", flag="round_timeout")
    seed: int = option(0, "seed for model init, client sampling and local shuffling")
    eval_data: str | None = option(
        "digits",
        "held-out data on the coordinator: 'digits', 'fashion-mnist', .npz, .csv, image folder, or 'none'",
    )
    eval_every: int = option(
        1,
        "evaluate the global model every K rounds, the first and each of the last 10 (default: 1 = every round)",
        show_default=False,
    )
    input_shape: tuple[int, ...] | None = option(None, "input shape for a built-in model without --eval-data")
    num_classes: int | None = option(None, "classes for a built-in model without --eval-data")
    devices: list[str] | None = option(None, "comma-separated device ids to use (default: every device that can train)")
    wait_for_devices: int = option(
        0,
        "before round 1, wait (once) until this many devices can train; on timeout go on only if "
        "--min-clients allows (default: 0 = do not wait)",
        flag="wait_for",
        show_default=False,
    )
    wait_timeout_s: float = option(60.0, "seconds --wait-for waits", flag="wait_timeout")

    @staticmethod
    def table() -> list[Field[Any]]:
        """The field table, in flag order."""
        return list(fields(TrainConfig))

    @staticmethod
    def flag_of(f: Field[Any]) -> str:
        """The `train` flag's dest for field ``f`` (its name unless the table says otherwise)."""
        return str(f.metadata.get("flag") or f.name)

    def validate(self) -> None:
        for f in self.table():
            choices = f.metadata["choices"]
            if choices is not None and getattr(self, f.name) not in choices:
                flag = "--" + self.flag_of(f).replace("_", "-")
                raise ValueError(f"{flag} must be one of {', '.join(choices)}")
        if self.rounds < 1:
            raise ValueError("--rounds must be >= 1")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError("--sparsity must be in [0, 1)")
        if self.granularity == "2:4" and self.sparsity not in (0.0, 0.5):
            raise ValueError("--granularity 2:4 means exactly 50% sparsity: use --sparsity 0.5")
        if self.granularity == "2:4" and self.mask_policy in ("union", "intersection"):
            raise ValueError("--granularity 2:4 keeps its pattern only with --mask-policy global or layer")
        if not 0.0 <= self.regrow < 1.0:
            raise ValueError("--regrow must be in [0, 1): the fraction of local steps before the prune")
        if self.min_clients < 1 or self.local_epochs < 1 or self.batch_size < 1 or self.round_timeout_s <= 0:
            raise ValueError("--min-clients, --local-epochs, --batch-size and --round-timeout must be positive")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise ValueError("--fraction must be in (0, 1]")
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
