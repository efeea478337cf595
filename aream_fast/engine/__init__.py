"""Training / evaluation engine: config, checkpoint + resume, schedule, precision, DDP, logging, the AReAM
step, the training loop, CAM writing and scoring. ``scripts/train.py`` and ``scripts/make_cams.py`` are thin
wrappers around :func:`aream_fast.engine.trainer.run` and :mod:`aream_fast.evaluation.cams`."""
from aream_fast.engine.config import OFFICIAL_PRESET, TrainConfig, build_parser, config_from_args

__all__ = ["OFFICIAL_PRESET", "TrainConfig", "build_parser", "config_from_args", "run", "Trainer"]


def __getattr__(name):  # the trainer pulls in models / data; import it only when asked for
    if name in ("run", "Trainer", "RunResult"):
        from aream_fast.engine import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'aream_fast.engine' has no attribute {name!r}")
