#!/usr/bin/env python
"""Train an AReAM classifier, then write CAMs for a split and print their mIoU.

    python scripts/train.py --amp --compile                 # demo: synthetic data, < 10 min on a 2-core CPU
    python scripts/train.py --amp --compile --no-aream      # baseline, same seed and budget
    python scripts/train.py --resume auto                   # continue the latest run of the same name
    torchrun --nproc_per_node 2 scripts/train.py ...        # DDP (gloo on CPU, nccl on CUDA)
    python scripts/train.py --preset official --data-root VOCdevkit/VOC2012 --pretrained deit_small.pth

All logic lives in aream_fast.engine; see ``--help`` for every option.
"""
from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from aream_fast.engine.config import config_from_args  # noqa: E402
from aream_fast.engine.trainer import run  # noqa: E402


def main(argv: Optional[Sequence[str]] = None) -> int:
    cfg = config_from_args(argv)
    result = run(cfg)
    return result.exit_code


if __name__ == "__main__":
    from aream_fast.engine.errors import main_guard

    sys.exit(main_guard(main))
