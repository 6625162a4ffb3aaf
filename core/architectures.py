"""Which architectures svdforge compresses, and why it refuses the others (the one list).

Each supported row has a test on a tiny random config (tests/core/test_architectures.py):
compress, reload with svdforge and with plain transformers, same logits. The remote code in
every artifact (`svdforge.core.hf`) has a class for each supported row. Kept free of torch,
so the API can refuse a model before accepting its job.
"""
from __future__ import annotations

from dataclasses import dataclass

from svdforge.core.errors import UserError


@dataclass(frozen=True)
class Architecture:
    model_type: str          # config.json's model_type
    name: str                # for people
    classes: str             # stem of transformers' classes: Llama -> LlamaConfig, LlamaModel, ...
    base_model_prefix: str   # where the ...ForCausalLM keeps its base model
    notes: str = ""

    def remote_class(self, suffix: str) -> str:
        """Name of the remote-code class: Config, Model or ForCausalLM."""
        return f"Svdforge{self.classes}{suffix}"


SUPPORTED = {a.model_type: a for a in (
    Architecture("llama", "Llama (Llama 2/3, SmolLM2)", "Llama", "model"),
    Architecture("mistral", "Mistral", "Mistral", "model"),
    Architecture("qwen2", "Qwen2", "Qwen2", "model", "q/k/v biases (kept on u)"),
    Architecture("phi3", "Phi-3", "Phi3", "model", "fused qkv_proj and gate_up_proj, compressed whole"),
    Architecture("gemma2", "Gemma-2", "Gemma2", "model", "logit soft-capping, tied embeddings"),
    Architecture("gpt_neox", "GPT-NeoX (Pythia)", "GPTNeoX", "gpt_neox", "fused query_key_value"),
)}

_FUSED_EXPERTS = ("keeps its experts as fused 3-D tensors, not nn.Linear: svdforge would leave them dense "
                  "and the model would not shrink by the ratio asked for; MoE experts are not supported yet")
REFUSED = {
    "gpt2": "GPT-2 stores its linears as transformers Conv1D modules (weight transposed, not nn.Linear), "
            "which svdforge does not compress",
    "mixtral": f"Mixtral {_FUSED_EXPERTS}",
    "qwen2_moe": f"Qwen2-MoE {_FUSED_EXPERTS}",
}


def supported_list() -> str:
    return ", ".join(SUPPORTED)


def refusal(model_type: str | None) -> str | None:
    """Why svdforge refuses to compress a model of this type (None: it is supported)."""
    if model_type in SUPPORTED:
        return None
    if model_type and model_type.startswith("svdforge_"):
        return "this model is already an svdforge artifact; compress its dense original instead"
    why = REFUSED.get(model_type or "", f"architecture {model_type!r} is not supported")
    return f"{why}. Supported model_type values: {supported_list()}"


def require(model_type: str | None) -> Architecture:
    """The row of a supported architecture, or UserError saying why not."""
    why = refusal(model_type)
    if why is not None:
        raise UserError(why)
    return SUPPORTED[model_type]


def max_positions(model_config: dict) -> int | None:
    """The longest sequence a model's config takes: `max_position_embeddings` (GPT-2:
    `n_positions`; a multimodal config: its `text_config`'s), or None when it says none."""
    for key in ("max_position_embeddings", "n_positions"):
        value = model_config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    text = model_config.get("text_config")
    return max_positions(text) if isinstance(text, dict) else None


def too_long(seq_len: int, model_config: dict) -> str | None:
    """Why a window of `seq_len` tokens does not fit the model, or None when it does."""
    limit = max_positions(model_config)
    if limit is None or seq_len <= limit:
        return None
    return f"{seq_len} is longer than the model's {limit} positions (max_position_embeddings in its config)"


def require_positions(lengths: dict[str, int], model_config: dict) -> None:
    """Refuse the first window length (by field name) the model cannot take."""
    for field, seq_len in lengths.items():
        why = too_long(seq_len, model_config)
        if why is not None:
            raise UserError(f"{field}: {why}")
