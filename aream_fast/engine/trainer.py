"""The training loop: build everything from a :class:`TrainConfig`, train, checkpoint, resume, write CAMs.

``run(cfg) -> RunResult`` is what ``scripts/train.py`` calls. Order of one run:

1. distributed set-up from the environment (torchrun), seeds, synthetic data written once (rank 0);
2. datasets (train with augmentation, val for mAP), model (``build_model`` with size overrides), AdamW with
   decay/no-decay groups, warm-up + cosine schedule (per step), precision (``--amp``), PAR;
3. ``--resume``: model, optimizer, scheduler, scaler, position (epoch, batch, global step), best mAP and the
   RNG states are restored; the data order of every epoch is a function of (seed, epoch) only, so the
   resumed run sees exactly the batches and random draws the uninterrupted run would have;
4. ``--compile``: the training model (DDP-wrapped when distributed) and the AReAM loss are compiled; the
   pseudo-label forward (2B images, no grad) gets its own compiled copy of the raw model;
5. epochs: steps (``AReAMStep``), logging, optional step checkpoints; at each epoch end val mAP (rank 0
   only), ``checkpoint.pth`` and, when mAP improves, ``checkpoint_best.pth``. SIGINT/SIGTERM or
   ``--max-steps`` stop after the current step with a checkpoint;
6. rank 0 writes CAMs of ``--cam-split`` with the best checkpoint's weights and prints their mIoU.
"""
from __future__ import annotations

import math
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from aream_fast.engine import checkpoint as ckpt_io
from aream_fast.engine.build import build_cam_eval_split, build_model_from_config, build_split, resolve_data_root
from aream_fast.engine.config import TrainConfig, config_json
from aream_fast.engine.distributed import DistInfo, any_rank, barrier, broadcast_object, cleanup, init_distributed
from aream_fast.engine.interrupt import GracefulStop
from aream_fast.analysis.entropy import entropy_to_layer_weights, load_entropy
from aream_fast.engine.optim import build_optimizer, freeze_unused_parameters
from aream_fast.engine.precision import Precision, choose_precision, precision_from_name
from aream_fast.engine.run_log import RunLogger, write_manifest
from aream_fast.engine.sampling import ResumableBatchSampler, SeededSampleDataset
from aream_fast.engine.schedule import WarmupCosineSchedule
from aream_fast.engine.aream_task import AReAMStep
from aream_fast.models.records import LayerSplit

RUNS_ROOT = "runs"


@dataclass
class RunResult:
    run_dir: str
    status: str  # "finished" | "interrupted" | "max_steps"
    exit_code: int
    global_step: int
    epoch: int
    best_map: Optional[float]
    losses: List[float] = field(default_factory=list)  # total loss per step run in this process
    cam_results: Optional[Dict[str, Any]] = None
    wall_s: float = 0.0
    compile_stats: Optional[Dict[str, int]] = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    torch.manual_seed(seed)


def _default_run_dir(cfg: TrainConfig) -> str:
    name = cfg.run_name or f"{cfg.dataset}-{cfg.mode_name()}"
    return os.path.join(RUNS_ROOT, name, time.strftime("%Y%m%d-%H%M%S"))


def _resolve_resume(cfg: TrainConfig) -> Optional[str]:
    if cfg.resume is None:
        return None
    if cfg.resume != "auto":
        return cfg.resume
    name = cfg.run_name or f"{cfg.dataset}-{cfg.mode_name()}"
    return ckpt_io.find_resume_checkpoint(cfg.run_dir, RUNS_ROOT, name)


