"""Training a model across the fleet: config, the loop, intake of updates, structured steps, records, resume.

Read :func:`~.loop.train` and :func:`~.loop.run_round` first: each fits on one screen.
"""

from .config import UPDATE_FORMATS, TrainConfig, check_model_ref
from .loop import run_round, train
from .plan import NoDevices
from .record import Run, Timer, new_run_id
from .resume import resume_config

__all__ = [
    "NoDevices",
    "Run",
    "Timer",
    "TrainConfig",
    "UPDATE_FORMATS",
    "check_model_ref",
    "new_run_id",
    "resume_config",
    "run_round",
    "train",
]
