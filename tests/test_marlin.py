"""The Marlin layout (spec §10): byte-exact with vLLM 0.33's reference functions (expected
tensors in fixtures/marlin/, computed by those functions from the wheel), exact round trips on
every real checkpoint, refusals before any output exists."""
from __future__ import annotations

import hashlib
import json
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import BAD, DEVICE, FIXTURES, REAL, REAL_FOLDERS, tree_snapshot
from ctformat.spec import MARLIN_LAYOUT
from ctformat import marlin as M
from ctformat.checkpoint import open_checkpoint
from ctformat.writer import save_checkpoint
from ctformat.convert import convert_to_ct, convert_to_dense, convert_to_marlin
from ctformat.errors import UnsupportedError
from ctformat.quant import compress
from ctformat.scheme import QuantScheme
from ctformat.validate import validate_checkpoint
from ctformat_cli.main import main

sys.path.insert(0, str(FIXTURES / "marlin"))
import marlin_inputs as inp  # noqa: E402

REF = load_file(FIXTURES / "marlin" / "vllm-0.33.0-reference.safetensors")
BIG = json.loads((FIXTURES / "marlin" / "vllm-0.33.0-reference.json").read_text())["big_cases"]
REAL_QUANTIZED = [p for p in REAL_FOLDERS if p.name != "dense"]
KERNELS = ["torch", "triton"]          # triton runs in the interpreter on a CPU-only machine


def marlin_on(kernel: str, tensors: dict, bits: int, gs) -> dict[str, torch.Tensor]:
    """to_marlin with the torch twin on the CPU, or the Triton kernel on DEVICE (CUDA, or the
    interpreter on a CPU-only machine)."""
    dev = "cpu" if kernel == "torch" else DEVICE
    out = M.to_marlin({k: v.to(dev) for k, v in tensors.items()}, bits, gs, kernel=kernel)
    return {k: v.cpu() for k, v in out.items()}