def _dynamo_graph_count() -> int:
    """Number of graphs dynamo has compiled in this process (for the no-recompile check)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class Trainer:
    """Owns the state of one run. Use :func:`run` unless you need the pieces (tests do)."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg.validate()
        self.log = None
        self.dist: DistInfo = init_distributed(cfg.device)
        try:
            self._setup(cfg)
        except BaseException:
            self.close()
            raise

    def _setup(self, cfg: TrainConfig) -> None:
        self.device = self.dist.device
        self.t0 = time.time()

        seed_everything(cfg.seed)  # same model init on every rank
        # data first (bad roots / corrupt images fail before a run dir is made); rank 0 writes the synthetic
        # cache once
        if self.dist.is_main:
            self.data_root = resolve_data_root(cfg, create=True, progress=True)
        barrier(self.dist)
        if not self.dist.is_main:
            self.data_root = resolve_data_root(cfg, create=False)
        self.train_set = build_split(cfg, self.data_root, cfg.train_split, train=True,
                                     progress=self.dist.is_main)
        self.val_set = build_split(cfg, self.data_root, cfg.val_split, train=False)
        self.num_classes = int(self.train_set.num_classes)
        self.class_names = list(self.train_set.class_names)

        # run dir (rank 0 decides, everyone agrees) and resume checkpoint
        resume_path = _resolve_resume(cfg)
        if cfg.resume == "auto" and resume_path is None and self.dist.is_main:
            print("--resume auto: no checkpoint found, starting from scratch", flush=True)
        run_dir = cfg.run_dir
        if run_dir is None:
            run_dir = os.path.dirname(resume_path) if resume_path else _default_run_dir(cfg)
        self.run_dir = broadcast_object(run_dir, self.dist)
        self.log = RunLogger(self.run_dir, enabled=self.dist.is_main)
        self.log.info(f"run dir {self.run_dir} | world size {self.dist.world_size} | device {self.device}")
        self._choose_cpu_threads()
        bad = getattr(self.train_set, "bad_images", []) + getattr(self.val_set, "bad_images", [])
        if bad:
            self.log.info(f"WARNING: skipped {len(bad)} unreadable image(s) (--skip-bad-images): {bad[:10]}")
        self.sampler = ResumableBatchSampler(len(self.train_set), cfg.batch_size, seed=cfg.seed,
                                             rank=self.dist.rank, world_size=self.dist.world_size)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = self.steps_per_epoch * cfg.epochs
        self.loader = DataLoader(SeededSampleDataset(self.train_set, cfg.seed), batch_sampler=self.sampler,
                                 num_workers=cfg.num_workers, pin_memory=self.device.type == "cuda",
                                 persistent_workers=False,
                                 # a private generator: creating an iterator (every epoch, and on resume
                                 # mid-epoch) must not draw from the global torch RNG
                                 generator=torch.Generator().manual_seed(cfg.seed))

        # model
        self.model = build_model_from_config(cfg, self.num_classes, pretrained=cfg.pretrained).to(self.device)
        self.layout = self._layout()
        frozen = freeze_unused_parameters(self.model, cfg.image_size, self.device)
        if frozen:
            self.log.info(f"parameters no loss reaches (frozen; e.g. MCTformer's unused final norm): {frozen}")
        self.optimizer = build_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup_steps = min(self.total_steps, int(round(cfg.warmup_epochs * self.steps_per_epoch)))
        self.schedule = WarmupCosineSchedule(self.optimizer, base_lr=cfg.lr, total_steps=self.total_steps,
                                             warmup_steps=warmup_steps, warmup_lr=cfg.warmup_lr, min_lr=cfg.min_lr)
        from aream_fast.engine.precision import measure_model_step

        self.precision: Precision = choose_precision(
            self.device, cfg.amp, width=self.model.embed_dim, cpu_mode=cfg.cpu_amp,
            probe=lambda: measure_model_step(self.model, cfg.image_size, batch=min(8, cfg.batch_size)))
        self.precision = broadcast_object(self.precision, self.dist)  # rank 0's measurement decides for all
        if resume_path is not None:  # keep the interrupted run's precision, so the resumed losses match
            resume_ckpt = ckpt_io.load_checkpoint(resume_path, map_location=self.device)
            stored = resume_ckpt.get("precision")
            if stored is not None and stored != self.precision.name:
                self.precision = precision_from_name(stored, self.device,
                                                     f"{stored} restored from the checkpoint being resumed")
        self.log.info(f"precision: {self.precision.name} -- {self.precision.reason}")
        self.scaler = self.precision.make_scaler(self.device)
        self.par = None
        if cfg.aream:
            from aream_fast.pseudo_labels.par import PAR

            self.par = PAR().to(self.device)

        # position
        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        self.best_map: Optional[float] = None
        if resume_path is not None:
            self._resume(resume_path, resume_ckpt)
            del resume_ckpt
        # training RNG stream differs per rank (DropPath), after the shared init
        if resume_path is None:
            seed_everything(cfg.seed + 1000 * self.dist.rank + 1)

        self._wrap_and_compile()
        self.graphs_after_warmup: Optional[int] = None
        if self.dist.is_main:
            write_manifest(self.run_dir, cfg.to_dict(), device=self.device, world_size=self.dist.world_size,
                           precision=self.precision.name, precision_reason=self.precision.reason,
                           extra={"data_root": os.path.abspath(self.data_root), "num_classes": self.num_classes,
                                  "class_names": self.class_names, "train_size": len(self.train_set),
                                  "val_size": len(self.val_set), "steps_per_epoch": self.steps_per_epoch,
                                  "total_steps": self.total_steps, "layer_index": self.layout.layer_index,
                                  "resumed_from": resume_path,
                                  "num_parameters": sum(p.numel() for p in self.model.parameters())})
            self.log.info(f"model {cfg.model} ({sum(p.numel() for p in self.model.parameters()) / 1e6:.2f} M params"
                          f", depth {self.model.depth}), {len(self.train_set)} train / {len(self.val_set)} val "
                          f"images, {self.steps_per_epoch} steps/epoch x {cfg.epochs} epochs "
                          f"(AReAM from epoch {cfg.cls_epochs if cfg.aream else 'never'}); config in manifest.json")

    # ------------------------------------------------------------------------------------------------ set-up
    def _choose_cpu_threads(self) -> None:
        """On a CPU that other processes already keep busy (1-min load average >= cores), torch's default of
        one OpenMP thread per core oversubscribes it: on the shared 2-core dev machine the 2-thread run had
        steps up to 20x slower than quiet while 1-thread runs slowed far less (demo: 14 min vs 7-8 min wall).
        So without an explicit OMP_NUM_THREADS, a busy machine gets 1 thread (logged)."""
        if self.device.type != "cpu" or os.environ.get("OMP_NUM_THREADS") or not hasattr(os, "getloadavg"):
            self.log.info(f"torch CPU threads: {torch.get_num_threads()}")
            return
        cores = os.cpu_count() or 1
        load = os.getloadavg()[0]
        self._threads_before = torch.get_num_threads()  # restored by close() (in-process callers, tests)
        if self.dist.world_size > 1 or (cores > 1 and load >= cores):
            torch.set_num_threads(1)
            why = (f"{self.dist.world_size} processes" if self.dist.world_size > 1
                   else f"load average {load:.1f} >= {cores} cores")
            self.log.info(f"torch CPU threads: 1 ({why}; set OMP_NUM_THREADS to override)")
        else:
            self.log.info(f"torch CPU threads: {torch.get_num_threads()} (load average {load:.1f}, {cores} cores)")

    def _layout(self) -> LayerSplit:
        cfg = self.cfg
        depth = int(self.model.depth)
        layer_index = LayerSplit.from_depth(depth, cfg.layer_index).layer_index
        loss_w = refine_w = None
        if cfg.layer_weights is not None:
            entropy = load_entropy(cfg.layer_weights)
            if entropy.shape != (depth,):
                raise ValueError(f"--layer-weights {cfg.layer_weights!r}: one entropy per model block ({depth}) "
                                 f"expected, got {entropy.size}")
            loss_w, refine_w = entropy_to_layer_weights(entropy, layer_index)
        layout = LayerSplit.from_depth(depth, layer_index, loss_weights=loss_w, refine_weights=refine_w)
        loss_w, refine_w = layout.loss_weights, layout.refine_weights
        self.log.info(f"layers: refine {list(layout.refine_layers)}, supervised {list(layout.supervised_layers)}"
                      f", weights {'entropy' if loss_w else 'uniform'}"
                      + (f" (loss {[round(w, 3) for w in loss_w]}, refine {[round(w, 3) for w in refine_w]})"
                         if loss_w else ""))
        return layout

    def _wrap_and_compile(self) -> None:
        cfg = self.cfg
        from aream_fast.losses.aream import aream_loss

        train_model: Any = self.model
        if self.dist.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            train_model = DDP(self.model, device_ids=ids)
        self.train_model = train_model
        pseudo_model: Any = self.model
        loss_fn: Any = aream_loss
        if cfg.compile:
            # one graph per phase: fixed shapes (drop_last) and a fixed AttentionRequest for the whole run
            backend = cfg.compile_backend
            train_model = torch.compile(train_model, backend=backend)
            loss_fn = torch.compile(aream_loss, backend=backend)
            if cfg.aream and not cfg.pseudo_from_forward and cfg.compile_pseudo:
                # the pseudo-label forward (2B images, no grad, other request) as its own compiled graph
                pseudo_model = torch.compile(self.model, backend=backend)
            self.log.info(f"torch.compile ({backend}): training model, AReAM loss"
                          + (" and pseudo-label forward (separate graph)" if pseudo_model is not self.model
                             else ""))
        defer = cfg.loss_grad == "layer" and not cfg.compile
        if cfg.aream:
            self.log.info("AReAM loss gradients: " + (
                "made in each supervised layer's backward (--loss-grad layer)" if defer else
                "made with the loss value in the forward" + (" (--compile: the deferred identity nodes "
                                                               "cannot be traced)" if cfg.compile else "")))
        self.step_fn = AReAMStep(model=self.model, train_model=train_model, pseudo_model=pseudo_model,
                                 layout=self.layout, aream=cfg.aream, pseudo_from_forward=cfg.pseudo_from_forward,
                                 aream_weight=cfg.aream_weight, loss_fn=loss_fn, par=self.par,
                                 pseudo_scales=cfg.pseudo_scales, bg_low=cfg.bg_low, bg_high=cfg.bg_high,
                                 loss_backend=cfg.loss_backend, defer_loss_grad=defer,
                                 autocast=lambda: self.precision.autocast(self.device))

    # ------------------------------------------------------------------------------------------- checkpoints
    def _state(self) -> Dict[str, Any]:
        return {
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
            "num_classes": self.num_classes,
            "class_names": self.class_names,
            "layer_index": self.layout.layer_index,
            "world_size": self.dist.world_size,
            "precision": self.precision.name,
        }

    def save(self, name: str = ckpt_io.CHECKPOINT_NAME, state: Optional[Dict[str, Any]] = None) -> None:
        """Rank 0 writes ``run_dir/name`` atomically. (Every rank's RNG differs; rank 0's is stored.)"""
        if self.dist.is_main:
            ckpt_io.atomic_save(state if state is not None else self._state(), os.path.join(self.run_dir, name))
        barrier(self.dist)

    def _resume(self, path: str, ckpt: Dict[str, Any]) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.schedule.load_state_dict(ckpt["scheduler"])
        if self.scaler is not None and ckpt.get("scaler") is not None:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.epoch = int(ckpt["epoch"])
        self.batch_in_epoch = int(ckpt["batch_in_epoch"])
        self.global_step = int(ckpt["global_step"])
        self.best_map = ckpt.get("best_map")
        if ckpt.get("world_size", 1) == self.dist.world_size:
            ckpt_io.restore_rng_state(ckpt["rng"])
            if self.dist.rank != 0:  # rank 0's stream was stored; others derive theirs deterministically
                seed_everything(self.cfg.seed + 1000 * self.dist.rank + 1 + self.global_step)
        else:
            self.log.info(f"resuming with world size {self.dist.world_size} (checkpoint: "
                          f"{ckpt.get('world_size')}): RNG streams re-seeded, data order differs")
            seed_everything(self.cfg.seed + 1000 * self.dist.rank + 1 + self.global_step)
        self.log.info(f"resumed from {path}: epoch {self.epoch}, batch {self.batch_in_epoch}, "
                      f"global step {self.global_step}, best mAP {self.best_map}")

    # ----------------------------------------------------------------------------------------------- training
    def _train_one_step(self, batch: Dict[str, Any]) -> Dict[str, float]:
        cfg = self.cfg
        images = batch["image"].to(self.device, non_blocking=True)
        labels = batch["label"].to(self.device, non_blocking=True)
        aream_active = cfg.aream and self.epoch >= cfg.cls_epochs
        self.model.train()
        loss, terms = self.step_fn(images, labels, aream_active)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss {loss.item()} at global step {self.global_step} "
                                     f"(terms {({k: float(v) for k, v in terms.items()})})")
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if cfg.grad_clip:
                self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
        lr = self.optimizer.param_groups[0]["lr"]
        self.schedule.step()
        out = {"loss": float(loss.detach()), "lr": lr, "aream_active": int(aream_active)}
        out.update({k: float(v) for k, v in terms.items()})
        return out

    @torch.no_grad()
    def validate(self) -> Optional[Dict[str, float]]:
        """Val mAP (per-image AP of sigmoid(class_logits), averaged; spec §7 selection) on rank 0 only."""
        if not self.dist.is_main:
            return None
        from aream_fast.evaluation.classification import classification_map

        return classification_map(self.model, self.val_set, batch_size=self.cfg.batch_size, device=self.device,
                                  autocast=lambda: self.precision.autocast(self.device))

    def train(self) -> RunResult:
        cfg = self.cfg
        losses: List[float] = []
        status = "finished"
        stop = GracefulStop()
        from tqdm import tqdm

        with stop:
            while self.epoch < cfg.epochs:
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
                    if self.global_step % cfg.log_every == 0:
                        self.log.log_metrics(record, step=self.global_step)
                    bar.set_postfix(loss=f"{record['loss']:.4f}",
                                    **({"aff": f"{record['loss_aream']:.4f}"} if "loss_aream" in record else {}))
                    bar.update(1)
                    last_in_epoch = self.batch_in_epoch == self.steps_per_epoch
                    if cfg.save_every_steps and self.global_step % cfg.save_every_steps == 0 and not last_in_epoch:
                        self.save()
                    if cfg.max_steps is not None and self.global_step >= cfg.max_steps:
                        status = "max_steps"
                    if any_rank(stop.requested, self.dist):
                        status = "interrupted"
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
        cfg = self.cfg
        epoch = self.epoch
        metrics = None
        if (epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs:
            metrics = self.validate()
        improved = False
        if self.dist.is_main and metrics is not None:
            improved = self.best_map is None or metrics["mAP"] > self.best_map
            if improved:
                self.best_map = metrics["mAP"]
            self.log.log_metrics({"epoch": epoch, "step": self.global_step, "val_mAP": metrics["mAP"],
                                  "best_val_mAP": self.best_map, "epoch_s": epoch_s}, step=self.global_step)
            self.log.info(f"epoch {epoch}: val mAP {metrics['mAP']:.4f} (best {self.best_map:.4f}), "
                          f"{epoch_s:.1f} s")
        improved = broadcast_object(improved, self.dist)
        self.best_map = broadcast_object(self.best_map, self.dist)
        self.epoch += 1
        self.batch_in_epoch = 0
        state = self._state() if self.dist.is_main else None
        self.save(state=state)
        if improved:
            self.save(ckpt_io.BEST_NAME, state=state)

    # ----------------------------------------------------------------------------------------- compile check
    def _compile_stats(self) -> Optional[Dict[str, int]]:
        if not self.cfg.compile:
            return None
        return {"unique_graphs": _dynamo_graph_count(), "graphs_after_warmup": self.graphs_after_warmup}

    def _check_recompiles(self, record: Dict[str, Any]) -> None:
        """After the first steps of the AReAM phase every graph exists; later steps must not add any."""
        if not self.cfg.compile:
            return
        graphs = _dynamo_graph_count()
        if self.cfg.debug_recompiles:
            record["dynamo_graphs"] = graphs
        warm_epoch = self.cfg.cls_epochs if self.cfg.aream else 0
        if self.epoch >= warm_epoch and self.graphs_after_warmup is None and self.batch_in_epoch >= 2:
            self.graphs_after_warmup = graphs
        elif self.graphs_after_warmup is not None and graphs > self.graphs_after_warmup:
            self.log.info(f"WARNING: torch.compile recompiled at global step {self.global_step} "
                          f"({self.graphs_after_warmup} -> {graphs} graphs); run with TORCH_LOGS=recompiles")
            self.graphs_after_warmup = graphs

    # --------------------------------------------------------------------------------------------------- CAMs
    def write_and_score_cams(self) -> Optional[Dict[str, Any]]:
        """Rank 0: CAMs of ``--cam-split`` from the best checkpoint's weights (else the last), then mIoU."""
        if not self.dist.is_main or not self.cfg.make_cams:
            return None
        from aream_fast.evaluation.cams import score_cams, write_cams

        best = os.path.join(self.run_dir, ckpt_io.BEST_NAME)
        model = self.model
        source = "last"
        if os.path.isfile(best):
            model = build_model_from_config(self.cfg, self.num_classes).to(self.device)
            model.load_state_dict(ckpt_io.load_checkpoint(best, map_location=self.device)["model"])
            source = "best val mAP"
        cam_set = build_cam_eval_split(self.cfg, self.data_root, self.cfg.cam_split)
        cam_dir = os.path.join(self.run_dir, f"cams_{self.cfg.cam_split}")
        t0 = time.time()
        written = write_cams(model, cam_set, cam_dir, scales=self.cfg.cam_scales, flip=self.cfg.cam_flip,
                             device=self.device, overlays=self.cfg.cam_overlays)
        cam_s = time.time() - t0
        self.log.info(f"wrote {written} CAM files ({source} weights) to {cam_dir} in {cam_s:.1f} s")
        results = score_cams(cam_dir, cam_set, log=self.log.info)
        results.update(cam_dir=cam_dir, weights=source, cam_seconds=cam_s, gt_dir=str(cam_set.files.mask_dir))
        self.log.log_metrics({"cam_mIoU": results["mIoU"], "cam_best_threshold": results["threshold"]},
                             step=self.global_step)
        return results

    def close(self) -> None:
        if getattr(self, "_threads_before", None):
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        if self.log is not None:
            self.log.close()
            self.log = None
        cleanup(self.dist)


def run(cfg: TrainConfig) -> RunResult:
    """Train (or resume) a run, then write CAMs and their mIoU when training finished."""
    trainer = Trainer(cfg)
    try:
        result = trainer.train()
        if result.status == "finished":
            result.cam_results = trainer.write_and_score_cams()
        result.wall_s = time.time() - trainer.t0
        if trainer.dist.is_main:
            import json

            summary = {"status": result.status, "global_step": result.global_step, "epoch": result.epoch,
                       "best_val_mAP": result.best_map, "wall_s": result.wall_s,
                       "compile_stats": result.compile_stats,
                       "cam_mIoU": None if result.cam_results is None else result.cam_results["mIoU"],
                       "cam_threshold": None if result.cam_results is None else result.cam_results["threshold"]}
            with open(os.path.join(trainer.run_dir, "summary.json"), "w") as fh:
                json.dump(summary, fh, indent=2)
            trainer.log.info(f"done ({result.status}) in {result.wall_s:.1f} s: " + json.dumps(summary))
        return result
    finally:
        trainer.close()
