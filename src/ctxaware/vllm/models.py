"""Model directories vLLM can load: the embedded SmolLM2 as a transformers checkpoint, tiny test models.

vLLM reads Hugging Face directories, not the GGUF file ctxaware embeds: :func:`embedded_model_dir`
returns the plain safetensors copy that :func:`ctxaware.models.resolve_model_path` converts once
into the ctxaware cache (model + tokenizer with its chat template). :func:`tiny_model_dir` saves a
small random decoder of a given family (with the embedded model's tokenizer, so chat templates and
role spans work) for fast tests; vLLM's CPU kernel needs a head size of at least 32.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from ..models import cache_dir, load_tokenizer, resolve_model_path, save_pretrained_atomic

TINY = {
    "llama": {"model_type": "llama", "architectures": ["LlamaForCausalLM"]},
    "qwen2": {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]},
    # layer 0 a 24-token sliding window, layer 1 full; attention softcap 5 (small enough to matter)
    "gemma2": {"model_type": "gemma2", "architectures": ["Gemma2ForCausalLM"], "sliding_window": 24,
               "attn_logit_softcapping": 5.0, "query_pre_attn_scalar": 32},
}


def embedded_model_dir() -> str:
    """Directory of the embedded SmolLM2-135M-Instruct as a transformers checkpoint (converted once)."""
    return resolve_model_path(None)


def tiny_model_dir(family: str = "llama", *, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                   head_dim: int = 32, seed: int = 0, **overrides: Any) -> str:
    """A random ``family`` decoder (GQA, fp32) saved under the ctxaware cache; built once per config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in TINY:
        raise ValueError(f"unknown tiny family {family!r}; choose from {', '.join(TINY)}")
    tok = load_tokenizer()
    spec = {**TINY[family], "hidden_size": heads * head_dim, "num_attention_heads": heads,
            "num_key_value_heads": kv_heads, "head_dim": head_dim, "num_hidden_layers": layers,
            "intermediate_size": 2 * heads * head_dim, "vocab_size": len(tok), "max_position_embeddings": 2048,
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id,
            "tie_word_embeddings": True, "torch_dtype": "float32", **overrides}
    key = json.dumps({**spec, "seed": seed}, sort_keys=True)
    target = cache_dir() / "vllm-tiny" / f"{family}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (target / "config.json").is_file():
        return str(target)
    model_type = spec.pop("model_type")
    config = AutoConfig.for_model(model_type, **{k: v for k, v in spec.items() if k != "torch_dtype"})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    save_pretrained_atomic(target, model, tok)
    return str(target)
