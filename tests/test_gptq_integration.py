"""GPTQ and AWQ checkpoints through every command (spec/gptq-awq.md): the reader's families and
tensor sets, inspect, validate (rules and --target vllm), convert --to gptq/awq/dense/
compressed-tensors through the CLI, Mixtral names for GPTQModel, and run/compare giving the
source's logits bit for bit."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import FIXTURES, REAL, cli, tree_snapshot
from ctformat.checkpoint import CT, GPTQ_FAMILIES, MARLIN, open_checkpoint
from ctformat.convert import convert
from ctformat.errors import UnsupportedError
from ctformat.inference import compare, load_model
from ctformat.names import loader_name
from ctformat.summary import summarize
from ctformat.to_dense import dequantize_checkpoint
from ctformat.validate import validate_checkpoint
from ctformat.writer import save_checkpoint

E014 = REAL / "llmcompressor-0.14"
E041 = REAL / "llmcompressor-0.4.1"
IDS = torch.tensor([[1, 5, 9, 42, 3, 200, 17, 8]])




@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """tiny-mixtral (w1/w2/w3 era) and the llm-compressor 0.14 checkpoint (gate_proj era, asym
    sibling) in every target."""
    root = tmp_path_factory.mktemp("gptq")
    out = {}
    for name, src in (("tiny", FIXTURES / "tiny-mixtral"), ("e014", E014 / "w4a16-sym-g128"),
                      ("asym", E014 / "w4a16-asym-g128"), ("act", E041 / "w4a16-gptq-actorder-group-g128")):
        for target in ("gptq", "awq"):
            if name == "act" and target == "awq":
                continue
            out[name, target] = root / f"{name}-{target}"
            convert(src, out[name, target], to=target, device="cpu")
        out[name] = src
    return out


# -- reading -----------------------------------------------------------------------------
def test_family_decides_the_tensor_set(outputs):
    g = open_checkpoint(outputs["act", "gptq"])
    assert g.family == "gptq" and g.quant is None and g.marlin is None
    m = g.modules()["model.layers.0.self_attn.q_proj"]
    assert m.quantized and m.is_gptq and not m.is_marlin            # g_idx and scales are GPTQ's here
    assert set(m.tensors) == {"qweight", "qzeros", "scales", "g_idx"} and m.gptq.desc_act
    assert open_checkpoint(outputs["tiny", "awq"]).family == "awq"
    assert open_checkpoint(FIXTURES / "tiny-mixtral").family == CT
    assert open_checkpoint(E014 / "dense").family is None and set(GPTQ_FAMILIES) == {"gptq", "awq"}


def test_a_ct_checkpoint_with_gptq_like_names_is_not_gptq(tmp_path):
    save_checkpoint(tmp_path / "d", {"model.x.scales": torch.ones(4), "model.x.g_idx": torch.zeros(4, dtype=torch.int32),
                                     "model.x.weight": torch.ones(4, 4)}, {"model_type": "llama"})
    m = open_checkpoint(tmp_path / "d").modules()["model.x"]
    assert not m.quantized and not m.is_marlin and not m.is_gptq


def test_marlin_family_unchanged(tmp_path):
    convert(FIXTURES / "tiny-mixtral-g64", tmp_path / "m", to="marlin", device="cpu")
    c = open_checkpoint(tmp_path / "m")
    assert c.family == MARLIN and all(m.is_marlin for m in c.modules().values() if m.quantized)


def test_quantize_config_json_alone_is_read(tmp_path, outputs):
    """AutoGPTQ-era folders carry the config only in quantize_config.json."""
    src = outputs["tiny", "gptq"]
    shutil_copy(src, tmp_path / "g")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())
    del cfg["quantization_config"]
    (tmp_path / "g" / "config.json").write_text(json.dumps(cfg))
    c = open_checkpoint(tmp_path / "g")
    assert c.family == "gptq" and c.gptq.provenance is not None
    assert validate_checkpoint(tmp_path / "g", deep=True).issues == ()


def test_configs_that_disagree_are_gptq_01(tmp_path, outputs):
    shutil_copy(outputs["tiny", "gptq"], tmp_path / "g")
    q = json.loads((tmp_path / "g" / "quantize_config.json").read_text())
    q["bits"] = 8
    (tmp_path / "g" / "quantize_config.json").write_text(json.dumps(q))
    rules = {i.rule for i in validate_checkpoint(tmp_path / "g").issues}
    assert rules == {"GPTQ-01"}


def shutil_copy(src, dst):
    import shutil
    shutil.copytree(src, dst)


# -- inspect and validate ------------------------------------------------------------------
@pytest.mark.parametrize("key", [("tiny", "gptq"), ("e014", "awq"), ("act", "gptq")])
def test_inspect_reports_the_gptq_file(outputs, key):
    d, src = summarize(open_checkpoint(outputs[key])), summarize(open_checkpoint(outputs[key[0]]))
    assert d["quant_method"] == key[1] and d["gptq"]["provenance"] is True
    assert d["format"] == {"gptq": "gptq", "awq": "gemm"}[key[1]]
    assert d["parameters"] == src["parameters"] and d["modules_quantized"] == src["modules_quantized"]
    assert d["config_groups"][0]["num_bits"] == 4 and sum(g["modules"] for g in d["config_groups"]) == \
        src["modules_quantized"]
    assert d["producer_version"].startswith("ctformat, from compressed-tensors")


@pytest.mark.parametrize("key", [("tiny", "gptq"), ("tiny", "awq"), ("asym", "gptq"), ("asym", "awq"),
                                 ("act", "gptq"), ("e014", "gptq")])
def test_outputs_validate_clean_deep(outputs, key):
    report = validate_checkpoint(outputs[key], deep=True)
    assert report.issues == () and report.modules_checked == 32 if key[0] != "act" else report.issues == ()


def test_inspect_and_validate_of_gptq_do_not_import_torch(outputs):
    code = ("import sys; from ctformat_cli.main import main\n"
            "try:\n main(['validate', sys.argv[1], '--json', '--target', 'vllm'])\nexcept SystemExit: pass\n"
            "main(['inspect', sys.argv[1], '--json'])\n"
            "heavy = [m for m in ('torch', 'transformers', 'triton') if m in sys.modules]\n"
            "assert not heavy, f'{heavy} imported'\n")
    for key in (("tiny", "gptq"), ("tiny", "awq")):
        r = subprocess.run([sys.executable, "-c", code, str(outputs[key])], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr


def test_vllm_profile_on_gptq_and_awq(outputs):
    rules = {k: [i.rule for i in validate_checkpoint(outputs[k], target="vllm").issues]
             for k in (("tiny", "gptq"), ("tiny", "awq"), ("asym", "gptq"), ("asym", "awq"), ("act", "gptq"))}
    assert rules[("tiny", "gptq")] == [] and rules[("tiny", "awq")] == [] and rules[("asym", "awq")] == []
    assert rules[("asym", "gptq")] == ["VLLM-10"]           # sym=False: AutoGPTQConfig.TYPE_MAP refuses
    assert rules[("act", "gptq")] == ["VLLM-10"]            # desc_act with groups: refused since vLLM 0.30
    msg = validate_checkpoint(outputs["asym", "gptq"], target="vllm").issues[0].message
    assert "Unsupported quantization config: bits=4, sym=False" in msg


def test_awq_of_a_symmetric_source_keeps_zeros_of_eight(tmp_path, outputs):
    """AWQ says zero_point true; the provenance says symmetric: a zero other than 8 is GPTQ-11 (deep)."""
    from make_fixtures import patch_tensor
    shutil_copy(outputs["tiny", "awq"], tmp_path / "a")
    name = "model.layers.0.self_attn.q_proj.qzeros"
    shard = open_checkpoint(tmp_path / "a").tensors[name].file
    patch_tensor(tmp_path / "a" / shard, name, lambda w: w.__setitem__(0, 0x77777777))
    assert validate_checkpoint(tmp_path / "a").issues == ()
    assert [i.rule for i in validate_checkpoint(tmp_path / "a", deep=True).issues] == ["GPTQ-11"]


# -- names GPTQModel reads ----------------------------------------------------------------
@pytest.mark.parametrize("era", ["tiny", "e014"])
def test_mixtral_written_with_gptqmodel_names_and_restored(outputs, era):
    """Both naming eras (w1/w2/w3 and gate_proj/up_proj/down_proj under block_sparse_moe) become
    mlp.experts.E.{gate,up,down}_proj and mlp.gate; the reverse gives the source names back."""
    c = open_checkpoint(outputs[era, "gptq"])
    names = set(c.modules())
    assert "model.layers.0.mlp.gate" in names and "model.layers.1.mlp.experts.3.down_proj" in names
    assert not any("block_sparse_moe" in n or n.endswith((".w1", ".w2", ".w3")) for n in names)
    assert c.gptq.provenance.names == ({"mlp": "block_sparse_moe", "gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}
                                       if era == "tiny" else {"mlp": "block_sparse_moe"})
    src = open_checkpoint(outputs[era])
    for p in src.modules():                                  # source name -> written -> source name
        written = {v: k for k, v in c.gptq.provenance.names.items()}
        from ctformat.names import moe_renamed
        assert c.source_name(moe_renamed(p, written)) == p


def test_keep_names_and_mixed_eras(tmp_path):
    convert(FIXTURES / "tiny-mixtral", tmp_path / "k", to="gptq", device="cpu", keep_names=True)
    assert "model.layers.0.block_sparse_moe.experts.0.w1" in open_checkpoint(tmp_path / "k").modules()
    # experts of both eras in one file cannot be renamed and restored: refused
    c = open_checkpoint(FIXTURES / "tiny-mixtral")
    t = {n: c.load(n) for n in c.tensors}
    for n in [n for n in t if ".experts.1.w1." in n]:
        t[n.replace(".w1.", ".gate_proj.")] = t.pop(n)
    save_checkpoint(tmp_path / "mixed", t, c.config)
    with pytest.raises(UnsupportedError) as err:
        convert(tmp_path / "mixed", tmp_path / "o", to="gptq", device="cpu")
    assert err.value.rule == "QCV-07" and not (tmp_path / "o").exists()


# -- convert through the CLI ----------------------------------------------------------------
def test_cli_convert_gptq_awq_and_back(capsys, tmp_path):
    src = FIXTURES / "int4-g32-asym"
    before = tree_snapshot(src)
    code, out, _ = cli("convert", str(src), str(tmp_path / "g"), "--to", "gptq", "--gptq-format", "v2",
                       "--device", "cpu", "--json")
    assert code == 0 and json.loads(out)["format"] == "gptq_v2"
    assert json.loads((tmp_path / "g" / "quantize_config.json").read_text())["format"] == "gptq_v2"
    code, out, _ = cli("convert", str(src), str(tmp_path / "a"), "--to", "awq", "--device", "cpu")
    assert code == 0 and "modules repacked" in out and "awq format gemm" in out
    for name in ("g", "a"):
        code, out, _ = cli("convert", str(tmp_path / name), str(tmp_path / f"{name}-ct"), "--to",
                           "compressed-tensors", "--device", "cpu", "--json")
        assert code == 0 and json.loads(out)["modules_restored"] == 4
        assert not (tmp_path / f"{name}-ct" / "quantize_config.json").exists()
        a, b = open_checkpoint(src), open_checkpoint(tmp_path / f"{name}-ct")
        assert a.config == b.config and all(torch.equal(a.load(n), b.load(n)) for n in a.tensors)
    assert tree_snapshot(src) == before


def test_cli_refusals_are_one_line_with_the_rule(capsys, tmp_path):
    code, _, err = cli("convert", str(FIXTURES / "int8-g32"), str(tmp_path / "o"), "--to", "awq",
                       "--device", "cpu")
    assert code == 1 and err.strip().endswith("[QCV-01]") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    code, _, err = cli("convert", str(FIXTURES / "int4-g32"), str(tmp_path / "o"), "--to", "awq",
                       "--gptq-format", "v1")
    assert code == 2 and "--gptq-format goes with --to gptq" in err
    code, _, err = cli("convert", str(FIXTURES / "tiny-mixtral"), str(tmp_path / "o"), "--to", "gptq",
                       "--allow-lossy-scales")
    assert code == 2


def test_cli_allow_lossy_reports_what_was_rounded(capsys, tmp_path):
    c = open_checkpoint(FIXTURES / "int4-g32")
    t = {n: c.load(n) for n in c.tensors}
    name = "model.layers.0.self_attn.q_proj.weight_scale"
    t[name][0, 0] = 1.5e-6                     # a bf16 value below fp16's normal range: rounds
    save_checkpoint(tmp_path / "src", t, c.config)
    code, _, err = cli("convert", str(tmp_path / "src"), str(tmp_path / "o"), "--to", "gptq")
    assert code == 1 and "[QCV-03]" in err and "--allow-lossy" in err
    code, out, _ = cli("convert", str(tmp_path / "src"), str(tmp_path / "o"), "--to", "gptq",
                       "--allow-lossy", "--device", "cpu")
    assert code == 0 and "1 scales rounded to float16" in out
    qc = json.loads((tmp_path / "o" / "config.json").read_text())["quantization_config"]
    assert qc["ctformat"]["lossy_scales"] == 1


def test_conversion_restores_torch_threads(tmp_path):
    """The CPU conversion runs torch ops inline (to_gptq._inline_ops) and gives the setting back,
    also when it refuses."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        convert(FIXTURES / "int4-g32", tmp_path / "g", to="gptq", device="cpu")
        assert torch.get_num_threads() == 2
        with pytest.raises(UnsupportedError):
            convert(FIXTURES / "int8-g32", tmp_path / "a", to="awq", device="cpu")
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# -- dense, run, compare -----------------------------------------------------------------------
@pytest.mark.parametrize("key", [("tiny", "gptq"), ("tiny", "awq"), ("asym", "gptq"), ("asym", "awq"),
                                 ("act", "gptq")])
