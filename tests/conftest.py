import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_hf_model(kind: str = "llama", seed: int = 0, **overrides):
    """A small random-weight Llama-family model (fp32). `initializer_range` is raised so logits are peaked
    enough that greedy decoding does not sit on near-ties."""
    from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, \
        Qwen2Config, Qwen2ForCausalLM
    classes = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM),
               "mistral": (MistralConfig, MistralForCausalLM)}
    config_cls, model_cls = classes[kind]
    kw = dict(vocab_size=320, hidden_size=96, intermediate_size=192, num_hidden_layers=3,
              num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=2048,
              initializer_range=0.08, eos_token_id=1, bos_token_id=0, tie_word_embeddings=False)
    kw.update(overrides)
    torch.manual_seed(seed)
    return model_cls(config_cls(**kw)).eval()


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """The trusted reference: Hugging Face generate on one unpadded prompt, greedy, EOS ignored."""
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_test_process():
    torch.set_num_threads(min(2, torch.get_num_threads()))
    yield


@pytest.fixture(autouse=True, scope="session")
def _native_kernels_built_once():
    """Build the CPU attention kernels before any test forks ranks or launches jobs that need them."""
    from seesaw_ds.kv.native import paged_decode_op
    paged_decode_op()
    yield
