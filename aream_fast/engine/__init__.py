"""Training engine: a task-agnostic :class:`Trainer` that runs a :class:`~aream_fast.engine.task.Task`
(stage one: ``aream_task.AReAMTask``), its config sections and command line, checkpoint + resume, schedule,
precision, DDP, logging. ``scripts/train.py`` is a thin wrapper around :func:`aream_fast.engine.trainer.run`."""
from aream_fast.engine.config import OFFICIAL_PRESET, TrainConfig, build_parser, config_from_args

__all__ = ["OFFICIAL_PRESET", "TrainConfig", "build_parser", "config_from_args", "run", "Trainer"]


def __getattr__(name):  # the trainer pulls in models / data; import it only when asked for
    if name in ("run", "Trainer", "RunResult"):
        from aream_fast.engine import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'aream_fast.engine' has no attribute {name!r}")
