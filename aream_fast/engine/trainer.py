"""The task-agnostic training loop: run any :class:`~aream_fast.engine.task.Task` with checkpoints and resume.

``run(cfg) -> RunResult`` is what ``scripts/train.py`` calls (stage one: an :class:`AReAMTask`). Order of one run:

1. distributed set-up from the environment (torchrun), seeds, the task's data (before any run folder exists);
2. run folder, logger, the resumable data order; the task's model; AdamW (the task may override) with a
   per-step warm-up + cosine schedule; precision (``--amp``);
3. ``--resume``: model, optimizer, scheduler, scaler, position (epoch, batch, global step), best metric and the
   RNG states are restored; the data order of every epoch is a function of (seed, epoch) only, so the resumed
   run sees exactly the batches and random draws the uninterrupted run would have;
4. DDP wrapping (torchrun) and ``--compile`` of the training model; the task prepares its step;
5. epochs: steps, logging, optional step checkpoints; at each epoch end ``checkpoint.pth`` (before the
   validation: a crash there loses no training), the task's validation (rank 0), ``checkpoint.pth`` again and,
   when the selection metric improves, ``checkpoint_best.pth``. SIGINT/SIGTERM or ``--max-steps`` stop after the
   current step with a checkpoint. The replaced ``checkpoint.pth`` is kept as ``checkpoint_prev.pth``; a resume
   falls back to it when the newest does not load, refuses a checkpoint whose config differs (unless
   ``--resume-override``) and rewinds ``metrics.jsonl`` / ``.csv`` to the rows the checkpoint had logged, so
   every step is logged exactly once;
6. after a finished run, the task's ``finish`` (stage one: CAM seeds and their mIoU) and ``summary.json``.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader

from aream_fast.engine import checkpoint as ckpt_io
from aream_fast.engine.config import TrainConfig, config_differences
from aream_fast.engine.errors import UserError
from aream_fast.engine.distributed import DistInfo, any_rank, barrier, broadcast_object, cleanup, init_distributed
from aream_fast.engine.interrupt import GracefulStop
from aream_fast.engine.precision import Precision, choose_precision, precision_from_name
from aream_fast.engine.run_log import RunLogger, write_manifest
from aream_fast.engine.sampling import ResumableBatchSampler, SeededSampleDataset
from aream_fast.engine.task import Task, TaskContext

RUNS_ROOT = "runs"


@dataclass
class RunResult:
    run_dir: str
    status: str  # "finished" | "interrupted" | "max_steps"
    exit_code: int
    global_step: int
    epoch: int
    best_map: Optional[float]  # best value of the task's selection metric (stage one: val mAP)
    losses: List[float] = field(default_factory=list)  # total loss per step run in this process
    cam_results: Optional[Dict[str, Any]] = None  # what the task's finish() returned
    wall_s: float = 0.0
    compile_stats: Optional[Dict[str, int]] = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _dynamo_graph_count() -> int:
    """Number of graphs dynamo has compiled in this process (for the no-recompile check)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Trainer:
    """Owns the state of one run of ``task``. ``cfg`` needs the ``optim``, ``precision`` and ``run`` sections
    (and ``data.num_workers``); everything else belongs to the task. Use :func:`run` unless you need the pieces."""

    def __init__(self, cfg: TrainConfig, task: Optional[Task] = None):
        self.cfg = cfg.validate()
        if task is None:  # stage one; the Conformer-S has its own data, optimiser and crop-box labels
            from aream_fast.engine.aream_task import AReAMTask
            from aream_fast.engine.conformer_task import ConformerTask

            task = (ConformerTask if self.cfg.model.model == "conformer_small" else AReAMTask)(self.cfg)
        self.task = task
        self.log = None
        self.dist: DistInfo = init_distributed(cfg.run.device)
        try:
            self._setup(cfg)
        except BaseException:
            self.close()
            raise

    def _log(self, msg: str) -> None:
        if self.log is not None:
            self.log.info(msg)

    def _setup(self, cfg: TrainConfig) -> None:
        run, optim = cfg.run, cfg.optim
        self.device = self.dist.device
        self.t0 = time.time()
        self.ctx = TaskContext(cfg=cfg, device=self.device, dist=self.dist, log=self._log,
                               autocast=lambda: self.precision.autocast(self.device))
        seed_everything(run.seed)  # same model init on every rank
        self.task.setup_data(self.ctx)  # bad roots / corrupt images fail before a run dir is made

        # run dir (rank 0 decides, everyone agrees) and resume checkpoint (loaded, its config compared)
        resume_path, resume_ckpt, self.resume_notes = self._resolve_resume()
        if run.resume == "auto" and resume_path is None and self.dist.is_main:
            print("--resume auto: no checkpoint found, starting from scratch", flush=True)
        run_dir = run.run_dir
        if run_dir is None:
            run_dir = os.path.dirname(resume_path) if resume_path else self._default_run_dir()
        self.run_dir = broadcast_object(run_dir, self.dist)
        self.ctx.run_dir = self.run_dir
        self.log = RunLogger(self.run_dir, enabled=self.dist.is_main)
        self.log.info(f"run dir {self.run_dir} | world size {self.dist.world_size} | device {self.device}")
        for note in self.resume_notes:
            self.log.info(note)
        self._choose_cpu_threads()
        bad = getattr(self.task, "bad_images", [])
        if bad:
            self.log.info(f"WARNING: skipped {len(bad)} unreadable image(s) (--skip-bad-images): {bad[:10]}")
        train_set = self.task.train_set
        self.sampler = ResumableBatchSampler(len(train_set), optim.batch_size, seed=run.seed,
                                             rank=self.dist.rank, world_size=self.dist.world_size)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = self.steps_per_epoch * optim.epochs
        self.loader = DataLoader(SeededSampleDataset(train_set, run.seed), batch_sampler=self.sampler,
                                 num_workers=cfg.data.num_workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=False,
                                 # a private generator: creating an iterator (every epoch, and on resume
                                 # mid-epoch) must not draw from the global torch RNG
                                 generator=torch.Generator().manual_seed(run.seed))

        self.model = self.task.build_model(self.ctx)
        self.ctx.model = self.model
        self.optimizer = self.task.build_optimizer(self.model)
        warmup_steps = min(self.total_steps, int(round(optim.warmup_epochs * self.steps_per_epoch)))
        self.schedule = self.task.build_schedule(self.optimizer, total_steps=self.total_steps,
                                                 warmup_steps=warmup_steps)
        self.precision: Precision = choose_precision(
            self.device, cfg.precision.amp, width=int(getattr(self.model, "embed_dim", 192)),
            cpu_mode=cfg.precision.cpu_amp, probe=self.task.precision_probe())
        self.precision = broadcast_object(self.precision, self.dist)  # rank 0's measurement decides for all
        if resume_ckpt is not None:  # keep the interrupted run's precision, so the resumed losses match
            stored = resume_ckpt.get("precision")
            if stored is not None and stored != self.precision.name:
                self.precision = precision_from_name(stored, self.device,
                                                     f"{stored} restored from the checkpoint being resumed")
        self.log.info(f"precision: {self.precision.name} -- {self.precision.reason}")
        self.scaler = self.precision.make_scaler(self.device)

        # position
        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        self.best_map: Optional[float] = None
        self.validation_pending = False  # the checkpoint was written before its epoch's validation
        if resume_ckpt is not None:
            self._resume(resume_path, resume_ckpt)
            del resume_ckpt
        else:  # training RNG stream differs per rank (DropPath), after the shared init
            seed_everything(run.seed + 1000 * self.dist.rank + 1)

        self._wrap_and_compile()
        self.graphs_after_warmup: Optional[int] = None
        if self.dist.is_main:
            extra = {"steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps,
                     "resumed_from": resume_path, "resume_notes": self.resume_notes,
                     "threads_reason": self.threads_reason, "task": type(self.task).__name__,
                     "num_parameters": sum(p.numel() for p in self.model.parameters())}
            extra.update(self.task.manifest_extra())
            write_manifest(self.run_dir, cfg.to_dict(), device=self.device, world_size=self.dist.world_size,
                           precision=self.precision.name, precision_reason=self.precision.reason, extra=extra)
            describe = getattr(self.task, "describe", None)
            self.log.info((describe() + ", " if describe else "") +
                          f"{self.steps_per_epoch} steps/epoch x {optim.epochs} epochs; config in manifest.json")

    # ------------------------------------------------------------------------------------------------ set-up
    def _default_run_dir(self) -> str:
        name = self.cfg.run.run_name or self.task.run_name()
        return os.path.join(RUNS_ROOT, name, time.strftime("%Y%m%d-%H%M%S"))

    def _resolve_resume(self) -> Tuple[Optional[str], Optional[Dict[str, Any]], List[str]]:
        """(path, loaded checkpoint, notes for the log) of ``--resume``, or (None, None, []).

        A path: that file. ``auto``: the run folder's ``checkpoint.pth``, falling back to ``checkpoint_prev.pth``
        when the newest does not load (each skipped file is noted with the reason); without ``--run-dir``, the
        newest unfinished run of the run name whose recorded config matches. A config that differs (outside
        :data:`~aream_fast.engine.config.RESUME_FREE_FIELDS`) is refused with the differences unless
        ``--resume-override``."""
        run = self.cfg.run
        if run.resume is None:
            return None, None, []
        if run.resume != "auto":
            path, ckpt = run.resume, ckpt_io.load_checkpoint(run.resume, map_location=self.device)
            return path, ckpt, self._check_resume_config(path, ckpt)
        if run.run_dir is not None:
            dirs = [run.run_dir] if ckpt_io.resume_candidates(run.run_dir) else []
        else:
            dirs = ckpt_io.find_run_dirs(RUNS_ROOT, run.run_name or self.task.run_name())
        notes: List[str] = []
        refusals: List[str] = []
        for run_dir in dirs:
            path, ckpt, skipped = ckpt_io.load_first_good(ckpt_io.resume_candidates(run_dir), self.device)
            notes += [f"WARNING: skipped checkpoint {p} (does not load: {why})" for p, why in skipped]
            if path is None:
                refusals.append(f"{run_dir}: no checkpoint loads")
                continue
            if notes:
                notes.append(f"resuming from {path} instead")
            try:
                return path, ckpt, notes + self._check_resume_config(path, ckpt)
            except UserError:
                diffs = config_differences(ckpt.get("config") or {}, self.cfg)
                refusals.append(f"{path}: config differs ({'; '.join(diffs)})")
        if refusals:
            raise UserError("--resume auto: no run to resume matches this command: " + " | ".join(refusals)
                            + " (start a new run with another --run-name / --run-dir, or pass --resume-override "
                              "to resume with the changed flags)")
        return None, None, notes

    def _check_resume_config(self, path: str, ckpt: Dict[str, Any]) -> List[str]:
        """Refuse (UserError) a checkpoint whose config differs outside the resume-free fields, unless
        ``--resume-override``; returns the log notes (overridden and allowed changes)."""
        stored = ckpt.get("config") or {}
        diffs = config_differences(stored, self.cfg)
        if diffs and not self.cfg.run.resume_override:
            raise UserError(f"--resume {path}: the checkpoint was trained with another config: {'; '.join(diffs)} "
                            f"(pass --resume-override to resume with the changed flags)")
        allowed = [d for d in config_differences(stored, self.cfg, ignore=frozenset()) if d not in diffs
                   and not d.startswith(("--resume", "--run-dir", "--max-steps"))]
        notes = [f"WARNING: --resume-override: resuming {path} with a changed config: {'; '.join(diffs)}"] \
            if diffs else []
        return notes + ([f"resuming {path} with changed run options: {'; '.join(allowed)}"] if allowed else [])

    def _choose_cpu_threads(self) -> None:
        """torch's CPU thread count, an explicit recorded choice (never the machine's load): ``--threads``, else
        ``OMP_NUM_THREADS``, else the cores this process may use (``sched_getaffinity``) divided by the local
        processes. Recorded in the manifest (``torch_threads``, ``threads_reason``); restored by close()."""
        run = self.cfg.run
        self._threads_before = torch.get_num_threads()
        local = int(os.environ.get("LOCAL_WORLD_SIZE", self.dist.world_size) or 1)
        if run.threads is not None:
            threads, why = run.threads, "--threads"
        elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
            threads, why = int(os.environ["OMP_NUM_THREADS"]), "OMP_NUM_THREADS"
        else:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
            threads = max(1, cores // max(1, local))
            why = f"{cores} cores available" + (f" / {local} local processes" if local > 1 else "")
        torch.set_num_threads(threads)
        self.threads_reason = why
        self.log.info(f"torch CPU threads: {threads} ({why}; --threads N to choose)")

    def _wrap_and_compile(self) -> None:
        train_model: Any = self.model
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = DDP(self.model, device_ids=ids)
        if self.cfg.precision.compile:
            # one graph per phase: fixed shapes (drop_last) and a fixed request for the whole run
            train_model = torch.compile(train_model, backend=self.cfg.precision.compile_backend)
        self.train_model = train_model
        self.task.prepare(self.ctx, train_model)

    # ------------------------------------------------------------------------------------------- checkpoints
    def _state(self) -> Dict[str, Any]:
        state = {
            "format": ckpt_io.FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "global_step": self.global_step,
            "best_map": self.best_map,
            "rng": ckpt_io.capture_rng_state(),
            "config": self.cfg.to_dict(),
            "world_size": self.dist.world_size,
            "precision": self.precision.name,
            "metrics_rows": self.log.rows_written if self.log is not None else None,
            "validation_pending": self.validation_pending,
        }
        state.update(self.task.checkpoint_extra())
        return state

    def save(self, name: str = ckpt_io.CHECKPOINT_NAME, state: Optional[Dict[str, Any]] = None, *,
             rotate: bool = True) -> None:
        """Rank 0 writes ``run_dir/name`` atomically (``checkpoint.pth``: the one it replaces kept as
        ``checkpoint_prev.pth`` unless ``rotate`` is False, for a rewrite of the same position). Every rank's RNG
        differs; rank 0's is stored."""
        if self.dist.is_main:
            state = state if state is not None else self._state()
            path = os.path.join(self.run_dir, name)
            if name == ckpt_io.CHECKPOINT_NAME and rotate:  # keep the previous one as checkpoint_prev.pth
                ckpt_io.rotate_save(state, path, os.path.join(self.run_dir, ckpt_io.PREVIOUS_NAME))
            else:
                ckpt_io.atomic_save(state, path)
        barrier(self.dist)

    def _resume(self, path: str, ckpt: Dict[str, Any]) -> None:
        seed = self.cfg.run.seed
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.batch_in_epoch = int(ckpt["batch_in_epoch"])
        self.global_step = int(ckpt["global_step"])
        self.best_map = ckpt.get("best_map")
        self.validation_pending = bool(ckpt.get("validation_pending", False))
        dropped = self.log.rewind(ckpt.get("metrics_rows"), after_step=self.global_step)
        if dropped:
            self.log.info(f"metrics: dropped {dropped} row(s) logged after the checkpoint (their steps run again)")
        if ckpt.get("world_size", 1) == self.dist.world_size:
            ckpt_io.restore_rng_state(ckpt["rng"])
            if self.dist.rank != 0:  # rank 0's stream was stored; others derive theirs deterministically
                seed_everything(seed + 1000 * self.dist.rank + 1 + self.global_step)
        else:
            self.log.info(f"resuming with world size {self.dist.world_size} (checkpoint: "
                          f"{ckpt.get('world_size')}): RNG streams re-seeded, data order differs")
            seed_everything(seed + 1000 * self.dist.rank + 1 + self.global_step)
        self.log.info(f"resumed from {path}: epoch {self.epoch}, batch {self.batch_in_epoch}, "
                      f"global step {self.global_step}, best {self.task.selection_metric} {self.best_map}")

    # ----------------------------------------------------------------------------------------------- training
    def _train_one_step(self, batch: Dict[str, Any]) -> Dict[str, float]:
        grad_clip = self.cfg.optim.grad_clip
        self.model.train()
        loss, terms = self.task.step(batch, self.epoch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at global step {self.global_step} "
                                     f"(terms {({k: float(v) for k, v in terms.items()})})")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), grad_clip)
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.schedule.step()
        out = {"loss": float(loss.detach()), "lr": lr}
        out.update({k: float(v) for k, v in terms.items()})
        return out

    def validate(self) -> Optional[Dict[str, float]]:
        """The task's validation on rank 0 only."""
        if not self.dist.is_main:
            return None
        return self.task.validate(self.ctx)

    def train(self) -> RunResult:
        run, epochs = self.cfg.run, self.cfg.optim.epochs
        losses: List[float] = []
        status = "finished"
        stop = GracefulStop()
        from tqdm import tqdm

        if self.validation_pending:  # resumed from a checkpoint written before its epoch's validation
            self._validate_and_save(self.epoch - 1, None)
        if run.max_steps is not None and self.global_step >= run.max_steps and self.epoch < epochs:
            self.log.info(f"--max-steps {run.max_steps} already reached (global step {self.global_step}): "
                          f"no step trained")
            return RunResult(run_dir=self.run_dir, status="max_steps", exit_code=0, global_step=self.global_step,
                             epoch=self.epoch, best_map=self.best_map, losses=losses,
                             compile_stats=self._compile_stats())
        with stop:
            while self.epoch < epochs:
                self.sampler.set_epoch(self.epoch, self.batch_in_epoch)
                bar = tqdm(total=self.steps_per_epoch, initial=self.batch_in_epoch, desc=f"epoch {self.epoch}",
                           disable=not self.dist.is_main, dynamic_ncols=True, leave=False)
                epoch_t0 = time.time()
                for batch in self.loader:
                    step_t0 = time.time()
                    record = self._train_one_step(batch)
                    self.batch_in_epoch += 1
                    self.global_step += 1
                    losses.append(record["loss"])
                    record.update(epoch=self.epoch, step=self.global_step, step_s=time.time() - step_t0)
                    self._check_recompiles(record)
                    if self.global_step % run.log_every == 0:
                        self.log.log_metrics(record, step=self.global_step)
                    bar.set_postfix(loss=f"{record['loss']:.4f}", **self.task.progress_postfix(record))
                    bar.update(1)
                    last_in_epoch = self.batch_in_epoch == self.steps_per_epoch
                    if run.max_steps is not None and self.global_step >= run.max_steps:
                        status = "max_steps"
                    if any_rank(stop.requested, self.dist):
                        status = "interrupted"
                    if (run.save_every_steps and self.global_step % run.save_every_steps == 0 and not last_in_epoch
                            and status == "finished"):  # a stop saves below
                        self.save()
                    if status != "finished" and not last_in_epoch:
                        break
                bar.close()
                if status != "finished" and self.batch_in_epoch < self.steps_per_epoch:
                    self.save()
                    self.log.info(f"stopped ({status}) at epoch {self.epoch}, batch {self.batch_in_epoch}, "
                                  f"global step {self.global_step}; checkpoint saved to "
                                  f"{os.path.join(self.run_dir, ckpt_io.CHECKPOINT_NAME)}")
                    break
                self._end_of_epoch(time.time() - epoch_t0)
                if status != "finished":
                    self.log.info(f"stopped ({status}) after epoch {self.epoch - 1}; checkpoint saved")
                    break
        exit_code = (stop.exit_code() or 128 + 15) if status == "interrupted" else 0
        return RunResult(run_dir=self.run_dir, status=status, exit_code=exit_code, global_step=self.global_step,
                         epoch=self.epoch, best_map=self.best_map, losses=losses,
                         compile_stats=self._compile_stats())

    def _end_of_epoch(self, epoch_s: float) -> None:
        """``checkpoint.pth`` first (marked ``validation_pending`` when this epoch validates: a crash in the
        validation loses no training, and the resumed run validates first), then the validation, then the
        checkpoint again with the best metric (and ``checkpoint_best.pth`` when it improved)."""
        run, epochs = self.cfg.run, self.cfg.optim.epochs
        epoch = self.epoch
        self.epoch += 1
        self.batch_in_epoch = 0
        self.validation_pending = (epoch + 1) % run.val_every == 0 or epoch + 1 == epochs
        self.save()
        if self.validation_pending:
            self._validate_and_save(epoch, epoch_s)

    def _validate_and_save(self, epoch: int, epoch_s: Optional[float]) -> None:
        key = self.task.selection_metric
        metrics = self.validate()
        improved = False
        if self.dist.is_main and metrics is not None:
            improved = self.best_map is None or metrics[key] > self.best_map
            if improved:
                self.best_map = metrics[key]
            row = {"epoch": epoch, "step": self.global_step, f"val_{key}": metrics[key],
                   f"best_val_{key}": self.best_map}
            self.log.log_metrics(row if epoch_s is None else dict(row, epoch_s=epoch_s), step=self.global_step)
            self.log.info(f"epoch {epoch}: val {key} {metrics[key]:.4f} (best {self.best_map:.4f})"
                          + ("" if epoch_s is None else f", {epoch_s:.1f} s"))
        improved = broadcast_object(improved, self.dist)
        self.best_map = broadcast_object(self.best_map, self.dist)
        self.validation_pending = False
        state = self._state() if self.dist.is_main else None
        self.save(state=state, rotate=False)  # same position as the checkpoint written before the validation
        if improved:
            self.save(ckpt_io.BEST_NAME, state=state)

    # ----------------------------------------------------------------------------------------- compile check
    def _compile_stats(self) -> Optional[Dict[str, int]]:
        if not self.cfg.precision.compile:
            return None
        return {"unique_graphs": _dynamo_graph_count(), "graphs_after_warmup": self.graphs_after_warmup}

    def _check_recompiles(self, record: Dict[str, Any]) -> None:
        """After the first steps of the final phase every graph exists; later steps must not add any."""
        if not self.cfg.precision.compile:
            return
        graphs = _dynamo_graph_count()
        if self.cfg.precision.debug_recompiles:
            record["dynamo_graphs"] = graphs
        warm_epoch = self.task.compile_warmup_epoch()
        if self.epoch >= warm_epoch and self.graphs_after_warmup is None and self.batch_in_epoch >= 2:
            self.graphs_after_warmup = graphs
        elif self.graphs_after_warmup is not None and graphs > self.graphs_after_warmup:
            self.log.info(f"WARNING: torch.compile recompiled at global step {self.global_step} "
                          f"({self.graphs_after_warmup} -> {graphs} graphs); run with TORCH_LOGS=recompiles")
            self.graphs_after_warmup = graphs

    def finish(self) -> Optional[Dict[str, Any]]:
        """Rank 0: the task's after-training work (stage one: CAM seeds and their mIoU)."""
        if not self.dist.is_main:
            return None
        return self.task.finish(self.ctx)

    def close(self) -> None:
        if getattr(self, "_threads_before", None):
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        if self.log is not None:
            self.log.close()
            self.log = None
        cleanup(self.dist)


def run(cfg: TrainConfig, task: Optional[Task] = None) -> RunResult:
    """Train (or resume) a run of ``task`` (default: stage one, :class:`AReAMTask`), then the task's finish."""
    trainer = Trainer(cfg, task)
    try:
        result = trainer.train()
        if result.status == "finished":
            result.cam_results = trainer.finish()
            if trainer.dist.is_main and result.cam_results:
                trainer.log.log_metrics(trainer.task.summary(result.cam_results), step=trainer.global_step)
        result.wall_s = time.time() - trainer.t0
        if trainer.dist.is_main:
            key = trainer.task.selection_metric
            summary = {"status": result.status, "global_step": result.global_step, "epoch": result.epoch,
                       f"best_val_{key}": result.best_map, "wall_s": result.wall_s,
                       "compile_stats": result.compile_stats}
            summary.update(trainer.task.summary(result.cam_results))
            with open(os.path.join(trainer.run_dir, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=2)
            trainer.log.info(f"done ({result.status}) in {result.wall_s:.1f} s: " + json.dumps(summary))
        return result
    finally:
        trainer.close()
