"""GGUF repack throughput against a plain copy of the same bytes, and against llama.cpp's route,
measured side by side in one run.

For each scheme: one module's CT tensors (weight_packed + weight_scale) -> ggml blocks with
ctformat.ggml.encode_module (what convert --to gguf runs per module), by the compiled codec
(spec/gguf.md §2.1; "native") and by the numpy one ("numpy"), against
- a plain copy of the same input bytes into a fresh buffer, numpy (np.copy) and torch (clone);
- llama.cpp's route for the same module: dequantize to float32, then gguf-py's quantize (the
  numpy twin of ggml's quantizer, which convert_hf_to_gguf.py uses) to Q8_0/Q4_0 (--peer).
The repacked blocks are checked against gguf-py's dequantization (== s*(q - z)) first. Runs are
interleaved (copy, repack, clone, ...) and the median of each is reported, with the repack's CPU
time (all threads); the machine may be shared, so only ratios taken in one run mean anything.

End to end: `convert --to gguf` (the library call the CLI makes) of a multi-module int4 g128
checkpoint written for the run (random codes, Llama layout, no tokenizer), against
shutil.copyfile of its safetensors file, interleaved, medians; the conversion runs with the
compiled codec and with CTFORMAT_NATIVE=0 (numpy) in the same run.

    python benchmarks/bench_gguf.py [--rows 16384] [--cols 8192] [--repeat 7] [--threads N]
        [--e2e-layers 8] [--peer] [--only LABEL] [--json OUT] [--check]

--check: tiny shapes, one repeat (a smoke run that still checks every repack bit for bit).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ctformat.ggml import block_type_for, dequantize_blocks, encode_module
from ctformat.pack import unpack_from_int32
from ctformat.quant import compress, decompress, dequantize
from ctformat.scheme import QuantScheme

SCHEMES = {
    "int4 g32 -> Q4_0": {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 32},
    "int4 g128 -> Q4_0": {"num_bits": 4, "symmetric": True, "strategy": "group", "group_size": 128},
    "int8 g128 -> Q8_0": {"num_bits": 8, "symmetric": True, "strategy": "group", "group_size": 128},
    "int4 asym g128 -> Q5_0": {"num_bits": 4, "symmetric": False, "strategy": "group", "group_size": 128},
    "int3 g128 -> Q4_0": {"num_bits": 3, "symmetric": True, "strategy": "group", "group_size": 128},
}
E2E_SCHEME = SCHEMES["int4 g128 -> Q4_0"]
NATIVE: bool | None = None      # encode_module(native=...): the compiled codec where it builds


def timed(fn) -> tuple[float, float]:
    """(wall, process CPU) seconds of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def medians(runs: dict[str, list], repeat: int, after=None) -> dict[str, tuple[float, float]]:
    """Run each callable `repeat` times, interleaved; median wall and CPU of each. `after()` runs
    untimed after each call."""
    got: dict[str, list] = {k: [] for k in runs}
    for _ in range(repeat):
        for k, fn in runs.items():
            got[k].append(timed(fn))
            if after:
                after()
    return {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in got.items()}


def bench_scheme(label: str, sj: dict, rows: int, cols: int, repeat: int, peer: bool, gen) -> dict:
    scheme = QuantScheme.from_json(sj, where=label)
    w = (torch.randn(rows, cols, generator=gen) * 0.02).to(torch.bfloat16)
    t = compress(w, scheme)
    del w
    btype = block_type_for(scheme, cols)
    raw = encode_module(t, scheme, btype, native=NATIVE)
    q = unpack_from_int32(t["weight_packed"], scheme.num_bits, (rows, cols))
    zp = t.get("weight_zero_point")
    if zp is not None:
        zp = unpack_from_int32(zp, scheme.num_bits, (rows, t["weight_scale"].shape[-1]), packed_dim=0)
    want = dequantize(q, t["weight_scale"].double(), zp, scheme=scheme)
    assert torch.equal(dequantize_blocks(raw, btype), want), label        # exact before anything is timed
    assert torch.equal(encode_module(t, scheme, btype, native=False), raw), label      # both codecs, same bytes
    del q, want, raw
    src = np.concatenate([t[k].reshape(-1).view(torch.uint8).numpy() for k in ("weight_packed", "weight_scale")])
    tsrc = torch.from_numpy(src)
    m = medians({"np_copy": lambda: src.copy(), "repack": lambda: encode_module(t, scheme, btype, native=NATIVE),
                 "numpy": lambda: encode_module(t, scheme, btype, native=False),
                 "clone": lambda: tsrc.clone()}, repeat)
    (c, _), (k, _), (r, rc), (n, nc) = m["np_copy"], m["clone"], m["repack"], m["numpy"]
    row = {"scheme": label, "ggml_type": btype.name, "mb_in": src.nbytes / 1e6, "np_copy_ms": c * 1e3,
           "clone_ms": k * 1e3, "repack_ms": r * 1e3, "repack_cpu_ms": rc * 1e3, "repack_gb_s": src.nbytes / r / 1e9,
           "x_np_copy": c / r, "x_clone": k / r, "numpy_ms": n * 1e3, "numpy_cpu_ms": nc * 1e3,
           "numpy_x_np_copy": c / n}
    if peer:
        import gguf
        qtype = gguf.GGMLQuantizationType["Q4_0" if btype.name == "Q4_0" else "Q8_0"]
        p, _ = timed(lambda: gguf.quants.quantize(decompress(t, scheme, dtype=torch.float32).numpy(), qtype))
        row |= {"peer_ms": p * 1e3, "x_peer": p / r}
    return row


