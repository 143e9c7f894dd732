"""A real llama.cpp in the tests: the prebuilt CPU libraries of the PyPI wheel
llama-cpp-py-sync (llama.cpp b11739), made to load on glibc 2.36 (shared/reference/INTEROP.md §A.5).

The wheel's libraries import four C23 functions at version GLIBC_2.38 (__isoc23_strtol,
__isoc23_strtoul, __isoc23_strtoull, __isoc23_sscanf). Two steps make them load on an older
glibc, done once into the test cache, never in site-packages:
1. mark the GLIBC_2.38 version need of each library weak (VER_FLG_WEAK in .gnu.version_r), so
   the loader no longer requires that version;
2. LD_PRELOAD a shim (compiled here with gcc) that defines those functions as their C99 twins
   (the C23 ones only add 0b prefixes).
Logits come from a subprocess (LD_PRELOAD must be set before the process starts).
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from gguf_peers import CACHE, _publish

WHEEL = "llama-cpp-py-sync==0.11739"
_SHIM = r"""
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
long __isoc23_strtol(const char *s, char **e, int b) { return strtol(s, e, b); }
unsigned long __isoc23_strtoul(const char *s, char **e, int b) { return strtoul(s, e, b); }
unsigned long long __isoc23_strtoull(const char *s, char **e, int b) { return strtoull(s, e, b); }
long long __isoc23_strtoll(const char *s, char **e, int b) { return strtoll(s, e, b); }
int __isoc23_sscanf(const char *s, const char *f, ...) { va_list a; va_start(a, f); int r = vsscanf(s, f, a); va_end(a); return r; }
"""


def _fail(msg: str):
    if os.environ.get("CI"):
        raise RuntimeError(msg)
    pytest.skip(msg)


def weaken_version(path: Path, version: bytes = b"GLIBC_2.38") -> int:
    """Set VER_FLG_WEAK on every Vernaux entry naming `version` in an ELF64 LE shared object.
    Returns how many entries were changed."""
    data = bytearray(path.read_bytes())
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError(f"{path}: not a little-endian ELF64 file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQIIQQ", data, shoff + i * shentsize) for i in range(shnum)]
    changed = 0
    for _name, kind, _f, _a, off, _size, link, info, _al, _es in sections:
        if kind != 0x6FFFFFFE:                  # SHT_GNU_verneed
            continue
        strtab = sections[link][4]
        pos = off
        for _ in range(info):                   # sh_info = number of Verneed entries
            _ver, cnt, _file, aux, nxt = struct.unpack_from("<HHIII", data, pos)
            apos = pos + aux
            for _ in range(cnt):
                _hash, flags, _other, name, anext = struct.unpack_from("<IHHII", data, apos)
                end = data.index(0, strtab + name)
                if bytes(data[strtab + name:end]) == version:
                    struct.pack_into("<H", data, apos + 4, flags | 0x2)      # VER_FLG_WEAK
                    changed += 1
                apos += anext
            pos += nxt
    path.write_bytes(bytes(data))
    return changed


def llama_cpp_runtime() -> tuple[Path, Path]:
    """(folder to put on PYTHONPATH, shim to LD_PRELOAD), prepared once in the test cache."""
    dest = CACHE / "llama-cpp-py-sync-0.11739"
    shim = dest / "libisoc23shim.so"
    if shim.is_file():
        return dest, shim
    part = dest.with_name(f"{dest.name}.part{os.getpid()}")     # one per pytest-xdist worker
    subprocess.run(["rm", "-rf", str(part)], check=True)
    part.mkdir(parents=True)
    got = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
                          "-d", str(part), WHEEL], capture_output=True, text=True, timeout=600)
    wheels = list(part.glob("llama_cpp_py_sync-*.whl"))
    if got.returncode or not wheels:
        _fail(f"cannot fetch {WHEEL}: {got.stderr[-1500:]}")
    with zipfile.ZipFile(wheels[0]) as z:
        z.extractall(part)
    wheels[0].unlink()
    for lib in (part / "llama_cpp_py_sync").glob("lib*.so*"):
        weaken_version(lib)
    (part / "shim.c").write_text(_SHIM)
    cc = subprocess.run(["gcc", "-shared", "-fPIC", "-O2", "-o", str(part / shim.name), str(part / "shim.c")],
                        capture_output=True, text=True)
    if cc.returncode:
        _fail(f"gcc could not build the glibc shim: {cc.stderr[-1500:]}")
    _publish(part, dest)
    return dest, shim


_RUNNER = r"""
import json, sys
import numpy as np
from llama_cpp_py_sync._cffi_bindings import ffi, get_lib
path, ids, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
lib = get_lib()
lib.llama_backend_init()
mp = lib.llama_model_default_params()
model = lib.llama_model_load_from_file(path.encode(), mp)
assert model != ffi.NULL, "model did not load"
cp = lib.llama_context_default_params()
cp.n_ctx = max(64, len(ids)); cp.n_batch = cp.n_ubatch = len(ids)
cp.n_threads = cp.n_threads_batch = 1
cp.type_k = cp.type_v = 0          # GGML_TYPE_F32: no f16 rounding of the KV cache
cp.flash_attn_type = 0             # LLAMA_FLASH_ATTN_TYPE_DISABLED: plain f32 KQ and KQV products
ctx = lib.llama_init_from_model(model, cp)
assert ctx != ffi.NULL, "context did not start"
batch = lib.llama_batch_init(len(ids), 0, 1)
for i, t in enumerate(ids):
    batch.token[i] = t; batch.pos[i] = i; batch.n_seq_id[i] = 1; batch.seq_id[i][0] = 0; batch.logits[i] = 1
