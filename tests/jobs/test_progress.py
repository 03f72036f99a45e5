"""The job's progress bar moves during one long prefill step (a pipelined prefill stage is one pass)."""
import re
import time

import pytest

from seesaw_ds.jobs.inputs import open_inputs
from seesaw_ds.jobs.outputs import ShardWriter, job_fingerprint, output_schema, prepare_output_dir
from seesaw_ds.jobs.runner import run_job
from tests.jobs.fake_engine import ReversingEngine
from tests.jobs.test_runner import ROWS, job_recipe

SamplingParams = pytest.importorskip("seesaw_ds").SamplingParams


class SlowPrefillEngine(ReversingEngine):
    """Its first step is a long prefill that reports its progress per micro-batch, as a pipeline pass does."""

    def __init__(self, tokenizer, micro_batches=6, seconds_each=0.3):
        super().__init__(tokenizer, max_num_seqs=len(ROWS))
        self.micro_batches, self.seconds_each, self.prefilled = micro_batches, seconds_each, False

    def step(self):
        if not self.prefilled:
            self.prefilled = True
            self.stats.stage = "prefill"
            for _ in range(self.micro_batches):
                time.sleep(self.seconds_each)
                self.stats.prefill_tokens_done += 100
            self.stats.stage = "decode"
        return super().step()


def test_the_bar_shows_prefill_progress_during_one_long_step(tmp_path, tokenizer, capsys):
    recipe = job_recipe(tmp_path, engine={"request_window": len(ROWS)})
    directory = prepare_output_dir(recipe.output, job_fingerprint(recipe, recipe.data.source), recipe)
    source = open_inputs(recipe, tokenizer)
    writer = ShardWriter(directory, 0, output_schema(True, source.carry_types()))
    summary = run_job(recipe, source, SlowPrefillEngine(tokenizer), writer, params_factory=SamplingParams,
                      model_label="m", layouts_label="pp2", show_progress=True, print_fn=None)
    assert summary.rows_written == len(ROWS)
    shown = [int(v) for v in re.findall(r"prefilled=(\d+) tok", capsys.readouterr().err)]
    during = sorted({v for v in shown if 0 < v < 600})        # values seen while the first step still ran
    assert len(during) >= 2, shown
    assert shown[-1] == 600
