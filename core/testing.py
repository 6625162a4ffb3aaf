"""Tiny random models for tests and demos (in the spirit of peft's in-file test models).

`make_tiny_model(dir, arch)` writes a few-MB Hugging Face folder (config, safetensors,
tokenizer) that every loader path accepts. The tokenizer is a byte-level BPE trained
offline on the builtin corpus, so nothing is downloaded.
"""
from __future__ import annotations

from pathlib import Path

import torch

ARCHS = ("llama", "mistral", "qwen2")   # the quick set most tests run on
MATRIX = (*ARCHS, "phi3", "gemma2", "gpt_neox", "gpt2", "mixtral", "qwen2_moe")  # README's architecture table


def tiny_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from svdforge.core.data import builtin_lines

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(builtin_lines("calibration")[:400], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", model_max_length=4096)


def tiny_config(arch: str = "llama", vocab_size: int = 512, hidden: int = 64, layers: int = 2,
                heads: int = 4, kv_heads: int = 2, intermediate: int = 160):
    """A tiny config of one architecture of the matrix (`svdforge.core.architectures`),
    refused ones included, with each architecture's own traits left on (Qwen2's q/k/v biases,
    Phi-3's fused projections, Gemma-2's soft-capping and tied embeddings, MoE experts)."""
    import transformers as tf

    ids = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0}
    common = {"vocab_size": vocab_size, "hidden_size": hidden, "intermediate_size": intermediate,
              "num_hidden_layers": layers, "num_attention_heads": heads, "max_position_embeddings": 1024, **ids}
    gqa = {**common, "num_key_value_heads": kv_heads}
    untied = {"tie_word_embeddings": False}
    moe = {"num_experts_per_tok": 2}
    make = {
        "llama": lambda: tf.LlamaConfig(**gqa, **untied),
        "mistral": lambda: tf.MistralConfig(**gqa, **untied),
        "qwen2": lambda: tf.Qwen2Config(**gqa, **untied),
        "phi3": lambda: tf.Phi3Config(**gqa, **untied),
        "gemma2": lambda: tf.Gemma2Config(**gqa, head_dim=hidden // heads, tie_word_embeddings=True),
        "gpt_neox": lambda: tf.GPTNeoXConfig(**common, **untied),
        "gpt2": lambda: tf.GPT2Config(vocab_size=vocab_size, n_embd=hidden, n_layer=layers, n_head=heads,
                                      n_positions=1024, **ids),
        "mixtral": lambda: tf.MixtralConfig(**gqa, **untied, **moe, num_local_experts=4),
        "qwen2_moe": lambda: tf.Qwen2MoeConfig(**gqa, **untied, **moe, num_experts=4, moe_intermediate_size=32,
                                               shared_expert_intermediate_size=intermediate),
    }
    return make[arch]()


def make_tiny_model(path: str | Path, arch: str = "llama", seed: int = 0, **config_kw) -> Path:
    """Write a tiny random causal LM with a trained tokenizer into `path`; return the path."""
    from transformers import AutoModelForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size=len(tok), **config_kw))
    # Random init is close to uniform; a larger init spread gives non-trivial spectra.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path
