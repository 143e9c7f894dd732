"""Checkpoint I/O: header-only opening, module view, lazy loads, the atomic sharded writer."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from conftest import FIXTURES, ROOT, tree_snapshot
from ctformat.dequant import dequantize_module
from ctformat.checkpoint import open_checkpoint
from ctformat.writer import CheckpointWriter, save_checkpoint
from ctformat.errors import HeaderError, OutputExistsError, WriterError


def tensors(n=6):
    g = torch.Generator().manual_seed(0)
    return {f"layer.{k}.weight": torch.randn(32, 16, generator=g).to(torch.bfloat16) for k in range(n)} | {
        "layer.packed": torch.arange(40, dtype=torch.int32).reshape(4, 10), "layer.shape": torch.tensor([4, 80])}


def test_writer_shards_by_size_and_safetensors_reads_every_shard(tmp_path):
    src = tensors()
    out = save_checkpoint(tmp_path / "out", src, {"model_type": "test"}, max_shard_size=3000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in src.values())
    for name, t in src.items():       # the real safetensors library is the reader here
        with safe_open(out / index["weight_map"][name], framework="pt") as f:
            assert torch.equal(f.get_tensor(name), t)
    ckpt = open_checkpoint(out)
    assert all(torch.equal(ckpt.load(n), t) for n, t in src.items())


def test_writer_single_file_has_no_index(tmp_path):
    out = save_checkpoint(tmp_path / "out", tensors(2))
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]


def test_writer_failure_leaves_nothing(tmp_path):
    src = tensors()
    plan = [(n, "BF16" if t.dtype == torch.bfloat16 else "I32" if t.dtype == torch.int32 else "I64", tuple(t.shape))
            for n, t in src.items()]
    with pytest.raises(RuntimeError, match="disk on fire"):
        with CheckpointWriter(tmp_path / "out", plan, max_shard_size=3000) as w:
            for k, (n, t) in enumerate(src.items()):
                if k == 3:
                    raise RuntimeError("disk on fire")
                w.write(n, t)
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_out_of_plan_tensor(tmp_path):
    with CheckpointWriter(tmp_path / "out", [("a", "F32", (2,))]) as w:
        with pytest.raises(WriterError, match="expected a F32 \\[2\\], got a F32 \\[3\\]"):
            w.write("a", torch.zeros(3))
    assert list(tmp_path.iterdir()) == []


def test_writer_refuses_existing_output_unless_forced(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError, match="already exists"):
        save_checkpoint(out, tensors(1))
    assert (out / "keep.txt").read_text() == "mine"
    save_checkpoint(out, tensors(1), force=True)
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]     # no temp or old folders left


def test_writer_never_writes_through_a_symlink(tmp_path):
    target = tmp_path / "elsewhere"
    target.mkdir()
    (tmp_path / "out").symlink_to(target)
    with pytest.raises(OutputExistsError, match="symbolic link"):
        save_checkpoint(tmp_path / "out", tensors(1), force=True)
    assert list(target.iterdir()) == []


def test_writer_never_touches_its_source(tmp_path):
    src = tmp_path / "src"
    save_checkpoint(src, tensors(1))
    before = tree_snapshot(src)
    with pytest.raises(OutputExistsError, match="overlaps the input"):
        save_checkpoint(src, tensors(1), force=True, source=src)
    assert tree_snapshot(src) == before


def test_writer_copies_other_files_from_source(tmp_path):
    out = save_checkpoint(tmp_path / "out", tensors(1), {"a": 1}, source=FIXTURES / "tiny-mixtral")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]


def test_open_reads_headers_only_on_a_sparse_74gb_file(tmp_path):
    """A header promising 74 GB of data opens instantly: no tensor byte is read."""
    size = 74 * 10**9
    header = json.dumps({"w.weight_packed": {"dtype": "I32", "shape": [size // 4], "data_offsets": [0, size]}}).encode()
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header)
        f.truncate(8 + len(header) + size)            # sparse: costs no disk
    t0 = time.perf_counter()
    ckpt = open_checkpoint(path)
    assert time.perf_counter() - t0 < 5                # generous; a data read would take minutes
    assert ckpt.tensors["w.weight_packed"].nbytes == size


def test_hf_cache_snapshot_of_symlinks_opens(tmp_path):
    """The Hugging Face cache stores snapshot files as symlinks into blobs/."""
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snap.mkdir(parents=True)
    for f in (FIXTURES / "int4-g32").iterdir():
        (blobs / f"sha-{f.name}").write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(blobs / f"sha-{f.name}")
    ckpt = open_checkpoint(snap)
    m = ckpt.modules()["model.layers.0.self_attn.q_proj"]
    assert dequantize_module(ckpt, m).shape == (64, 64)


def test_module_view_groups_tensors_and_resolves_schemes():
    ckpt = open_checkpoint(FIXTURES / "tiny-mixtral")
    mods = ckpt.modules()
    q = mods["model.layers.1.self_attn.q_proj"]
    assert set(q.tensors) == {"weight_packed", "weight_scale", "weight_shape"} and q.scheme.num_bits == 4
    gate = mods["model.layers.0.block_sparse_moe.gate"]
    assert gate.ignored and not gate.quantized
    assert not mods["model.embed_tokens"].is_linear and not mods["model.norm"].is_linear


def test_mixed_groups_resolve_per_module():
    ckpt = open_checkpoint(FIXTURES / "mixed-groups")
    mods = ckpt.modules()
    assert mods["model.layers.0.self_attn.k_proj"].scheme.num_bits == 8
    assert mods["model.layers.0.self_attn.o_proj"].scheme.symmetric is False


def test_truncated_shard_found_at_open_not_at_load():
    with pytest.raises(HeaderError, match=r"truncated.*\[HDR-06\]"):
        open_checkpoint(FIXTURES / "bad" / "HDR-06")


def test_index_path_traversal_is_refused_before_any_read():
    with pytest.raises(HeaderError, match=r"outside the model folder \[FILE-04\]"):
        open_checkpoint(FIXTURES / "bad" / "FILE-04")


def test_absolute_index_path_is_refused(tmp_path):
    save_checkpoint(tmp_path / "m", tensors(6), max_shard_size=3000)
    idx = tmp_path / "m" / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    doc["weight_map"]["layer.0.weight"] = "/etc/passwd"
    idx.write_text(json.dumps(doc))
    with pytest.raises(HeaderError, match=r"FILE-04"):
        open_checkpoint(tmp_path / "m")


def test_fixtures_are_reproducible(tmp_path):
    env = dict(os.environ, CTFORMAT_FIXTURES_OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    subprocess.run([sys.executable, str(FIXTURES / "make_fixtures.py")], check=True, env=env, timeout=300)
    # marlin/ (vLLM's reference output), real/ and formats/ (llm-compressor's) are not ctformat's to
    # make; moe/ has its own generator (fixtures/moe/make_moe_fixtures.py, checked by test_architectures)
    made_elsewhere = ("marlin", "real", "formats", "moe", "__pycache__")
    for d in sorted(p for p in FIXTURES.iterdir() if p.is_dir() and p.name not in made_elsewhere):
        assert tree_snapshot(tmp_path / d.name) == tree_snapshot(d), d.name


def test_import_ctformat_is_light():
    r = subprocess.run([sys.executable, "-c", "import ctformat, sys; assert 'torch' not in sys.modules"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