batch.n_tokens = len(ids)
assert lib.llama_decode(ctx, batch) == 0, "decode failed"
n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
rows = [np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, i), 4 * n_vocab), dtype=np.float32).copy()
        for i in range(len(ids))]
np.save(out, np.stack(rows))
"""


def llama_cpp_logits(gguf_path: Path, ids: list[int], tmp: Path) -> np.ndarray:
    """Per-position logits [len(ids), vocab] of llama.cpp b11739 (CPU, 1 thread, f32 KV cache)."""
    folder, shim = llama_cpp_runtime()
    out = tmp / "logits.npy"
    env = dict(os.environ, PYTHONPATH=str(folder), LD_PRELOAD=str(shim))
    got = subprocess.run([sys.executable, "-c", _RUNNER, str(gguf_path), json.dumps(ids), str(out)],
                         capture_output=True, text=True, env=env, timeout=300)
    if got.returncode:
        raise RuntimeError(f"llama.cpp run failed:\n{got.stderr[-4000:]}")
    return np.load(out)


# -- a reference that computes what llama.cpp's CPU backend computes ---------------------------------
def q8_0_round(x):
    """Activations as llama.cpp's CPU matmul sees them against a Q4_0/Q5_0/Q8_0 weight (its
    vec_dot_type is Q8_0): per 32 values along the row, d = amax/127 (float32), q = round(x/d),
    value = fp16(d) * q."""
    import torch
    b = x.to(torch.float32).unflatten(-1, (-1, 32))
    d = b.abs().amax(-1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.round(b * inv)
    return (d.to(torch.float16).to(torch.float64) * q.to(torch.float64)).flatten(-2)


def reference_logits(ckpt_dir: Path, ids: list[int]) -> np.ndarray:
    """Llama/Mixtral forward in float64 from the compressed-tensors checkpoint itself (Hugging Face
    semantics: original row order, rotate-half RoPE), with llama.cpp's input rounding per matmul:
    Q8_0 activations for repacked weights, bf16 for BF16 weights, none for F32 ones (router)."""
    import torch
    from ctformat.checkpoint import open_checkpoint
    from gguf_peers import float64_weight
    ckpt = open_checkpoint(ckpt_dir)
    c = ckpt.config
    mods = ckpt.modules()

    def linear(prefix: str, x):
        m = mods[prefix]
        if m.quantized:
            t = ckpt.load_module(m)
            w = float64_weight(t, m.scheme, ckpt.word_layout(m, int(t["weight_shape"][-1])))
            return q8_0_round(x) @ w.T
        w = ckpt.load(f"{prefix}.weight").to(torch.float64)
        if ckpt.tensors[f"{prefix}.weight"].dtype == "BF16" and not prefix.endswith(".gate"):
            x = x.to(torch.bfloat16)
        return x.to(torch.float64) @ w.T

    def norm(x, name):
        w = ckpt.load(name).to(torch.float64)
        x32 = x.to(torch.float64)
        return x32 / torch.sqrt((x32 * x32).mean(-1, keepdim=True) + c["rms_norm_eps"]) * w

    n, h = len(ids), c["hidden_size"]
    heads, kvh = c["num_attention_heads"], c["num_key_value_heads"]
    d = c.get("head_dim") or h // heads
    theta = c.get("rope_theta") or (c.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    inv = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(n, dtype=torch.float64)[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)

    def rope(x):                                     # [n, heads, d], rotate-half (HF)
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        return x * cos[:, None] + torch.cat([-x2, x1], -1) * sin[:, None]

    x = ckpt.load("model.embed_tokens.weight").to(torch.float64)[torch.tensor(ids)]
    mask = torch.full((n, n), float("-inf"), dtype=torch.float64).triu(1)
    for L in range(c["num_hidden_layers"]):
        p = f"model.layers.{L}"
        a = norm(x, f"{p}.input_layernorm.weight")
        q = rope(linear(f"{p}.self_attn.q_proj", a).reshape(n, heads, d))
        k = rope(linear(f"{p}.self_attn.k_proj", a).reshape(n, kvh, d)).repeat_interleave(heads // kvh, 1)
        v = linear(f"{p}.self_attn.v_proj", a).reshape(n, kvh, d).repeat_interleave(heads // kvh, 1)
        att = torch.softmax(torch.einsum("qhd,khd->hqk", q, k) / d ** 0.5 + mask, -1)
        x = x + linear(f"{p}.self_attn.o_proj", torch.einsum("hqk,khd->qhd", att, v).reshape(n, heads * d))
        a = norm(x, f"{p}.post_attention_layernorm.weight")
        if f"{p}.block_sparse_moe.gate" in mods:
            probs = torch.softmax(linear(f"{p}.block_sparse_moe.gate", a), -1)
            top, idx = probs.topk(c["num_experts_per_tok"], -1)
            top = top / top.sum(-1, keepdim=True)
            out = torch.zeros_like(x)
            parts = {k for k in ("w1", "gate_proj") if f"{p}.block_sparse_moe.experts.0.{k}" in mods}
            g, u, dn = ("w1", "w3", "w2") if "w1" in parts else ("gate_proj", "up_proj", "down_proj")
            for e in range(c["num_local_experts"]):
                e_p = f"{p}.block_sparse_moe.experts.{e}"
                y = linear(f"{e_p}.{dn}", torch.nn.functional.silu(linear(f"{e_p}.{g}", a)) * linear(f"{e_p}.{u}", a))
                out += y * (top * (idx == e)).sum(-1, keepdim=True)
            x = x + out
        else:
            gate, up = linear(f"{p}.mlp.gate_proj", a), linear(f"{p}.mlp.up_proj", a)
            x = x + linear(f"{p}.mlp.down_proj", torch.nn.functional.silu(gate) * up)
    return linear("lm_head", norm(x, "model.norm.weight")).numpy()
