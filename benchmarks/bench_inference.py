"""Reference inference with streamed decoder layers through a Mixtral-8x22B-shaped layer stack
(hidden 6144, intermediate 16384, 8 experts top-2, 48 heads / 8 KV heads of 128, vocab 32768):
synthetic int4 group-128 weights at the real shapes, a few layers. Reports tokens/s and how
each layer's time splits into copying packed weights to the device, dequantizing them (the
Triton kernel on CUDA), assembling them into transformers' parameters (its loader: experts
stacked and gate|up fused), and computing the layer's forward.

    python benchmarks/bench_inference.py [--layers 4] [--tokens 2048 4096] [--reps 3] [--packed-on device|host]
    python benchmarks/bench_inference.py --small          # tiny shapes, runs on the CPU in seconds

The packed weights stay on the device by default (`--packed-on host` copies each layer over
on every forward, as streaming a model larger than the device does). Timings come from
ReferenceModel.stats, which synchronizes the device between phases.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ctformat.pipeline import resolve_device  # noqa: E402
from ctformat.inference import ReferenceModel  # noqa: E402
from ctformat.linear import QuantLinear  # noqa: E402
from ctformat.scheme import QuantScheme  # noqa: E402

MIXTRAL_8X22B = dict(hidden_size=6144, intermediate_size=16384, num_local_experts=8, num_experts_per_tok=2,
                     num_attention_heads=48, num_key_value_heads=8, head_dim=128, vocab_size=32768)
SMALL = dict(hidden_size=256, intermediate_size=512, num_local_experts=8, num_experts_per_tok=2,
             num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=512)
SCHEME = QuantScheme.from_json({"num_bits": 4, "strategy": "group", "group_size": 128, "symmetric": True},
                               where="bench")


def packed(out: int, inp: int, device, gen) -> QuantLinear:
    """Random int4 words and positive scales: a real-shaped pack-quantized module."""
    words = torch.randint(-2**31, 2**31 - 1, (out, inp // 8), device=device, dtype=torch.int32, generator=gen)
    scale = (torch.rand(out, inp // 128, device=device, generator=gen) * 1e-3 + 1e-4).to(torch.bfloat16)
    tensors = {"weight_packed": words, "weight_scale": scale, "weight_shape": torch.tensor([out, inp])}
    return QuantLinear.from_tensors(tensors, SCHEME, dtype=torch.bfloat16)


def layer_weights(i: int, s: dict, device, gen) -> dict:
    h, inter, e = s["hidden_size"], s["intermediate_size"], s["num_local_experts"]
    q, kv = s["num_attention_heads"] * s["head_dim"], s["num_key_value_heads"] * s["head_dim"]
    p, moe = f"model.layers.{i}", f"model.layers.{i}.block_sparse_moe"
    w = {f"{p}.self_attn.q_proj.weight": packed(q, h, device, gen), f"{p}.self_attn.k_proj.weight": packed(kv, h, device, gen),
         f"{p}.self_attn.v_proj.weight": packed(kv, h, device, gen), f"{p}.self_attn.o_proj.weight": packed(h, q, device, gen),
         f"{p}.input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16, device=device),
         f"{p}.post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16, device=device),
         f"{moe}.gate.weight": (torch.randn(e, h, device=device, generator=gen) * 0.02).to(torch.bfloat16)}
    for x in range(e):
        w[f"{moe}.experts.{x}.w1.weight"] = packed(inter, h, device, gen)
        w[f"{moe}.experts.{x}.w3.weight"] = packed(inter, h, device, gen)
        w[f"{moe}.experts.{x}.w2.weight"] = packed(h, inter, device, gen)
    return w


def build(shapes: dict, layers: int, device: torch.device, packed_on: torch.device) -> ReferenceModel:
    from transformers import AutoModelForCausalLM, MixtralConfig
    config = MixtralConfig(num_hidden_layers=layers, max_position_embeddings=65536, tie_word_embeddings=False,
                           **shapes)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator(device=packed_on).manual_seed(0)
    h, v = shapes["hidden_size"], shapes["vocab_size"]
    rest = {"model.embed_tokens.weight": (torch.randn(v, h, device=packed_on, generator=gen) * 0.02).to(torch.bfloat16),
            "lm_head.weight": (torch.randn(v, h, device=packed_on, generator=gen) * 0.02).to(torch.bfloat16),
            "model.norm.weight": torch.ones(h, dtype=torch.bfloat16, device=packed_on)}
    return ReferenceModel(model, rest, [layer_weights(i, shapes, packed_on, gen) for i in range(layers)],
                          device=device, stream=True)


def measure(ref: ReferenceModel, tokens: int, vocab: int, reps: int) -> dict:
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(tokens))
    ref.logits(ids)                                   # warm-up: kernel compilation, allocator
    runs = []
    for _ in range(reps):
        for k in ref.stats:
            ref.stats[k] = 0 if k == "layers_materialized" else 0.0
        if ref.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        ref.logits(ids)
        if ref.device.type == "cuda":
            torch.cuda.synchronize()
        runs.append(dict(ref.stats, wall_s=time.perf_counter() - t0,
                         peak_bytes=torch.cuda.max_memory_allocated() if ref.device.type == "cuda" else None))
    best = min(runs, key=lambda r: r["wall_s"])
    n = best["layers_materialized"]
    layer_s = best["read_s"] + best["dequantize_s"] + best["assemble_s"] + best["compute_s"]
    return {"tokens": tokens, "tokens_per_s": tokens / best["wall_s"], "wall_s": best["wall_s"],
            "per_layer_ms": {k.removesuffix("_s"): 1e3 * best[k] / n
                             for k in ("read_s", "dequantize_s", "assemble_s", "compute_s")},
            "dequantize_share": best["dequantize_s"] / layer_s, "peak_bytes": best["peak_bytes"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke run)")
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default 4, --small 2)")
    ap.add_argument("--tokens", type=int, nargs="+", default=None, help="batch x seq (default 2048 4096)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--packed-on", choices=["device", "host"], default="device")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = ap.parse_args()
    shapes = SMALL if a.small else MIXTRAL_8X22B
    layers = a.layers or (2 if a.small else 4)
    tokens = a.tokens or ([64, 128] if a.small else [2048, 4096])
    dev = resolve_device(a.device)
    packed_on = dev if a.packed_on == "device" else torch.device("cpu")
    ref = build(shapes, layers, dev, packed_on)
    results = [measure(ref, t, shapes["vocab_size"], a.reps) for t in tokens]
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"== bench_inference: {'small' if a.small else 'Mixtral-8x22B'}-shaped stack, {layers} layers, int4 g128, "
          f"bf16, streamed, packed weights on {a.packed_on}; {name}, torch {torch.__version__}")
    print(f"{'tokens':>7} {'tok/s':>10} {'copy ms':>9} {'dequant ms':>11} {'assemble ms':>12} {'compute ms':>11} "
          f"{'dequant share':>14} {'peak GiB':>9}")
    for r in results:
        ms = r["per_layer_ms"]
        peak = f"{r['peak_bytes'] / 2**30:9.2f}" if r["peak_bytes"] else f"{'-':>9}"
        print(f"{r['tokens']:>7} {r['tokens_per_s']:>10.0f} {ms['read']:>9.2f} {ms['dequantize']:>11.2f} "
              f"{ms['assemble']:>12.2f} {ms['compute']:>11.2f} {100 * r['dequantize_share']:>13.1f}% {peak}")
    print("(per decoder layer, best of --reps; share = dequant / (copy + dequant + assemble + compute))")
    if a.json:
        a.json.write_text(json.dumps({"device": name, "layers": layers, "shapes": shapes, "results": results}, indent=2))


if __name__ == "__main__":
    main()
