"""A pipelined prefill stage is a stream: the prompts that fit go through one pipeline pass of many
micro-batches (one fill and drain), its progress advances per micro-batch during that pass, and the tokens
equal Hugging Face greedy generate. The pass has as many micro-batches as its tokens fill (about one per
`PREFILL_MIN_MICRO_TOKENS`, at most `PREFILL_WINDOW`)."""
import torch

from seesaw_ds import SamplingParams
from tests.conftest import hf_greedy, tiny_hf_model
from tests.distributed.harness import run_ranks

LENGTHS = [70, 12, 33, 90, 5, 61, 18, 44, 27, 80, 9, 52, 38, 15, 66, 24, 71, 3]
MAX_TOKENS = 3


class ProgressLog:
    """Stands in for EngineStats in the pipeline's progress hook; records every value it is set to."""

    def __init__(self):
        self.values, self._done = [], 0

    @property
    def prefill_tokens_done(self) -> int:
        return self._done

    @prefill_tokens_done.setter
    def prefill_tokens_done(self, value: int) -> None:
        self._done = value
        self.values.append(value)


def _stream(rank, folder, parallel, prompts, min_micro_tokens):
    from seesaw_ds.distributed.builder import build_engine
    from seesaw_ds.engine.config import EngineConfig
    from seesaw_ds.parallel import micro_batches
    if min_micro_tokens is not None:
        micro_batches.PREFILL_MIN_MICRO_TOKENS = min_micro_tokens     # the tiny model's prompts, cut finer
    engine = build_engine(EngineConfig(model=folder, dtype="float32", parallel=parallel, block_size=8,
                                       max_num_batched_tokens=128, max_model_len=160,
                                       kv_device_gb=0.02, kv_host_gb=0.02))
    progress = ProgressLog()
    engine.runtimes["prefill"].executor.report_progress(progress)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True))
    out, first_step = {}, None
    while engine.has_unfinished():
        for o in engine.step():
            out[o.request_id] = o.token_ids
        if first_step is None:
            first_step = (engine.stats.stage, engine.stats.prefill_steps, engine.stats.prefill_tokens)
    engine.close()
    return {"tokens": [out[str(i)] for i in range(len(prompts))], "first_step": first_step,
            "progress": progress.values}


def test_pipelined_prefill_is_one_pass_with_progress_and_hf_tokens(tmp_path):
    model = tiny_hf_model("llama")
    model.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 320, (n,), generator=g).tolist() for n in LENGTHS]
    for parallel in ({"pp": 2}, {"prefill": {"pp": 2}, "decode": {"tp": 2}}):
        out = run_ranks(2, _stream, str(tmp_path / "model"), parallel, prompts, 16, out_dir=str(tmp_path))
        total = sum(LENGTHS)
        # every prompt in the first step although the step budget (128 tokens) holds only a few of them
        assert out["first_step"][:2] == ["prefill", 1]
        # rank 0 (the first stage) reports each micro-batch as it leaves: 16 increments, up to the total
        steps = out["progress"]
        assert len(steps) == 16 and steps == sorted(steps) and steps[-1] == total
        for prompt, tokens in zip(prompts, out["tokens"]):
            assert tokens == hf_greedy(model, prompt, MAX_TOKENS)


def test_a_small_prefill_step_is_cut_into_fewer_micro_batches(tmp_path):
    # 768 prompt tokens at the default size (about one micro-batch per 1024 tokens): one micro-batch, not 16
    # of 48 tokens each, whose fixed costs would outweigh the bubble they save
    from seesaw_ds.parallel.micro_batches import prefill_micro_batch_count
    model = tiny_hf_model("llama")
    model.save_pretrained(tmp_path / "model")
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(2, 320, (n,), generator=g).tolist() for n in LENGTHS]
    out = run_ranks(2, _stream, str(tmp_path / "model"), {"pp": 2}, prompts, None, out_dir=str(tmp_path))
    assert out["progress"] == [sum(LENGTHS)] and prefill_micro_batch_count(sum(LENGTHS)) == 1
    for prompt, tokens in zip(prompts, out["tokens"]):
        assert tokens == hf_greedy(model, prompt, MAX_TOKENS)
