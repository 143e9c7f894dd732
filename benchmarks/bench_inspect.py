"""inspect and validate on a full-size Mixtral-8x22B-shaped W4A16 checkpoint, written as
sparse files (real headers and index, ~73 GB apparent, almost no disk), timed beside
huggingface_hub.get_local_safetensors_metadata in the same run.

    python benchmarks/bench_inspect.py [--dir /tmp/mixtral-8x22b-sparse] [--reps 5] [--json out.json]

Each tool runs as a fresh process (start-up included, as a user sees it); wall time and that
process's peak RSS come from wait4. A second, in-process pass separates library time from
interpreter start-up and counts the bytes the library read (/proc/self/io rchar).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

H, I, LAYERS, EXPERTS, VOCAB, KV, GS = 6144, 16384, 56, 8, 32768, 1024, 128
SHARD = 5 * 10**9


def plan():
    """(name, dtype, shape) of every tensor, in checkpoint order."""
    def q(prefix, out, inp):
        return [(f"{prefix}.weight_packed", "I32", [out, inp // 8]), (f"{prefix}.weight_scale", "BF16", [out, inp // GS]),
                (f"{prefix}.weight_shape", "I64", [2])]
    t = [("model.embed_tokens.weight", "BF16", [VOCAB, H])]
    for layer in range(LAYERS):
        p = f"model.layers.{layer}"
        for proj, out in (("q_proj", H), ("k_proj", KV), ("v_proj", KV), ("o_proj", H)):
            t += q(f"{p}.self_attn.{proj}", out, H)
        t.append((f"{p}.block_sparse_moe.gate.weight", "BF16", [EXPERTS, H]))
        for e in range(EXPERTS):
            for name, out, inp in (("w1", I, H), ("w2", H, I), ("w3", I, H)):
                t += q(f"{p}.block_sparse_moe.experts.{e}.{name}", out, inp)
        t += [(f"{p}.input_layernorm.weight", "BF16", [H]), (f"{p}.post_attention_layernorm.weight", "BF16", [H])]
    return t + [("model.norm.weight", "BF16", [H]), ("lm_head.weight", "BF16", [VOCAB, H])]


def write_sparse(root: Path) -> int:
    sizes = {"I32": 4, "BF16": 2, "I64": 8}
    shards, cur, used = [], [], 0
    for name, dt, shape in plan():
        n = sizes[dt]
        for d in shape:
            n *= d
        if cur and used + n > SHARD:
            shards.append(cur)
            cur, used = [], 0
        cur.append((name, dt, shape, n))
        used += n
    shards.append(cur)
    root.mkdir(parents=True)
    weight_map, total = {}, 0
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        header, pos = {"__metadata__": {"format": "pt"}}, 0
        for name, dt, shape, n in shard:
            header[name] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + n]}
            weight_map[name] = fname
            pos += n
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(root / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + pos)      # sparse: the data is never written
        total += 8 + len(raw) + pos
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    args = {"actorder": None, "block_structure": None, "dynamic": False, "group_size": GS, "num_bits": 4,
            "observer": "minmax", "observer_kwargs": {}, "strategy": "group", "symmetric": True, "type": "int"}
    config = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "hidden_size": H,
              "intermediate_size": I, "num_hidden_layers": LAYERS, "num_local_experts": EXPERTS,
              "num_attention_heads": 48, "num_key_value_heads": 8, "vocab_size": VOCAB, "torch_dtype": "bfloat16",
              "quantization_config": {"config_groups": {"group_0": {"input_activations": None,
                                                                    "output_activations": None,
                                                                    "targets": ["Linear"], "weights": args}},
                                      "format": "pack-quantized", "ignore": ["lm_head", "re:.*block_sparse_moe.gate"],
                                      "kv_cache_scheme": None, "quant_method": "compressed-tensors",
                                      "quantization_status": "compressed"}}
    (root / "config.json").write_text(json.dumps(config, indent=2))
    return len(shards)


def run_child(argv: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS in MB, exit code of one fresh process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss / 1024, proc.returncode


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dir", default="/tmp/ctformat-mixtral-8x22b-sparse")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    root = Path(a.dir)
    if root.exists():
        shutil.rmtree(root)
    shards = write_sparse(root)
    apparent = sum(p.stat().st_size for p in root.iterdir())
    on_disk = sum(p.stat().st_blocks * 512 for p in root.iterdir())
    py = sys.executable
    tools = {
        "ctformat inspect --json": [py, "-m", "ctformat", "inspect", str(root), "--json"],
        "ctformat validate --json": [py, "-m", "ctformat", "validate", str(root), "--json"],
        "ctformat validate --target vllm": [py, "-m", "ctformat", "validate", str(root), "--target", "vllm"],
        "hf get_local_safetensors_metadata": [py, "-c", "import sys, huggingface_hub as h; "
                                              "h.get_local_safetensors_metadata(sys.argv[1])", str(root)],
        "python -c pass (interpreter floor)": [py, "-c", "pass"],
    }
    results = {}
    for name, argv in tools.items():
        runs = [run_child(argv) for _ in range(a.reps + 1)][1:]     # first run warms the page cache
        assert all(r[2] == 0 for r in runs), (name, runs)
        results[name] = {"wall_s_median": statistics.median(r[0] for r in runs),
                         "wall_s_best": min(r[0] for r in runs),
                         "peak_rss_mb": max(r[1] for r in runs)}
    # in-process: library time alone and bytes read
    from ctformat.checkpoint import open_checkpoint
    from ctformat.summary import summarize
    from ctformat.validate import validate_checkpoint
    validate_checkpoint(root)
    r0, t0 = rchar(), time.perf_counter()
    summarize(open_checkpoint(root))
    t_inspect, r_inspect = time.perf_counter() - t0, rchar() - r0
    r0, t0 = rchar(), time.perf_counter()
    report = validate_checkpoint(root)
    t_validate, r_validate = time.perf_counter() - t0, rchar() - r0
    assert report.ok, [str(i) for i in report.issues][:5]
    header_bytes = sum(8 + struct.unpack("<Q", open(p, "rb").read(8))[0] for p in root.glob("*.safetensors"))
    meta = {"date": str(date.today()), "machine": platform.processor() or platform.machine(),
            "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
            "cores": os.cpu_count(), "python": platform.python_version(), "shards": shards,
            "apparent_bytes": apparent, "disk_bytes": on_disk, "modules_checked": report.modules_checked,
            "header_bytes": header_bytes, "library": {"inspect_s": t_inspect, "inspect_bytes_read": r_inspect,
                                                      "validate_s": t_validate, "validate_bytes_read": r_validate}}
    print(f"{meta['date']}  {meta['cpu']}  {meta['cores']} cores  Python {meta['python']}")
    print(f"checkpoint: {shards} shards, {apparent / 1e9:.1f} GB apparent, {on_disk / 1e6:.1f} MB on disk, "
          f"{report.modules_checked} quantized modules, {header_bytes / 1e6:.2f} MB of headers")
    print(f"{'tool (fresh process)':40s} {'median s':>9s} {'best s':>8s} {'peak RSS MB':>12s}  target")
    for name, r in results.items():
        target = ""
        if name.startswith("ctformat"):
            target = "PASS" if r["wall_s_median"] <= 0.5 and r["peak_rss_mb"] <= 150 else "FAIL (<=0.5 s, <=150 MB)"
        print(f"{name:40s} {r['wall_s_median']:9.3f} {r['wall_s_best']:8.3f} {r['peak_rss_mb']:12.1f}  {target}")
    hf = results["hf get_local_safetensors_metadata"]["wall_s_median"]
    for name in ("ctformat inspect --json", "ctformat validate --json"):
        print(f"ratio {name} / hf metadata: {results[name]['wall_s_median'] / hf:.2f}x the time")
    lib = meta["library"]
    print(f"in-process: inspect {lib['inspect_s'] * 1000:.0f} ms reading {lib['inspect_bytes_read'] / 1e6:.2f} MB; "
          f"validate {lib['validate_s'] * 1000:.0f} ms reading {lib['validate_bytes_read'] / 1e6:.2f} MB "
          f"(headers: {header_bytes / 1e6:.2f} MB; tensor data: {(apparent - header_bytes) / 1e9:.1f} GB)")
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
