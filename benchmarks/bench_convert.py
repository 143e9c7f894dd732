"""End-to-end `convert --to dense` on this machine beside compressed-tensors' own model-free
converter (convert_checkpoint with CompressedTensorsDequantizer) on the same checkpoint, and
the raw read speed of the same files.

    python benchmarks/bench_convert.py [--gb 1.0] [--device cpu] [--json out.json]

The checkpoint is synthetic W4A16 (group 128) with real Mixtral-8x22B expert shapes
(16384 x 6144), written with ctformat's writer. Each tool runs in a fresh process; wall time
and peak RSS come from wait4. Outputs are compared tensor by tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CT_SCRIPT = """
import sys, torch
from compressed_tensors.entrypoints.convert import convert_checkpoint
from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer
convert_checkpoint(sys.argv[1], sys.argv[2], converter=CompressedTensorsDequantizer(sys.argv[1], dtype=torch.bfloat16),
                   max_workers=int(sys.argv[3]), device=sys.argv[4])
"""


def make(root: Path, gb: float) -> tuple[int, int]:
    import torch
    from ctformat.writer import CheckpointWriter
    out_f, in_f = 16384, 6144
    per = out_f * in_f // 2 + out_f * in_f // 128 * 2 + 16
    n = max(1, int(gb * 1e9 // per))
    plan = []
    for k in range(n):
        p = f"model.layers.{k // 3}.block_sparse_moe.experts.{k % 3}.w1"
        plan += [(f"{p}.weight_packed", "I32", (out_f, in_f // 8)), (f"{p}.weight_scale", "BF16", (out_f, in_f // 128)),
                 (f"{p}.weight_shape", "I64", (2,))]
    g = torch.Generator().manual_seed(0)
    config = json.loads((ROOT / "fixtures" / "int4-g32" / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 128
    config["quantization_config"]["ignore"] = []
    with CheckpointWriter(root, plan, max_shard_size=1_000_000_000) as w:
        for name, _, shape in plan:
            if name.endswith("packed"):
                w.write(name, torch.randint(-2**31, 2**31 - 1, shape, generator=g, dtype=torch.int32))
            elif name.endswith("scale"):
                w.write(name, (torch.rand(shape, generator=g) * 0.01 + 1e-4).to(torch.bfloat16))
            else:
                w.write(name, torch.tensor(shape and [out_f, in_f]))
        w.close(config)
    return n, sum(p.stat().st_size for p in root.iterdir())


def run(argv) -> tuple[float, float]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed: {argv}")
    return time.perf_counter() - t0, usage.ru_maxrss / 1024


def drop_caches() -> bool:
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gb", type=float, default=1.0, help="packed checkpoint size")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dir", default="/tmp/ctformat-bench-convert")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    base = Path(a.dir)
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    src = base / "src"
    modules, size = make(src, a.gb)
    files = sorted(src.glob("*.safetensors"))
    cold = drop_caches()
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(64 << 20):
                pass
    read_s = time.perf_counter() - t0
    results = {"raw read": {"s": read_s, "GBps_in": size / read_s / 1e9}}
    tools = {
        "ctformat convert": [sys.executable, "-m", "ctformat", "convert", str(src), str(base / "ct-out-ctformat"),
                             "--to", "dense", "--device", a.device],
        "compressed-tensors convert_checkpoint": [sys.executable, "-c", CT_SCRIPT, str(src), str(base / "ct-out-ct"),
                                                 "1", a.device],
    }
    for name, argv in tools.items():
        drop_caches()
        s, rss = run(argv)
        results[name] = {"s": s, "GBps_in": size / s / 1e9, "peak_rss_mb": rss}
    from safetensors import safe_open
    import torch
    ours, theirs = base / "ct-out-ctformat", base / "ct-out-ct"
    idx = json.loads((ours / "model.safetensors.index.json").read_text())["weight_map"] if (
        ours / "model.safetensors.index.json").exists() else None
    checked = 0
    for f in sorted(theirs.glob("*.safetensors")):
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                with safe_open(ours / (idx[k] if idx else "model.safetensors"), framework="pt") as gh:
                    assert torch.equal(fh.get_tensor(k), gh.get_tensor(k)), k
                checked += 1
    largest = 16384 * 6144 * 2
    meta = {"date": str(date.today()), "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                                                     if l.startswith("model name")), "?"),
            "cores": os.cpu_count(), "python": platform.python_version(), "modules": modules,
            "input_bytes": size, "largest_output_tensor_bytes": largest, "cold_cache": cold,
            "tensors_compared_equal": checked, "device": a.device}
    print(f"{meta['date']}  {meta['cpu']}  {meta['cores']} cores  device {a.device}")
    print(f"input: {modules} modules of 16384x6144 int4 g128, {size / 1e9:.2f} GB in {len(files)} shards; "
          f"output {modules * largest / 1e9:.2f} GB bf16; {checked} output tensors equal between the tools; "
          f"page cache {'dropped before each run' if cold else 'warm (could not drop it)'}")
    for name, r in results.items():
        extra = f"  peak RSS {r['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in r else ""
        print(f"{name:40s} {r['s']:8.2f} s  {r['GBps_in']:6.3f} GB/s of input{extra}")
    ratio = results["compressed-tensors convert_checkpoint"]["s"] / results["ctformat convert"]["s"]
    bound = 3 * largest / 1e6 + 300
    rss = results["ctformat convert"]["peak_rss_mb"]
    verdict = ("PASS" if rss <= bound else "FAIL") if a.device == "cpu" else \
        "not judged: the bound is for --device cpu; a CUDA process also maps CUDA's libraries and context"
    print(f"ctformat is {ratio:.2f}x faster (target >= 2x: {'PASS' if ratio >= 2 else 'FAIL'}); peak RSS {rss:.0f} MB "
          f"vs bound 3 x largest tensor + 300 MB = {bound:.0f} MB: {verdict}")
    if a.json:
        Path(a.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    shutil.rmtree(base)


if __name__ == "__main__":
    main()
