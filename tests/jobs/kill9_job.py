"""A job run as its own process by test_kill9.py: `python -m tests.jobs.kill9_job IN.jsonl OUT_DIR STEP_SECONDS`."""
import sys

from seesaw_ds import SamplingParams
from seesaw_ds.jobs.job import run_recipe
from seesaw_ds.jobs.recipe import parse_recipe
from tests.jobs.fake_engine import ReversingEngine
from tests.jobs.tiny_tokenizer import char_tokenizer


def kill9_recipe(input_path: str, out_dir: str):
    return parse_recipe({
        "data": {"source": input_path, "columns": {"prompt": "text", "id": "key", "max_tokens": "n",
                                                   "carry": ["blob"]}},
        "sampling": {"temperature": 0.8, "seed": 11},
        "engine": {"request_window": 16},
        "output": {"dir": out_dir, "shard_rows": 10},
    })


class FakeLLM:
    def __init__(self, step_seconds: float):
        self.tokenizer = char_tokenizer()
        self.engine = ReversingEngine(self.tokenizer, max_num_seqs=8, step_seconds=step_seconds)


def main(input_path: str, out_dir: str, step_seconds: str) -> None:
    run_recipe(kill9_recipe(input_path, out_dir), FakeLLM(float(step_seconds)), params_factory=SamplingParams,
               is_main=False)


if __name__ == "__main__":
    main(*sys.argv[1:])
