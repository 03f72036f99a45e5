"""Rollout generation for post-training (GRPO and kin) from a live DeepSpeed training engine."""
from seesaw_ds.rollout.engine import RolloutEngine, RolloutOutput, Sample, sample_seed
from seesaw_ds.rollout.pipeline_policy import PipelineNames, next_token_loss, pipeline_policy
from seesaw_ds.rollout.sync import SyncReport, WeightSync

__all__ = ["PipelineNames", "RolloutEngine", "RolloutOutput", "Sample", "SyncReport", "WeightSync",
           "next_token_loss", "pipeline_policy", "sample_seed"]