def test_dense_of_gptq_equals_dense_of_source(outputs, key, tmp_path):
    a = dequantize_checkpoint(outputs[key[0]], device="cpu")
    b = dequantize_checkpoint(outputs[key], device="cpu")
    assert set(a) == set(b)
    assert all(a[n].dtype == b[n].dtype and torch.equal(a[n], b[n]) for n in a)
    convert(outputs[key], tmp_path / "d", to="dense", device="cpu")
    assert not (tmp_path / "d" / "quantize_config.json").exists()
    assert open_checkpoint(tmp_path / "d").family is None


def test_foreign_gptq_dequantizes_to_fp16_of_the_exact_product(tmp_path, outputs):
    """A GPTQ file without the provenance block (another tool's): F16 scales, so the dense weight
    is the one rounding of s * (u - z) that GPTQModel computes (float64 product, then float16)."""
    from test_gptq import ct_values
    shutil_copy(outputs["asym", "gptq"], tmp_path / "g")
    for f in ("config.json", "quantize_config.json"):
        p = tmp_path / "g" / f
        doc = json.loads(p.read_text())
        (doc.get("quantization_config", doc)).pop("ctformat")
        p.write_text(json.dumps(doc))
    assert validate_checkpoint(tmp_path / "g", deep=True).issues == ()
    dense = dequantize_checkpoint(tmp_path / "g", device="cpu", dtype=torch.float16)
    src = open_checkpoint(outputs["asym"])
    checked = 0
    for m in src.modules().values():
        if m.quantized:
            exact = ct_values(src.load_module(m), m.scheme, "dense")
            name = loader_name(m.prefix.replace("block_sparse_moe", "mlp"), "mixtral")
            assert torch.equal(dense[f"{name}.weight"], exact.to(torch.float16)), m.prefix
            checked += 1
    assert checked == 32


