"""Build a random-weight chat model of a real architecture and size, saved as a local model directory.

For GPU benchmarks and checks where no checkpoint can be downloaded: the architecture class and
shapes of a real 1–8B model (``--preset``; or any size with ``--layers/--hidden/...``), random
weights (seeded), the embedded SmolLM2 tokenizer and chat template (its vocabulary sets the
embedding size), saved with ``save_pretrained`` (safetensors) in ``--dtype``. Speed and memory of
such a model are those of the real one of the same shape; its answers are noise.

    python scripts/random_model.py --preset llama-1b --out /tmp/llama-1b --dtype bfloat16
    python scripts/random_model.py --layers 2 --hidden 128 --heads 4 --kv-heads 2 --out /tmp/tiny
"""

from __future__ import annotations

import argparse
import sys

# (layers, hidden, intermediate, heads, kv heads, head_dim): the shapes of published models
PRESETS = {
    "llama-1b": (16, 2048, 8192, 32, 8, 64),       # Llama-3.2-1B
    "tinyllama-1b": (22, 2048, 5632, 32, 4, 64),   # TinyLlama-1.1B
    "llama-3b": (28, 3072, 8192, 24, 8, 128),      # Llama-3.2-3B
    "llama-8b": (32, 4096, 14336, 32, 8, 128),     # Llama-3.1-8B
}


def build(args: argparse.Namespace):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ctxaware.models import load_tokenizer

    layers, hidden, inter, heads, kv, head_dim = PRESETS[args.preset] if args.preset else (
        args.layers, args.hidden, args.intermediate or 4 * args.hidden, args.heads, args.kv_heads,
        args.hidden // args.heads)
    tok = load_tokenizer(args.tokenizer)  # default: the embedded SmolLM2 tokenizer and chat template
    cfg = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=inter,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim,
                      vocab_size=len(tok), max_position_embeddings=args.window, rope_theta=500000.0,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(args.seed)
    dtype = getattr(torch, args.dtype)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model, tok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), help="shapes of a published model")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--intermediate", type=int, default=None, help="default: 4 × hidden")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--window", type=int, default=16384, help="max_position_embeddings (default: 16384)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer", default=None, help="tokenizer (with chat template) to save beside the weights "
                    "(default: the embedded SmolLM2's)")
    ap.add_argument("--out", required=True, help="directory to write")
    args = ap.parse_args(argv)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        ap.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    model, tok = build(args)
    model.save_pretrained(args.out)
    tok.save_pretrained(args.out)
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.out}: {type(model).__name__}, {params / 1e9:.2f}B parameters, {args.dtype}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