def write_checkpoint(folder: Path, layers: int, hidden: int, inter: int, gen) -> Path:
    """A Llama-layout CT int4 g128 checkpoint of random codes (scales exact in fp16), one file."""
    from ctformat.writer import save_checkpoint
    gs = E2E_SCHEME["group_size"]
    heads = max(1, hidden // 128)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": heads, "head_dim": hidden // heads, "vocab_size": 256, "rms_norm_eps": 1e-5,
              "max_position_embeddings": 4096, "rope_theta": 10000.0, "tie_word_embeddings": False,
              "torch_dtype": "bfloat16",
              "quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                      "config_groups": {"group_0": {"targets": ["Linear"], "weights": E2E_SCHEME}},
                                      "ignore": ["lm_head"], "quantization_status": "compressed", "version": "0.20.0"}}

    def linear(out_f: int, in_f: int) -> dict[str, torch.Tensor]:
        return {"weight_packed": torch.randint(-2**31, 2**31 - 1, (out_f, in_f // 8), generator=gen, dtype=torch.int32),
                "weight_scale": (torch.rand(out_f, in_f // gs, generator=gen) * 0.01 + 0.001).to(torch.bfloat16),
                "weight_shape": torch.tensor([out_f, in_f], dtype=torch.int64)}
    t = {"model.embed_tokens.weight": torch.randn(256, hidden, generator=gen).to(torch.bfloat16),
         "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
         "lm_head.weight": torch.randn(256, hidden, generator=gen).to(torch.bfloat16)}
    for L in range(layers):
        p = f"model.layers.{L}"
        t[f"{p}.input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        t[f"{p}.post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        for name, shape in (("self_attn.q_proj", (hidden, hidden)), ("self_attn.k_proj", (hidden, hidden)),
                            ("self_attn.v_proj", (hidden, hidden)), ("self_attn.o_proj", (hidden, hidden)),
                            ("mlp.gate_proj", (inter, hidden)), ("mlp.up_proj", (inter, hidden)),
                            ("mlp.down_proj", (hidden, inter))):
            t |= {f"{p}.{name}.{k}": v for k, v in linear(*shape).items()}
    save_checkpoint(folder, t, config)
    return folder


def bench_e2e(layers: int, hidden: int, inter: int, repeat: int, gen) -> dict:
    from ctformat.to_gguf import convert_to_gguf
    with tempfile.TemporaryDirectory(prefix="bench-gguf-") as tmp:
        src = write_checkpoint(Path(tmp) / "model", layers, hidden, inter, gen)
        files = sorted(src.glob("*.safetensors"))
        nbytes = sum(f.stat().st_size for f in files)
        runs = iter(range(10**6))              # every run writes a fresh file (the last one removed, untimed)

        def convert() -> None:
            convert_to_gguf(src, Path(tmp) / f"out{next(runs)}.gguf", device="cpu")

        def convert_numpy() -> None:
            os.environ["CTFORMAT_NATIVE"] = "0"
            try:
                convert()
            finally:
                del os.environ["CTFORMAT_NATIVE"]

        def copyfile() -> None:
            for f in files:
                shutil.copyfile(f, Path(tmp) / f"copy{next(runs)}-{f.name}")
        convert()                                # warm: page cache, imports, first-call costs
        convert_numpy()
        out_bytes = (Path(tmp) / "out0.gguf").stat().st_size
        assert (Path(tmp) / "out0.gguf").read_bytes() == (Path(tmp) / "out1.gguf").read_bytes()
        for f in Path(tmp).glob("out*.gguf"):
            f.unlink()
        def remove_outputs() -> None:        # untimed: outputs left behind would pile up dirty pages until
            for f in [*Path(tmp).glob("out*.gguf"), *Path(tmp).glob("copy*")]:   # writeback slows every run
                f.unlink()
        m = medians({"copyfile": copyfile, "convert": convert, "convert_numpy": convert_numpy}, repeat,
                    after=remove_outputs)
    (c, _), (v, vc), (n, nc) = m["copyfile"], m["convert"], m["convert_numpy"]
    return {"what": f"convert --to gguf, Llama {layers} layers h{hidden} i{inter}, int4 g128 -> Q4_0",
            "modules": layers * 7, "mb_in": nbytes / 1e6, "mb_out": out_bytes / 1e6, "copyfile_ms": c * 1e3,
            "convert_ms": v * 1e3, "convert_cpu_ms": vc * 1e3, "x_copyfile": c / v,
            "convert_numpy_ms": n * 1e3, "convert_numpy_cpu_ms": nc * 1e3, "numpy_x_copyfile": c / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=16384)
    ap.add_argument("--cols", type=int, default=8192)
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--peer", action="store_true", help="also time dequantize + gguf-py quantize (slow)")
    ap.add_argument("--only", default=None, help="run the schemes whose label contains this")
    ap.add_argument("--threads", type=int, default=0, help="codec worker threads (0: one per core, at most 8)")
    ap.add_argument("--e2e-layers", type=int, default=8, help="layers of the end-to-end checkpoint (0: skip)")
    ap.add_argument("--json", default=None, help="write the results here (after every row)")
    ap.add_argument("--check", action="store_true", help="tiny shapes, one repeat: a quick unattended smoke run")
    args = ap.parse_args()
    from ctformat import native
    rows, cols, repeat = (256, 1024, 1) if args.check else (args.rows, args.cols, args.repeat)
    hidden, inter = (256, 512) if args.check else (2048, 5632)
    import ctformat.ggml as ggml
    if args.threads:
        ggml._workers = lambda: args.threads
    doc = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "torch": torch.__version__, "numpy": np.__version__, "torch_threads": torch.get_num_threads(),
                       "codec_threads": ggml._workers(), "load_before": os.getloadavg()[0],
                       "native": native.library_path().name if native.codec() else None},
           "module": [rows, cols], "repeat": repeat, "schemes": [], "e2e": None}

    def save() -> None:
        if args.json:
            doc["machine"]["load_after"] = os.getloadavg()[0]
            Path(args.json).write_text(json.dumps(doc, indent=2))
    m = doc["machine"]
    print(f"torch {m['torch']}, numpy {m['numpy']}, {m['cores']} cores, {m['torch_threads']} torch threads, "
          f"{m['codec_threads']} codec threads, load {m['load_before']:.2f}, module [{rows}, {cols}]")
    print(f"codec: {'compiled, ' + native.library_path().name if native.codec() else 'numpy only (no compiled codec)'}")
    print(f"{'scheme':24s} {'MB in':>6s} {'np copy':>8s} {'clone':>8s} {'native':>8s} {'cpu':>8s} {'GB/s':>5s} "
          f"{'x np copy':>9s} {'x clone':>8s} {'numpy':>8s} {'x np copy':>9s}"
          + (f" {'peer ms':>9s} {'vs peer':>8s}" if args.peer else ""))
    gen = torch.Generator().manual_seed(0)
    for label, sj in SCHEMES.items():
        if args.only and args.only not in label:
            continue
        r = bench_scheme(label, sj, rows, cols, repeat, args.peer, gen)
        doc["schemes"].append(r)
        save()
        print(f"{label:24s} {r['mb_in']:6.1f} {r['np_copy_ms']:8.2f} {r['clone_ms']:8.2f} {r['repack_ms']:8.2f} "
              f"{r['repack_cpu_ms']:8.2f} {r['repack_gb_s']:5.2f} {r['x_np_copy']:8.2f}x {r['x_clone']:7.2f}x "
              f"{r['numpy_ms']:8.2f} {r['numpy_x_np_copy']:8.2f}x"
              + (f" {r['peer_ms']:9.1f} {r['x_peer']:7.1f}x" if args.peer else ""), flush=True)
    if args.e2e_layers:
        e = doc["e2e"] = bench_e2e(2 if args.check else args.e2e_layers, hidden, inter, repeat, gen)
        save()
        print(f"end to end: {e['what']}: {e['mb_in']:.1f} MB in, {e['mb_out']:.1f} MB out; copyfile "
              f"{e['copyfile_ms']:.1f} ms; convert (native) {e['convert_ms']:.1f} ms (cpu {e['convert_cpu_ms']:.1f}), "
              f"{e['x_copyfile']:.2f}x copyfile; numpy {e['convert_numpy_ms']:.1f} ms (cpu "
              f"{e['convert_numpy_cpu_ms']:.1f}), {e['numpy_x_copyfile']:.2f}x", flush=True)
    save()


if __name__ == "__main__":
    main()
