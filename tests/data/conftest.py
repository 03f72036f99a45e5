import pytest


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """The embedded model's tokenizer, from the converted model folder (converted once, then cached)."""
    from transformers import AutoTokenizer

    from seesaw_ds.models.loader import resolve_model_folder
    return AutoTokenizer.from_pretrained(resolve_model_folder("embedded:smollm2"))


@pytest.fixture(scope="session")
def sharegpt_rows():
    from seesaw_ds.data import sharegpt_dataset
    return sharegpt_dataset()
