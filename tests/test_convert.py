"""convert --to dense: transformers loads the result with every key, the weights are
ctformat's dequantization (equal to compressed-tensors'), and failures leave nothing."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open

from conftest import BAD, FIXTURES, REAL_FOLDERS, ROOT, cli_in_process, tree_snapshot
from ctformat.dequant import dequantize_module
from ctformat.checkpoint import open_checkpoint
from ctformat.writer import save_checkpoint
from ctformat.convert import convert_to_dense
from ctformat.errors import CtFormatError, HeaderError, OutputExistsError
from ctformat.validate import validate_checkpoint

SOURCES = [FIXTURES / n for n in ("tiny-mixtral", "tiny-mixtral-ct019", "int4-g32-asym-i8zp", "int4-g32-actorder",
                                  "int3-g32-padded", "mixed-groups")]
SOURCES += [p for p in REAL_FOLDERS if p.name != "dense"]


def dense_tensors(path):
    index = path / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    out = {}
    for f in files:
        with safe_open(path / f, framework="pt") as fh:
            out.update({k: fh.get_tensor(k) for k in fh.keys()})
    return out


@pytest.mark.parametrize("src", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_dense_output_loads_in_transformers_with_ctformat_weights(src, tmp_path):
    transformers = pytest.importorskip("transformers")
    before = tree_snapshot(src)
    out = tmp_path / "dense"
    stats = convert_to_dense(src, out, device="cpu", max_shard_size=1_500_000).to_json()
    assert tree_snapshot(src) == before                          # the input is never touched
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "bfloat16"
    ckpt = open_checkpoint(src)
    quantized = {p: m for p, m in ckpt.modules().items() if m.quantized}
    assert stats["modules_dequantized"] == len(quantized)
    written = dense_tensors(out)
    renames = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
    for prefix, m in quantized.items():
        head, _, leaf = prefix.rpartition(".")
        name = f"{head}.{renames.get(leaf, leaf) if '.experts.' in prefix else leaf}.weight"
        assert torch.equal(written[name], dequantize_module(ckpt, m)), name
    if "model.embed_tokens.weight" not in ckpt.tensors:
        return                       # a few modules, not a whole model: nothing for transformers to load
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True,
                                                                    dtype=torch.bfloat16)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    sd = model.state_dict()
    assert torch.equal(sd["model.layers.0.self_attn.q_proj.weight"], written["model.layers.0.self_attn.q_proj.weight"])
    if "model.layers.0.mlp.experts.gate_up_proj" in sd:           # transformers fuses w1|w3 per expert
        e = "model.layers.0.block_sparse_moe.experts.1"
        fused = torch.cat([written[f"{e}.w1.weight"], written[f"{e}.w3.weight"]])
        assert torch.equal(sd["model.layers.0.mlp.experts.gate_up_proj"][1], fused)
        assert torch.equal(sd["model.layers.0.mlp.experts.down_proj"][1], written[f"{e}.w2.weight"])


def test_keep_names_keeps_expert_names(tmp_path):
    convert_to_dense(FIXTURES / "tiny-mixtral-ct019", tmp_path / "o", device="cpu", keep_names=True)
    assert "model.layers.0.block_sparse_moe.experts.0.gate_proj.weight" in dense_tensors(tmp_path / "o")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dtype_is_scale_dtype_result_cast(dtype, tmp_path):
    convert_to_dense(FIXTURES / "int4-g32", tmp_path / "o", device="cpu", dtype=dtype)
    ckpt = open_checkpoint(FIXTURES / "int4-g32")
    m = ckpt.modules()["model.layers.0.self_attn.v_proj"]
    got = dense_tensors(tmp_path / "o")["model.layers.0.self_attn.v_proj.weight"]
    assert got.dtype == dtype and torch.equal(got, dequantize_module(ckpt, m).to(dtype))


@pytest.mark.parametrize("rule", ["HDR-06", "TEN-01", "DATA-05", "FILE-05"])
def test_bad_input_leaves_no_output(rule, tmp_path):
    with pytest.raises(CtFormatError, match=rf"\[{rule}\]"):
        convert_to_dense(BAD / rule, tmp_path / "o", device="cpu")
    assert list(tmp_path.iterdir()) == []


def test_existing_output_refused_before_work(tmp_path):
    (tmp_path / "o").mkdir()
    with pytest.raises(OutputExistsError):
        convert_to_dense(FIXTURES / "int4-g32", tmp_path / "o", device="cpu")


def test_cuda_without_gpu_is_a_clear_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(CtFormatError, match="no CUDA device"):
        convert_to_dense(FIXTURES / "int4-g32", tmp_path / "o", device="cuda")


def test_shard_corrupted_mid_run_leaves_no_output(tmp_path, monkeypatch):
    """Headers fine at open, data gone by the time it is read: the run stops, nothing at OUT."""
    import shutil
    src = tmp_path / "src"
    shutil.copytree(FIXTURES / "tiny-mixtral", src)
    ckpt_load = open_checkpoint(src).files.readinto
    calls = {"n": 0}

    def flaky(self, name, start, buf):
        calls["n"] += 1
        if calls["n"] == 20:
            (src / name).write_bytes((src / name).read_bytes()[:start])     # truncated under our feet
        return ckpt_load.__func__(self, name, start, buf)
    monkeypatch.setattr(type(open_checkpoint(src).files), "readinto", flaky)
    with pytest.raises(HeaderError, match=r"truncated.*\[HDR-06\]"):
        convert_to_dense(src, tmp_path / "o", device="cpu")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def big_checkpoint(root):
    """48 int4 modules of 1024x2048 (random words): ~200 MB of bf16 output, a second or two."""
    g = torch.Generator().manual_seed(0)
    t = {}
    for k in range(48):
        p = f"model.layers.{k}.mlp.down_proj"
        t[f"{p}.weight_packed"] = torch.randint(-2**31, 2**31 - 1, (1024, 256), generator=g, dtype=torch.int32)
        t[f"{p}.weight_scale"] = torch.rand(1024, 16, generator=g).to(torch.bfloat16) + 0.01
        t[f"{p}.weight_shape"] = torch.tensor([1024, 2048])
    config = json.loads((FIXTURES / "int4-g32" / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"]["group_size"] = 128
    return save_checkpoint(root, t, config, max_shard_size=8_000_000)


def test_sigkill_at_any_moment_never_leaves_a_checkpoint_lookalike(tmp_path):
    src = big_checkpoint(tmp_path / "src")
    for delay in (0.3, 0.8, 1.5, 2.5):
        out = tmp_path / f"out-{delay}"
        proc = subprocess.Popen([sys.executable, "-m", "ctformat", "convert", str(src), str(out), "--to", "dense",
                                 "--device", "cpu", "--max-shard-size", "20MB"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():            # the run finished before the kill: then it must be whole
            report = validate_checkpoint(out)
            assert report.ok and len(open_checkpoint(out).tensors) == 48, delay
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".out-{delay}")]
        assert all(".tmp-" in n for n in leftovers)   # only a hidden temp folder may remain
    assert any(not (tmp_path / f"out-{d}").exists() for d in (0.3, 0.8)), "no kill landed mid-run"


def test_cli_convert_reports_and_refuses(tmp_path):
    def run(*a):
        return cli_in_process("convert", *a)
    r = run(str(FIXTURES / "tiny-mixtral"), str(tmp_path / "o"), "--to", "dense", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["modules_dequantized"] == 32
    r = run(str(FIXTURES / "tiny-mixtral"), str(tmp_path / "o"), "--to", "dense")
    assert r.returncode == 1 and "already exists" in r.stderr and "Traceback" not in r.stderr
    r = run(str(BAD / "HDR-01"), str(tmp_path / "p"), "--to", "dense")
    assert r.returncode == 1 and "[HDR-01]" in r.stderr and not (tmp_path / "p").exists()
    assert run(str(FIXTURES / "tiny-mixtral"), str(tmp_path / "q"), "--to", "marlin-9").returncode == 2


def test_dequantize_checkpoint_in_memory_equals_files_written(tmp_path):
    from ctformat.convert import dequantize_checkpoint
    state = dequantize_checkpoint(FIXTURES / "tiny-mixtral-ct019", device="cpu")
    convert_to_dense(FIXTURES / "tiny-mixtral-ct019", tmp_path / "o", device="cpu")
    written = dense_tensors(tmp_path / "o")
    assert state.keys() == written.keys() and all(torch.equal(state[k], written[k]) for k in state)
