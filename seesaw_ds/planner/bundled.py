"""Model configs by bundled name, HF config.json path, or model folder."""
from __future__ import annotations

import json
import os

from seesaw_ds.models.config import ModelConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model_configs")


def bundled_model_names() -> list[str]:
    return sorted(f[:-len(".json")] for f in os.listdir(CONFIG_DIR) if f.endswith(".json"))


def load_hf_config_dict(name_or_path: str) -> dict:
    """A bundled name ("llama-2-70b"), a config.json file, or a folder holding config.json."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, "config.json")
    elif os.path.isfile(name_or_path):
        path = name_or_path
    elif name_or_path.lower() in bundled_model_names():
        path = os.path.join(CONFIG_DIR, name_or_path.lower() + ".json")
    else:
        raise FileNotFoundError(f"model {name_or_path!r} is neither a config.json, a folder holding one, "
                                f"nor a bundled name ({', '.join(bundled_model_names())})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no config.json in folder {name_or_path!r}")
    with open(path) as f:
        return json.load(f)


def load_model_config(name_or_path: str) -> ModelConfig:
    return ModelConfig.from_hf(load_hf_config_dict(name_or_path))
