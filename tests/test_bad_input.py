"""Odd and hostile input found in review: each gives a rule-tagged error (or a clean
result), never a crash, and nothing is left at OUT."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, ROOT, cli_in_process
from ctformat.dequant import dequantize_module
from ctformat.checkpoint import open_checkpoint
from ctformat.writer import save_checkpoint
from ctformat.convert import convert_to_dense
from ctformat.errors import CtFormatError, OutputExistsError, TensorError, UsageError
from ctformat.quant import compress
from ctformat.scheme import QuantScheme
from ctformat.validate import validate_checkpoint
from make_fixtures import rewrite_header


def cli(*args, env=None, timeout=None):
    """In this process, unless the case needs its own environment or a time limit (a hang)."""
    if env is None and timeout is None:
        return cli_in_process(*args)
    return subprocess.run([sys.executable, "-m", "ctformat", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=timeout or 120, env=env)


def copy(tmp_path, name="int4-g32"):
    dst = tmp_path / "m"
    shutil.copytree(FIXTURES / name, dst)
    return dst


def edit_config(path, fn):
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_g_idx_out_of_range_is_data_03_everywhere(tmp_path):
    src = copy(tmp_path, "int4-g32-actorder")
    ckpt = open_checkpoint(src)
    t = {k: ckpt.load(i.name) for k, i in ckpt.modules()["model.layers.0.self_attn.o_proj"].tensors.items()}
    t["weight_g_idx"][0] = 10**6
    tensors = {n: ckpt.load(n) for n in ckpt.tensors}
    tensors["model.layers.0.self_attn.o_proj.weight_g_idx"] = t["weight_g_idx"]
    bad = save_checkpoint(tmp_path / "bad", tensors, json.loads((src / "config.json").read_text()))
    with pytest.raises(TensorError, match=r"\[DATA-03\]"):
        dequantize_module(open_checkpoint(bad), open_checkpoint(bad).modules()["model.layers.0.self_attn.o_proj"])
    r = cli("convert", str(bad), str(tmp_path / "out"), "--to", "dense")
    assert r.returncode == 1 and "[DATA-03]" in r.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("key,value,rule", [("actorder", ["group"], "CFG-07"), ("observer", ["x"], "CFG-06"),
                                             ("scale_dtype", ["bf16"], "CFG-06"),
                                             ("scale_dtype", "float8_e4m3fn", "FMT-01"), ("dynamic", "yes", "CFG-06")])
def test_odd_typed_weights_args_are_config_errors(tmp_path, key, value, rule):
    src = copy(tmp_path)
    edit_config(src, lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].__setitem__(key, value))
    for cmd in (("inspect", str(src)), ("validate", str(src)), ("convert", str(src), str(tmp_path / "o"), "--to", "dense")):
        r = cli(*cmd)
        assert r.returncode == 1 and "Internal error" not in r.stderr, (cmd, r.stderr)
        assert rule in r.stderr + r.stdout, (cmd, r.stdout, r.stderr)
    assert not (tmp_path / "o").exists()


def test_odd_model_type_and_version_do_not_crash(tmp_path):
    src = copy(tmp_path, "tiny-mixtral")
    edit_config(src, lambda c: (c.__setitem__("model_type", ["m"]), c["quantization_config"].__setitem__("version", 18)))
    assert cli("inspect", str(src)).returncode == 0
    assert cli("validate", str(src), "--target", "transformers").returncode == 0
    r = cli("convert", str(src), str(tmp_path / "o"), "--to", "dense")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("case,rule", [("dtype_list", "HDR-03"), ("deep_nesting", "HDR-02")])
def test_odd_headers_are_header_errors(tmp_path, case, rule):
    src = copy(tmp_path)
    shard = src / "model.safetensors"
    if case == "dtype_list":
        rewrite_header(shard, lambda h: h["lm_head.weight"].__setitem__("dtype", ["BF16"]))
    else:
        raw = shard.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        nested = ("[" * 100_000 + "]" * 100_000).encode()
        shard.write_bytes(struct.pack("<Q", len(nested)) + nested + raw[8 + n:])
    r = cli("inspect", str(src))
    assert r.returncode == 1 and f"[{rule}]" in r.stderr and "Internal error" not in r.stderr


@pytest.mark.parametrize("name", [".", "./", "sub/"])
def test_index_names_that_are_folders_are_refused(tmp_path, name):
    src = copy(tmp_path, "tiny-mixtral")
    idx = json.loads((src / "model.safetensors.index.json").read_text())
    idx["weight_map"]["lm_head.weight"] = name
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    r = cli("validate", str(src), "--json")
    assert r.returncode == 1 and json.loads(r.stdout)["issues"][0]["rule"] == "FILE-04"


def test_scalar_quantized_tensors_do_not_crash_inspect(tmp_path):
    t = {f"m.weight_{s}": torch.zeros((), dtype=d) for s, d in
         (("packed", torch.int32), ("scale", torch.bfloat16), ("shape", torch.int64))}
    src = save_checkpoint(tmp_path / "m", t, json.loads((FIXTURES / "int4-g32" / "config.json").read_text()))
    assert cli("inspect", str(src)).returncode == 0
    assert cli("validate", str(src)).returncode == 1


def test_config_json_that_is_a_folder_is_cfg_01(tmp_path):
    src = copy(tmp_path)
    (src / "config.json").unlink()
    (src / "config.json").mkdir()
    report = validate_checkpoint(src)
    assert {i.rule for i in report.issues} == {"CFG-01"}


def test_unreachable_hub_is_a_clear_error(tmp_path):
    import os
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HOME=str(tmp_path), HF_HUB_ETAG_TIMEOUT="2")
    r = cli("inspect", "org/does-not-exist-locally", env=env)
    assert r.returncode == 1 and "could not be reached" in r.stderr and "Internal error" not in r.stderr


@pytest.mark.parametrize("device", ["foo", "meta", "cuda:x"])
def test_bad_device_is_a_usage_error(tmp_path, device):
    with pytest.raises(UsageError):
        convert_to_dense(FIXTURES / "int4-g32", tmp_path / "o", device=device)
    assert cli("convert", str(FIXTURES / "int4-g32"), str(tmp_path / "o"), "--to", "dense", "--device",
               device).returncode == 2
    assert not (tmp_path / "o").exists()


def test_stacked_experts_with_one_tensor_scale_validate_and_convert(tmp_path):
    s = QuantScheme.from_json({"num_bits": 4, "strategy": "tensor"}, where="t")
    w = (torch.randn(4, 24, 48) * 0.02).to(torch.bfloat16)
    t = {f"model.layers.0.mlp.experts.{k}": v for k, v in compress(w, s).items()}
    config = json.loads((FIXTURES / "int4-g32" / "config.json").read_text())
    config["quantization_config"]["config_groups"]["group_0"]["weights"].update(strategy="tensor", group_size=None)
    src = save_checkpoint(tmp_path / "m", t, config)
    assert validate_checkpoint(src, deep=True).ok
    convert_to_dense(src, tmp_path / "o", device="cpu")


def test_convert_copies_sub_folders_but_no_weights(tmp_path):
    src = copy(tmp_path)
    (src / "tokenizer_dir").mkdir()
    (src / "tokenizer_dir" / "vocab.txt").write_text("a\nb\n")
    (src / "tokenizer_dir" / "stray.safetensors").write_bytes(b"x")
    convert_to_dense(src, tmp_path / "o", device="cpu")
    assert (tmp_path / "o" / "tokenizer_dir" / "vocab.txt").read_text() == "a\nb\n"
    assert not (tmp_path / "o" / "tokenizer_dir" / "stray.safetensors").exists()


def test_convert_single_file_beside_itself(tmp_path):
    src = copy(tmp_path)
    convert_to_dense(src / "model.safetensors", src / "dense", device="cpu")
    assert (src / "dense" / "model.safetensors").exists() and (src / "dense" / "config.json").exists()
    with pytest.raises(OutputExistsError, match="overlaps the input"):
        convert_to_dense(src / "model.safetensors", src, device="cpu", force=True)
    assert (src / "model.safetensors").exists()


def test_library_errors_are_ctformat_errors():
    assert issubclass(UsageError, CtFormatError) and UsageError.exit_code == 2


def marlin_copy(tmp_path, *flags):
    out = tmp_path / "marlin"
    r = cli("convert", str(FIXTURES / "tiny-mixtral-g64"), str(out), "--to", "marlin", "--device", "cpu", *flags)
    assert r.returncode == 0, r.stderr
    return out


def mblock(cfg):
    return cfg["quantization_config"]["marlin"]


@pytest.mark.parametrize("role,code", [("weight_scale", "XX"), ("weight_scale", "I32"), ("weight_shape", ["I64"]),
                                       ("weight_shape", "F32")])
def test_marlin_source_dtypes_that_are_no_dtype_of_the_role_are_mrl_01(tmp_path, role, code):
    src = marlin_copy(tmp_path)
    edit_config(src, lambda c: mblock(c)["source_dtypes"].__setitem__(role, code))
    for cmd in (("validate", str(src)), ("convert", str(src), str(tmp_path / "o"), "--to", "compressed-tensors")):
        r = cli(*cmd)
        assert r.returncode == 1 and "MRL-01" in r.stderr + r.stdout and "Internal error" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("code,rule", [("F16", "MRL-04"), ("F32", "MRL-01"), (["BF16"], "MRL-01")])
def test_marlin_scale_dtype_that_is_not_the_files_is_refused(tmp_path, code, rule):
    src = marlin_copy(tmp_path)
    edit_config(src, lambda c: mblock(c).__setitem__("scale_dtype", code))
    r = cli("validate", str(src), "--json")
    assert r.returncode == 1 and {i["rule"] for i in json.loads(r.stdout)["issues"]} == {rule}
    r = cli("convert", str(src), str(tmp_path / "o"), "--to", "compressed-tensors")
    assert r.returncode == 1 and f"[{rule}]" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


E0 = "model.layers.0.block_sparse_moe.experts"


@pytest.mark.parametrize("case", ["missing", "experts_3", "experts_true", "w13_same", "w2_is_w1", "attn_entry"])
def test_marlin_stacked_experts_that_do_not_fit_the_tensors_are_refused(tmp_path, case):
    src = marlin_copy(tmp_path, "--stack-experts")
    entry = {"experts": 4, "w13": ["w1", "w3"], "w2": "w2"}
    edits = {"missing": lambda st: st.pop(E0), "experts_3": lambda st: st[E0].__setitem__("experts", 3),
             "experts_true": lambda st: st[E0].__setitem__("experts", True),
             "w13_same": lambda st: st[E0].__setitem__("w13", ["w1", "w1"]),
             "w2_is_w1": lambda st: st[E0].__setitem__("w2", "w1"),
             "attn_entry": lambda st: st.__setitem__("model.layers.0.self_attn", dict(entry, experts=1, w13=["q_proj", "k_proj"], w2="v_proj"))}
    edit_config(src, lambda c: edits[case](mblock(c)["stacked_experts"]))
    for to in ("dense", "compressed-tensors"):
        r = cli("convert", str(src), str(tmp_path / "o"), "--to", to, "--device", "cpu", timeout=60)
        assert "Internal error" not in r.stderr, r.stderr
        if case == "attn_entry":        # names no stacked module: nothing to split, converts
            assert r.returncode == 0, r.stderr
            shutil.rmtree(tmp_path / "o")
        else:
            assert r.returncode == 1 and ("[MRL-06]" in r.stderr or "[MRL-01]" in r.stderr), r.stderr
            assert not (tmp_path / "o").exists()
    if case != "attn_entry":
        assert cli("validate", str(src)).returncode == 1


def test_validate_and_errors_keep_bracketed_text(tmp_path):
    src = marlin_copy(tmp_path, "--stack-experts")
    edit_config(src, lambda c: mblock(c)["stacked_experts"][E0].__setitem__("w2", "w1"))
    r = cli("validate", str(src))
    assert "w13: [gate, up]" in r.stdout
    assert "w13: [gate, up]" in cli("inspect", str(src)).stderr


def test_writer_failure_with_a_full_queue_does_not_hang(tmp_path, monkeypatch):
    import threading
    from ctformat import writer
    def fail(self, name, t):          # slow enough that the next result already waits in the queue
        import time
        time.sleep(0.5)
        raise OSError("disk full")
    monkeypatch.setattr(writer.PieceWriter, "write", fail)     # the writer convert uses
    box = []
    th = threading.Thread(target=lambda: box.append(pytest.raises(OSError, convert_to_dense, FIXTURES / "tiny-mixtral",
                                                                  tmp_path / "o", device="cpu")), daemon=True)
    th.start()
    th.join(60)
    assert not th.is_alive() and box and not (tmp_path / "o").exists()


def test_stacked_shapes_read_with_swapped_headers_are_mrl_06(tmp_path):
    """The same bytes under another [E, K/16, ...] shape: each part looks fine alone, but w13
    (H -> 2I) and w2 (I -> H) then disagree on H and I."""
    src = marlin_copy(tmp_path, "--stack-experts")
    w13 = "model.layers.0.block_sparse_moe.experts.w13"

    def swap(h):
        h[f"{w13}.B"]["shape"], h[f"{w13}.s"]["shape"] = [4, 16, 256], [4, 4, 128]
    rewrite_header(src / "model.safetensors", swap)
    r = cli("validate", str(src))
    assert r.returncode == 1 and "MRL-06" in r.stdout and "disagree" in r.stdout
    r = cli("convert", str(src), str(tmp_path / "o"), "--to", "compressed-tensors", "--device", "cpu", timeout=60)
    assert r.returncode == 1 and "[MRL-06]" in r.stderr and not (tmp_path / "o").exists()