def test_run_and_compare_give_the_source_logits(outputs):
    src = outputs["e014"]
    expected = load_model(src, device="cpu", dtype=torch.float32).logits(IDS)
    for target in ("gptq", "awq"):
        got = load_model(outputs["e014", target], device="cpu", dtype=torch.float32).logits(IDS)
        assert torch.equal(got, expected), target
    report = compare(outputs["e014", "gptq"], src, IDS, device="cpu", dtype=torch.float32)
    assert report["kl_max"] == 0.0 and report["weights"]["max"] == 0.0 and report["weights"]["modules"] == 35


@pytest.mark.gpu
@pytest.mark.parametrize("src", [FIXTURES / "tiny-mixtral", FIXTURES / "int4-g32-asym", FIXTURES / "int3-g32-padded",
                                 FIXTURES / "int4-g32-actorder"], ids=lambda p: p.name)
def test_convert_on_cuda_is_the_cpu_output(src, tmp_path):
    """The codecs run on the device of their tensors: --device cuda writes the CPU's bytes, both
    ways, and dequantizes to the same dense weights."""
    targets = ["gptq"] + (["awq"] if src.name in ("tiny-mixtral", "int4-g32-asym") else [])
    for target in targets:
        for dev in ("cpu", "cuda"):
            convert(src, tmp_path / f"{target}-{dev}", to=target, device=dev)
            convert(tmp_path / f"{target}-{dev}", tmp_path / f"{target}-{dev}-ct", to="compressed-tensors", device=dev)
        for suffix in ("", "-ct"):
            assert tree_snapshot(tmp_path / f"{target}-cpu{suffix}") == tree_snapshot(tmp_path / f"{target}-cuda{suffix}")
        a = dequantize_checkpoint(tmp_path / f"{target}-cpu", device="cpu")
        b = dequantize_checkpoint(tmp_path / f"{target}-cpu", device="cuda")
        assert all(torch.equal(a[n], b[n].cpu()) for n in a)


def test_workers_write_the_bytes_of_one_process(tmp_path):
    """--to gptq / awq / compressed-tensors run in pieces like every safetensors target: two
    worker processes write the bytes (quantize_config.json included) of one."""
    src = FIXTURES / "tiny-mixtral"
    for target in ("gptq", "awq"):
        one, two = tmp_path / f"{target}-1", tmp_path / f"{target}-2"
        convert(src, one, to=target, device="cpu")
        r = convert(src, two, to=target, device="cpu", workers=2, piece_size=20_000)
        assert r.details["workers"] == 2 and r.details["pieces"] > 1 and r.details["format"]
        assert tree_snapshot(two) == tree_snapshot(one)
        back = convert(one, tmp_path / f"{target}-ct", to="compressed-tensors", device="cpu", workers=2,
                       piece_size=20_000)
        assert back.details["pieces"] > 1
        convert(one, tmp_path / f"{target}-ct1", to="compressed-tensors", device="cpu")
        assert tree_snapshot(tmp_path / f"{target}-ct") == tree_snapshot(tmp_path / f"{target}-ct1")
