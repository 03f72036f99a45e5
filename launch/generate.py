"""Offline generation from a YAML recipe: one process, or every rank of a DeepSpeed launch.

    python launch/generate.py --config recipes/arxiv.yaml data.limit=64 sampling.temperature=0.7
    deepspeed launch/generate.py --config recipes/arxiv.yaml                  # 1 rank
    deepspeed --num_gpus 2 launch/generate.py --config recipes/arxiv.yaml     # 2 ranks: PP2 prefill -> TP2 decode
    python launch/generate.py --help                                          # every recipe key
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":  # NOTE: planner calibration spawns processes that re-import this file
    from seesaw_ds.jobs.generate import main
    sys.exit(main())
