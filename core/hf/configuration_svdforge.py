"""Configuration of a model compressed by svdforge: the base architecture's own config class
under another `model_type`, so that transformers refuses to load the folder as the dense
model it is not (unless the user opts in to remote code, the load fails instead of filling the
missing linears with random weights).

config.json keeps every field of the base model and adds `svdforge`: the artifact format
version, the base `model_type` and architecture, and `ranks`, the rank of each compressed
linear (by its name in the `...ForCausalLM`). This file is the same in every artifact.
"""
from transformers import Gemma2Config, GPTNeoXConfig, LlamaConfig, MistralConfig, Phi3Config, Qwen2Config

BASE_CONFIGS = (LlamaConfig, MistralConfig, Qwen2Config, Phi3Config, Gemma2Config, GPTNeoXConfig)


def _renamed(base):
    return type(f"Svdforge{base.__name__}", (base,), {"model_type": f"svdforge_{base.model_type}",
                                                      "__module__": __name__})


SvdforgeLlamaConfig, SvdforgeMistralConfig, SvdforgeQwen2Config, SvdforgePhi3Config, SvdforgeGemma2Config, \
    SvdforgeGPTNeoXConfig = (_renamed(base) for base in BASE_CONFIGS)
