"""Rollout generation for post-training (GRPO and kin) from a live DeepSpeed training engine."""
from seesaw_ds.rollout.engine import RolloutEngine, RolloutOutput, Sample, sample_seed
from seesaw_ds.rollout.sync import SyncReport, WeightSync

__all__ = ["RolloutEngine", "RolloutOutput", "Sample", "SyncReport", "WeightSync", "sample_seed"]
