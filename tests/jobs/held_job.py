"""A job run as its own process by the two-jobs-one-folder test: `python -m tests.jobs.held_job IN OUT HOLD_FILE`.

The kill -9 test's job, whose engine waits before each step while HOLD_FILE exists, so the test decides how
long the job keeps its output folder."""
import os
import sys
import time

from seesaw_ds import SamplingParams
from seesaw_ds.jobs.job import run_recipe
from tests.jobs.fake_engine import ReversingEngine
from tests.jobs.kill9_job import FakeLLM, kill9_recipe


class HeldEngine(ReversingEngine):
    def __init__(self, tokenizer, hold_file: str):
        super().__init__(tokenizer, max_num_seqs=8)
        self.hold_file, self.steps = hold_file, 0

    def step(self):
        self.steps += 1
        while self.steps > 8 and os.path.exists(self.hold_file):   # a few steps first: a shard lands
            time.sleep(0.02)
        return super().step()


def main(input_path: str, out_dir: str, hold_file: str) -> None:
    llm = FakeLLM(0.0)
    llm.engine = HeldEngine(llm.tokenizer, hold_file)
    run_recipe(kill9_recipe(input_path, out_dir), llm, params_factory=SamplingParams, is_main=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
