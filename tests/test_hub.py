"""MODEL as a Hub repo id, through the real huggingface_hub client against a local server
that speaks the Hub protocol (tests/hubserver.py): headers only, pinned to one commit,
offline fallback to the cache."""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys

import huggingface_hub
from huggingface_hub import constants as hf_constants
import pytest

from conftest import FIXTURES, ROOT
from ctformat.dequant import dequantize_module
from ctformat.errors import CheckpointNotFoundError
from ctformat.hub import open_hub_checkpoint
from ctformat.source import is_repo_id
from ctformat.summary import summarize
from ctformat.validate import validate_checkpoint
from hubserver import FakeHub

SHARD_DATA = 64 * 2**20          # bytes of (sparse) tensor data per shard


def sparse_w4a16_repo(root):
    """Two 64 MiB shards of int4 g128 modules: real headers, sparse (unwritten) data."""
    root.mkdir()
    out, inp = 4096, 8192
    packed, scale = out * inp // 8 * 4, out * inp // 128 * 2
    weight_map = {}
    for k in range(2):
        header, pos, name = {}, 0, f"model-{k + 1:05d}-of-00002.safetensors"
        while pos + packed + scale + 16 <= SHARD_DATA:
            m = f"model.layers.{len(weight_map) // 3}.mlp.down_proj"
            for suffix, dtype, shape, size in (("weight_packed", "I32", [out, inp // 8], packed),
                                               ("weight_scale", "BF16", [out, inp // 128], scale),
                                               ("weight_shape", "I64", [2], 16)):
                header[f"{m}.{suffix}"] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + size]}
                weight_map[f"{m}.{suffix}"] = name
                pos += size
        raw = json.dumps(header).encode()
        with open(root / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + pos)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    config = json.loads((FIXTURES / "int4-g32" / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 128
    (root / "config.json").write_text(json.dumps(config))
    return root


def use_endpoint(monkeypatch, url):
    """What HF_ENDPOINT does at import time, for in-process calls."""
    monkeypatch.setattr(hf_constants, "ENDPOINT", url)
    monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")


@pytest.fixture
def hub(tmp_path):
    repos = {"org/tiny-mixtral": FIXTURES / "tiny-mixtral", "org/int4-g32": FIXTURES / "int4-g32",
             "org/big": sparse_w4a16_repo(tmp_path / "big"), "org/bad-gate": FIXTURES / "bad" / "TEN-09"}
    with FakeHub(repos) as h:
        yield h


def test_repo_id_recognition():
    assert is_repo_id("neuralmagic/Mixtral-8x22B-v0.1-quantized.w4a16")
    assert not is_repo_id("fixtures/tiny-mixtral/extra") and not is_repo_id("../x") and not is_repo_id("/abs/x")


def test_hub_summary_equals_local_summary(hub, tmp_path):
    remote = summarize(open_hub_checkpoint("org/tiny-mixtral", endpoint=hub.url, cache_dir=tmp_path))
    local = summarize(__import__("ctformat").open_checkpoint(FIXTURES / "tiny-mixtral"))
    assert remote.pop("path").startswith("org/tiny-mixtral@") and local.pop("path")
    assert remote == local


def test_hub_reads_headers_only_and_pins_one_commit(hub, tmp_path):
    ckpt = open_hub_checkpoint("org/big", endpoint=hub.url, cache_dir=tmp_path)
    assert len(ckpt.modules()) == 6 and len(ckpt.tensors) == 18     # every module of both shards seen
    shards = [f for f in hub.sent if f.endswith(".safetensors")]
    assert len(shards) == 2
    for f in shards:   # one 100 kB range request per shard out of 64 MiB
        assert hub.sent[f] <= 100_000
    assert sum(hub.sent[f] for f in shards) < SHARD_DATA // 300
    commit = hub.shas["org/big"]
    resolves = [p for _, p, _ in hub.requests if "/resolve/" in p]
    assert resolves and all(f"/resolve/{commit}/" in p for p in resolves)


def test_many_shards_cost_their_header_bytes_and_no_more(tmp_path):
    """A repo of many shards (frontier checkpoints have 62): every header is fetched by range,
    in parallel, and the bytes received are the headers' own (8-byte length + JSON), nothing else."""
    root = tmp_path / "many"
    root.mkdir()
    weight_map, header_bytes = {}, 0
    for k in range(24):
        name = f"model-{k + 1:05d}-of-00024.safetensors"
        header = {f"model.layers.{k}.mlp.down_proj.weight": {"dtype": "BF16", "shape": [64, 4096],
                                                              "data_offsets": [0, 64 * 4096 * 2]}}
        raw = json.dumps(header).encode()
        with open(root / name, "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + 64 * 4096 * 2)
        weight_map.update({t: name for t in header})
        header_bytes += 8 + len(raw)
    (root / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with FakeHub({"org/many": root}) as hub:
        ckpt = open_hub_checkpoint("org/many", endpoint=hub.url, cache_dir=tmp_path / "cache")
        sent = sum(n for f, n in hub.sent.items() if f.endswith(".safetensors"))
    assert len(ckpt.tensors) == 24 and sent == ckpt.files.bytes_read == header_bytes


def test_hub_validate_finds_rule_without_weights(hub, tmp_path, monkeypatch):
    use_endpoint(monkeypatch, hub.url)
    report = validate_checkpoint("org/bad-gate")
    assert {i.rule for i in report.issues} == {"TEN-09"}


def test_hub_deep_validate_reads_tensor_data_by_range(hub, monkeypatch):
    use_endpoint(monkeypatch, hub.url)
    report = validate_checkpoint("org/int4-g32", deep=True)
    assert report.ok and report.modules_checked == 4
    assert any(r and r != "bytes=0-99999" for _, _, r in hub.requests)


def test_hub_unknown_repo_and_revision_are_clear_errors(hub, tmp_path):
    with pytest.raises(CheckpointNotFoundError, match="no such model on the Hub"):
        open_hub_checkpoint("org/nope", endpoint=hub.url, cache_dir=tmp_path)
    with pytest.raises(CheckpointNotFoundError, match="no revision 'v9'"):
        open_hub_checkpoint("org/int4-g32", "v9", endpoint=hub.url, cache_dir=tmp_path)


def test_offline_mode_uses_the_local_cache(hub, tmp_path, monkeypatch):
    huggingface_hub.snapshot_download("org/int4-g32", endpoint=hub.url, cache_dir=tmp_path)
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    before = len(hub.requests)
    ckpt = open_hub_checkpoint("org/int4-g32", cache_dir=tmp_path)
    assert len(hub.requests) == before             # not one request
    assert dequantize_module(ckpt, ckpt.modules()["model.layers.0.self_attn.q_proj"]).shape == (64, 64)
    with pytest.raises(CheckpointNotFoundError, match="offline and not in the local Hub cache"):
        open_hub_checkpoint("org/tiny-mixtral", cache_dir=tmp_path)


def test_cli_inspect_and_validate_hub_repo(hub, tmp_path):
    env = dict(os.environ, HF_ENDPOINT=hub.url, HF_HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "ctformat", "inspect", "org/tiny-mixtral", "--json",
                        "--revision", "main"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["modules_quantized"] == 32
    r = subprocess.run([sys.executable, "-m", "ctformat", "validate", "org/bad-gate"], capture_output=True,
                       text=True, cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 1 and "TEN-09" in r.stdout
    r = subprocess.run([sys.executable, "-m", "ctformat", "inspect", "org/nope"], capture_output=True, text=True,
                       cwd=ROOT, env=env, timeout=120)
    assert r.returncode == 1 and "no such model on the Hub" in r.stderr and "Traceback" not in r.stderr
