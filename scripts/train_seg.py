#!/usr/bin/env python
"""Train the segmentation network of stage two on pseudo masks (the same engine as train.py).

    python scripts/train_seg.py --masks runs/<stage-one run>/masks_train --amp --compile
    python scripts/train_seg.py --gt-upper-bound ...            # the fully supervised upper bound
    python scripts/train_seg.py --resume auto                   # continue the latest run of the same name
    torchrun --nproc_per_node 2 scripts/train_seg.py ...        # DDP (gloo on CPU, nccl on CUDA)

Checkpoints hold the model's build arguments (``seg_model``): ``scripts/infer_seg.py --checkpoint`` reads them.
See ``--help`` for every option.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from aream_fast.engine.config import build_parser, config_from_args  # noqa: E402
from aream_fast.engine.trainer import run  # noqa: E402
from aream_fast.stage2.seg_task import SEG_PRESETS, SegTask, SegTrainConfig  # noqa: E402

DESCRIPTION = ("Train a segmentation network (ViT + ASPP/LargeFOV, or DeepLab on ResNet-101) with cross-entropy "
               "(ignore 255) on pseudo masks, with random scale/crop/flip, AdamW and a poly schedule; val mIoU "
               "selects the best checkpoint. --gt-upper-bound trains on the ground truth instead.")


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser(SegTrainConfig, prog="train_seg.py", description=DESCRIPTION, presets=SEG_PRESETS)
    cfg = config_from_args(argv, SegTrainConfig, parser=parser, presets=SEG_PRESETS)
    result = run(cfg, SegTask(cfg))
    return result.exit_code


if __name__ == "__main__":
    from aream_fast.engine.errors import main_guard

    sys.exit(main_guard(main))