def ct_packed(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes [K, N] -> CT weight_packed [N, K*b/32] (value k at bits b*(k % (32/b)))."""
    t = q.T.contiguous().to(torch.uint8)
    if bits == 4:
        t = t[:, 0::2] | (t[:, 1::2] << 4)
    return t.contiguous().view(torch.int32)


def ct_inputs(case: tuple, expert: int = 0) -> dict[str, torch.Tensor]:
    """The CT tensors of one reference case: codes, scales, zero points, g_idx as CT stores them."""
    bits, k, n, gs, sdtype, asym, act, _ = case
    groups = 1 if gs == -1 else k // gs
    out = {"weight_packed": ct_packed(inp.q_weight(bits, k, n, expert), bits),
           "weight_scale": inp.scales(groups, n, sdtype, expert).T.contiguous()}
    if asym:     # CT I32 zero point, packed along N: its nibbles are the unsigned codes
        z = inp.zero_points(bits, groups, n, expert).to(torch.uint8)
        out["weight_zero_point"] = (z[:, 0::2] | (z[:, 1::2] << 4)).contiguous().view(torch.int32).T.contiguous()
    if act:
        out["weight_g_idx"] = inp.g_idx(k, gs, expert)
    return out


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("name", sorted(inp.CASES))
def test_layout_equals_vllm_reference_functions(name, kernel):
    case = inp.CASES[name]
    bits, k, n, gs, _, asym, act, experts = case
    got = [marlin_on(kernel, ct_inputs(case, e), bits, None if gs == -1 else gs) for e in range(max(experts, 1))]
    keys = sorted({key.rpartition(".")[2] for key in REF if key.startswith(name + ".")})
    assert keys == sorted(got[0]), keys
    for key in keys:
        mine = torch.stack([g[key] for g in got]) if experts else got[0][key]
        assert mine.dtype == REF[f"{name}.{key}"].dtype and torch.equal(mine, REF[f"{name}.{key}"]), key


@pytest.mark.parametrize("name", sorted(inp.CASES))
def test_layout_inverts_exactly(name):
    case = inp.CASES[name]
    bits, k, n, gs, sdtype, asym, act, experts = case
    src = ct_inputs(case)
    back = M.to_ct(M.to_marlin(src, bits, None if gs == -1 else gs), scale_dtype=getattr(torch, sdtype))
    assert back.pop("weight_shape").tolist() == [n, k]
    assert set(back) == set(src) and all(torch.equal(back[x], src[x]) for x in src)


def test_stacked_experts_repack_in_one_call_equals_reference():
    name = "moe4zp_e2_k128_n192_g64_bf16"
    case = inp.CASES[name]
    stacked = {key: torch.stack([ct_inputs(case, e)[key] for e in range(2)]) for key in ct_inputs(case)}
    for kernel in KERNELS:
        got = marlin_on(kernel, stacked, 4, 64)
        assert all(torch.equal(got[key], REF[f"{name}.{key}"]) for key in ("B", "s", "zp"))


@pytest.mark.parametrize("name", sorted(inp.BIG_CASES))
def test_mixtral_8x22b_sizes_equal_reference_digests(name):
    bits, k, n, gs, sdtype, *_ = inp.BIG_CASES[name]
    out = M.to_marlin(ct_inputs(inp.BIG_CASES[name]), bits, None if gs == -1 else gs)
    keys = sorted(key.rpartition(".")[2] for key in BIG if key.startswith(name + "."))
    assert keys == sorted(out)
    for key in keys:
        t, want = out[key], BIG[f"{name}.{key}"]
        t = t.view(torch.int16) if t.dtype in (torch.bfloat16, torch.float16) else t
        assert list(t.shape) == want["shape"]
        assert hashlib.sha256(t.numpy().tobytes()).hexdigest() == want["sha256"], key


@pytest.mark.parametrize("name", ["u4_k128_n128_g64_bf16", "u8_k128_n128_g64_f16"])
def test_stacked_w13_equals_reference_of_gate_and_up_as_one_weight(name, tmp_path):
    """vLLM's fused-MoE path repacks w13 = cat(gate, up) along N as one weight. convert
    --stack-experts repacks gate and up apart and concatenates: the reference of the whole."""
    bits, k, n, gs, *_ = case = inp.CASES[name]
    full, half = ct_inputs(case), n // 2
    scheme_json = {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": gs}
    p = "model.layers.0.block_sparse_moe.experts.0"
    t = {f"{p}.{part}.{key}": v[rows] for part, rows in (("w1", slice(0, half)), ("w3", slice(half, n)))
         for key, v in full.items()}
    t.update({f"{p}.w1.weight_shape": torch.tensor([half, k]), f"{p}.w3.weight_shape": torch.tensor([half, k])})
    down = (torch.randn(k, half, generator=torch.Generator().manual_seed(8)) * 0.02).to(full["weight_scale"].dtype)
    t.update({f"{p}.w2.{key}": v for key, v in compress(down, QuantScheme.from_json(scheme_json, where="t")).items()})
    q = {"quant_method": "compressed-tensors", "format": "pack-quantized",
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme_json}}}
    save_checkpoint(tmp_path / "src", t, {"model_type": "mixtral", "quantization_config": q})
    convert_to_marlin(tmp_path / "src", tmp_path / "m", device="cpu", stack_experts=True)
    got = load_file(tmp_path / "m" / "model.safetensors")
    for key in ("B", "s"):
        assert torch.equal(got[f"model.layers.0.block_sparse_moe.experts.w13.{key}"][0], REF[f"{name}.{key}"]), key


def test_worked_example_of_the_spec():
    u = ((torch.arange(16)[:, None] + 3 * torch.arange(64)[None, :]) % 16).to(torch.int32)
    b = M.repack(ct_packed(u, 4), 4).view(-1)
    assert [b[i].item() & 0xFFFFFFFF for i in (0, 4, 16)] == [0x19910880, 0x3BB32AA2, 0x4CC43BB3]


# -- checkpoints ---------------------------------------------------------------------------
def tensors_of(path) -> dict[str, torch.Tensor]:
    c = open_checkpoint(path)
    return {n: c.load(n) for n in c.tensors}


def assert_same_checkpoint(a, b) -> None:
    ta, tb = tensors_of(a), tensors_of(b)
    assert sorted(ta) == sorted(tb)
    for n in ta:
        assert ta[n].dtype == tb[n].dtype and torch.equal(ta[n], tb[n]), n
    assert json.loads((a / "config.json").read_text()) == json.loads((b / "config.json").read_text())


@pytest.mark.parametrize("stack", [False, True], ids=["per-module", "stacked"])
@pytest.mark.parametrize("src", REAL_QUANTIZED + [FIXTURES / "tiny-mixtral-g64"],
                         ids=lambda p: f"{p.parent.name}/{p.name}")
def test_round_trip_is_the_identity_and_dequantizes_the_same(src, stack, tmp_path):
    has_g_idx = any(n.endswith("weight_g_idx") for n in open_checkpoint(src).tensors)
    if stack and has_g_idx:
        with pytest.raises(UnsupportedError, match=r"MCV-06"):
            convert_to_marlin(src, tmp_path / "m", device="cpu", stack_experts=True)
        assert not (tmp_path / "m").exists()
        return
    before = tree_snapshot(src)
    stats = convert_to_marlin(src, tmp_path / "m", device="cpu", stack_experts=stack, max_shard_size=1_000_000).to_json()
    assert tree_snapshot(src) == before and stats["modules_repacked"] > 0
    assert validate_checkpoint(tmp_path / "m", deep=True).issues == ()
    convert_to_ct(tmp_path / "m", tmp_path / "ct", device="cpu")
    assert_same_checkpoint(src, tmp_path / "ct")
    convert_to_dense(tmp_path / "m", tmp_path / "d1", device="cpu")        # dequantize reads Marlin directly
    convert_to_dense(src, tmp_path / "d2", device="cpu")
    assert_same_checkpoint(tmp_path / "d1", tmp_path / "d2")


def test_marlin_config_says_what_the_files_hold(tmp_path):
    src = FIXTURES / "tiny-mixtral-g64"
    convert_to_marlin(src, tmp_path / "m", device="cpu", stack_experts=True)
    q = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    source = json.loads((src / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "ctformat-marlin" and "checkpoint_format" not in q
    assert q["marlin"] == {"layout": MARLIN_LAYOUT, "compressed_tensors": source, "source_dtypes":
                           {"weight_scale": "BF16", "weight_shape": "I64"}, "scale_dtype": "BF16",
                           "stacked_experts": {f"model.layers.{i}.block_sparse_moe.experts": {
                               "experts": 4, "w13": ["w1", "w3"], "w2": "w2"} for i in range(2)}}
    c = open_checkpoint(tmp_path / "m")
    w13 = c.tensors["model.layers.0.block_sparse_moe.experts.w13.B"]
    assert (w13.dtype, w13.shape) == ("I32", (4, 128 // 16, 2 * 128 * 4 // 2))
    assert c.tensors["model.layers.0.block_sparse_moe.experts.w2.s"].shape == (4, 2, 128)


W4_G128 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 128}


def test_legacy_subset_gets_the_legacy_tags_and_loads_back(tmp_path):
    src = small_ckpt(tmp_path / "src", W4_G128, shape=(256, 384))      # dense, N % 256 == 0, K % 128 == 0
    stats = convert_to_marlin(src, tmp_path / "m", device="cpu", scale_dtype=torch.float16).to_json()   # exact
    q = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert stats["legacy_format"] and {k: q[k] for k in ("quant_method", "checkpoint_format", "is_marlin_format",
                                                         "bits", "group_size", "desc_act", "sym")} == {
        "quant_method": "gptq", "checkpoint_format": "marlin", "is_marlin_format": True, "bits": 4,
        "group_size": 128, "desc_act": False, "sym": True}
    assert q["marlin"]["scale_dtype"] == "F16" and q["marlin"]["source_dtypes"]["weight_scale"] == "BF16"
    c = open_checkpoint(tmp_path / "m")
    assert {t.dtype for n, t in c.tensors.items() if n.endswith(".s")} == {"F16"}
    convert_to_ct(tmp_path / "m", tmp_path / "ct", device="cpu")
    assert_same_checkpoint(src, tmp_path / "ct")                          # bf16 scales restored
    assert [i.rule for i in validate_checkpoint(tmp_path / "m", target="vllm").issues] == ["VLLM-05"]


@pytest.mark.parametrize("case", ["moe", "n64", "k192"])
def test_legacy_tags_only_where_every_legacy_reader_reads(case, tmp_path):
    """MoE experts (vLLM <= 0.10.1 has no Marlin MoE method), N % 256 or K % 128 not zero
    (AutoGPTQ, IST-DASLab): ctformat-marlin, even with F16 scales, group 128, 4-bit symmetric."""
    if case == "moe":
        src = REAL / "llmcompressor-0.14" / "w4a16-sym-g128"
    elif case == "n64":
        src = small_ckpt(tmp_path / "src", W4_G128, shape=(64, 128))
    else:
        src = small_ckpt(tmp_path / "src", dict(W4_G128, strategy="channel", group_size=None), shape=(256, 192))
    stats = convert_to_marlin(src, tmp_path / "m", device="cpu", scale_dtype=torch.float16).to_json()
    q = json.loads((tmp_path / "m" / "config.json").read_text())["quantization_config"]
    assert stats["legacy_format"] is False and q["quant_method"] == "ctformat-marlin" and "bits" not in q
    assert validate_checkpoint(tmp_path / "m").ok


# -- refusals ------------------------------------------------------------------------------
def small_ckpt(path, scheme_json: dict, shape=(64, 128), scale=None):
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(3)) * 0.02).to(torch.bfloat16)
    scheme = QuantScheme.from_json(scheme_json, where="w")
    t = {f"layer.{k}": v for k, v in compress(w, scheme, scale=scale).items()}
    q = {"quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.19.0",
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": scheme_json}}}
    save_checkpoint(path, t, {"model_type": "llama", "quantization_config": q})
    return path


W4 = {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}


@pytest.mark.parametrize("rule, make, kw", [
    ("MCV-01", lambda p: FIXTURES / "int3-g32-dense", {}),
    ("MCV-02", lambda p: small_ckpt(p, dict(W4, group_size=16)), {}),
    ("MCV-02", lambda p: small_ckpt(p, dict(W4, strategy="tensor", group_size=None)), {}),
    ("MCV-02", lambda p: small_ckpt(p, dict(W4, group_size=256), shape=(64, 512)), {}),   # two groups of 256
    ("MCV-03", lambda p: small_ckpt(p, W4, shape=(96, 128)), {}),          # N % 64
    ("MCV-03", lambda p: FIXTURES / "tiny-mixtral", {}),
    ("MCV-03", lambda p: small_ckpt(p, W4, shape=(64, 64)), {}),
    ("MCV-04", lambda p: small_ckpt(p, dict(W4, num_bits=8, symmetric=False)), {}),
    ("MCV-05", lambda p: small_ckpt(p, W4, scale=torch.full((64, 4), 1e-7, dtype=torch.bfloat16)),
     {"scale_dtype": torch.float16}),
    ("MCV-06", lambda p: FIXTURES / "int4-g32-actorder", {"stack_experts": True}),
    ("MCV-07", lambda p: BAD / "VLLM-05", {}),
    ("MCV-07", lambda p: REAL / "llmcompressor-0.14" / "dense", {}),
])
def test_unsupported_input_is_refused_before_any_output(rule, make, kw, tmp_path):
    src = make(tmp_path / "src")
    if rule == "MCV-06":           # a MoE with one expert missing
        src = small_moe_missing_expert(tmp_path / "moe")
    with pytest.raises(UnsupportedError, match=rf"\[{rule}\]$"):
        convert_to_marlin(src, tmp_path / "out", device="cpu", **kw)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def small_moe_missing_expert(path):
    w = torch.zeros(64, 128, dtype=torch.bfloat16) + 0.01
    scheme = QuantScheme.from_json(W4, where="w")
    t = {}
    for e in (0, 1, 3):
        for part in ("w1", "w2", "w3"):
            t.update({f"l.0.experts.{e}.{part}.{k}": v for k, v in compress(w, scheme).items()})
    q = {"quant_method": "compressed-tensors", "format": "pack-quantized",
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": W4}}}
    save_checkpoint(path, t, {"model_type": "mixtral", "quantization_config": q})
    return path


def test_lossy_scales_pass_when_asked_and_restore_to_the_cast_values(tmp_path):
    src = small_ckpt(tmp_path / "src", W4, scale=torch.full((64, 4), 1e-7, dtype=torch.bfloat16))
    convert_to_marlin(src, tmp_path / "m", device="cpu", scale_dtype=torch.float16, allow_lossy_scales=True)
    assert open_checkpoint(tmp_path / "m").tensors["layer.s"].dtype == "F16"


def cli(args: list[str]) -> int:
    try:
        main(args)
    except SystemExit as exc:
        return exc.code or 0
    return 0


def test_cli_convert_to_marlin_and_back(tmp_path, capsys):
    src = FIXTURES / "tiny-mixtral-g64"
    assert cli(["convert", str(src), str(tmp_path / "m"), "--to", "marlin", "--stack-experts", "--json"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["modules_repacked"] == 2 * 4 + 2 * 2 and stats["legacy_format"] is False
    assert cli(["convert", str(tmp_path / "m"), str(tmp_path / "ct"), "--to", "compressed-tensors"]) == 0
    assert_same_checkpoint(src, tmp_path / "ct")
    assert cli(["convert", str(FIXTURES / "tiny-mixtral"), str(tmp_path / "x"), "--to", "marlin"]) == 1
    assert "[MCV-03]" in capsys.readouterr().err
    assert cli(["convert", str(src), str(tmp_path / "x"), "--to", "dense", "--stack-experts"]) == 2
    assert not (tmp_path / "x").exists()


def test_inspect_reports_the_marlin_layout(tmp_path, capsys):
    convert_to_marlin(FIXTURES / "tiny-mixtral-g64", tmp_path / "m", device="cpu")
    assert cli(["inspect", str(tmp_path / "m"), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    src = open_checkpoint(FIXTURES / "tiny-mixtral-g64")
    assert d["format"] == "marlin" and d["marlin"]["layout"] == MARLIN_LAYOUT and not d["marlin"]["legacy_readers"]
    assert d["parameters"]["total"] == sum(t.numel for t in src.tensors.values() if not t.name.endswith(
        ("weight_packed", "weight_scale", "weight_shape"))) + d["parameters"]["quantized"]
    assert d["modules_quantized"] == sum(m.quantized for m in src.modules().values())


@pytest.mark.slow
@pytest.mark.parametrize("target", ["marlin", "compressed-tensors"])
def test_sigkill_while_writing_never_leaves_a_checkpoint_lookalike(tmp_path, target):
    """Killed once its hidden temporary folder exists (it is writing), at several delays after:
    OUT is absent, or whole if the run got there first."""
    import subprocess
    import time

    from conftest import ROOT
    from test_convert import big_checkpoint
    src = big_checkpoint(tmp_path / "src")
    if target == "compressed-tensors":
        convert_to_marlin(src, tmp_path / "m", device="cpu")
        src = tmp_path / "m"
    killed_mid_run = 0
    for delay in (0.0, 0.1, 0.4):
        out = tmp_path / f"out-{delay}"
        proc = subprocess.Popen([sys.executable, "-m", "ctformat", "convert", str(src), str(out), "--to", target,
                                 "--device", "cpu", "--max-shard-size", "5MB"], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while not list(tmp_path.glob(f".out-{delay}*")) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(delay)
        proc.kill()
        proc.wait()
        if out.exists():            # the run finished before the kill: then it must be whole
            assert validate_checkpoint(out).ok and len(open_checkpoint(out).tensors) == 48 * (2 if target == "marlin"
                                                                                              else 3), delay
        else:
            killed_mid_run += 1
        leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(f".out-{delay}")]
        assert all(".tmp-" in n for n in leftovers), leftovers   # only a hidden temp folder may remain
    assert killed_mid_run, "no kill landed while the conversion was writing"


@pytest.mark.parametrize("target", ["marlin", "compressed-tensors"])
def test_shard_corrupted_mid_run_leaves_no_output(tmp_path, monkeypatch, target):
    """Headers fine at open, data gone by the time it is read: the run stops, nothing at OUT."""
    import shutil
    src = tmp_path / "src"
    if target == "marlin":
        shutil.copytree(FIXTURES / "tiny-mixtral-g64", src)
    else:
        convert_to_marlin(FIXTURES / "tiny-mixtral-g64", src, device="cpu")
    files = type(open_checkpoint(src).files)
    readinto, calls = files.readinto, {"n": 0}

    def flaky(self, name, start, buf):
        calls["n"] += 1
        if calls["n"] == 20:
            (src / name).write_bytes((src / name).read_bytes()[:start])     # truncated under our feet
        return readinto(self, name, start, buf)
    monkeypatch.setattr(files, "readinto", flaky)
    convert = convert_to_marlin if target == "marlin" else convert_to_ct
    with pytest.raises(Exception, match=r"truncated.*\[HDR-06\]"):
        convert(src, tmp_path / "o", device="cpu")
    assert calls["n"] >= 20 and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_truncated_shard_is_refused_and_leaves_nothing(tmp_path):
    convert_to_marlin(FIXTURES / "tiny-mixtral-g64", tmp_path / "m", device="cpu", max_shard_size=100_000)
    shard = sorted((tmp_path / "m").glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-64])
    with pytest.raises(Exception, match=r"HDR-06"):
        convert_to_ct(tmp_path / "m", tmp_path / "out", device="cpu")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
