"""The command line: exit codes, messages on stderr, --json documents, no tracebacks."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import BAD, FIXTURES, ROOT


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ctformat", *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **(env or {})), timeout=120)


def test_inspect_json_reports_true_parameter_count_and_groups():
    r = run("inspect", str(FIXTURES / "tiny-mixtral"), "--json")
    assert r.returncode == 0, r.stderr
    doc = json.loads(r.stdout)
    assert doc["schema"] == "ctformat.inspect/1"
    # 2 layers x (4 attention projections + 4 experts x 3 projections) quantized
    assert doc["modules_quantized"] == 32
    h, i, kv, e = 64, 96, 32, 4
    per_layer = h * h * 2 + kv * h * 2 + e * 3 * h * i
    assert doc["parameters"]["quantized"] == 2 * per_layer      # not the packed word count
    assert doc["config_groups"][0]["modules_folded"][0] == "model.layers.{0..1}.block_sparse_moe.experts.{0..3}.w1"
    assert doc["ignored_modules"] == ["lm_head", "model.layers.{0..1}.block_sparse_moe.gate"]
    assert doc["bits_per_quantized_weight"] == 4.5                # 4 bits + bf16 scale per 32 weights
    assert len(doc["shards"]) == 2


def test_inspect_tensors_filter():
    r = run("inspect", str(FIXTURES / "int4-g32"), "--json", "--tensors", r"q_proj\.weight_")
    names = [t["name"] for t in json.loads(r.stdout)["tensor_list"]]
    assert names == [f"model.layers.0.self_attn.q_proj.weight_{s}" for s in ("packed", "scale", "shape")]


def test_inspect_human_output_names_the_scheme():
    r = run("inspect", str(FIXTURES / "tiny-mixtral"), "--tensors")
    assert r.returncode == 0
    assert "MixtralForCausalLM" in r.stdout and "group_0" in r.stdout and "weight_packed" in r.stdout


def test_validate_human_output_and_exit_codes():
    ok = run("validate", str(FIXTURES / "tiny-mixtral"), "--deep")
    assert ok.returncode == 0 and "OK" in ok.stdout
    bad = run("validate", str(BAD / "TEN-09"))
    assert bad.returncode == 1 and "TEN-09" in bad.stdout


@pytest.mark.parametrize("rule", ["HDR-01", "HDR-06", "FILE-04", "CFG-01", "FILE-02"])
def test_inspect_bad_input_one_line_error_no_traceback(rule):
    r = run("inspect", str(BAD / rule))
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert r.stderr.startswith("Error: ") and f"[{rule}]" in r.stderr


def test_debug_shows_traceback():
    r = run("--debug", "inspect", str(BAD / "HDR-01"))
    assert r.returncode == 1 and "Traceback" in r.stderr and "HeaderError" in r.stderr


def test_usage_error_exits_2():
    assert run("inspect", "--no-such-option", "x").returncode == 2
    assert run("frobnicate").returncode == 2


def test_missing_model_is_a_clear_error():
    r = run("inspect", "does/not/exist")
    assert r.returncode == 1 and "no such file or folder" in r.stderr and "Traceback" not in r.stderr


def test_help_documents_exit_codes():
    r = run("validate", "--help")
    assert "Exit codes" in r.stdout and "2  usage error" in r.stdout


@pytest.mark.parametrize("path", [FIXTURES / "tiny-mixtral", FIXTURES / "formats" / "quip-w4a16",
                                  FIXTURES / "formats" / "mixed-fp8-nvfp4", FIXTURES / "formats" / "fp8-dynamic-kv-fp8",
                                  FIXTURES / "formats" / "legacy-sparse24-bitmask"], ids=lambda p: p.name)
def test_inspect_and_validate_do_not_import_torch(path):
    code = ("import sys; from ctformat_cli.main import main\n"
            "for target in ([], ['--target', 'vllm'], ['--target', 'transformers']):\n"
            " try:\n  main(['validate', sys.argv[1], '--json', *target])\n except SystemExit: pass\n"
            "main(['inspect', sys.argv[1], '--json'])\n"
            "heavy = [m for m in ('torch', 'transformers', 'triton') if m in sys.modules]\n"
            "assert not heavy, f'{heavy} imported'\n")
    r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_inspect_folds_only_ascii_numbers(tmp_path):
    """A tensor name may hold any Unicode: '²' and '٣' pass str.isdigit() (int('²') fails, int('٣')
    is 3), so only ASCII digit runs fold; the rest stay as they are written."""
    import torch

    from conftest import cli_in_process
    from ctformat.summary import fold_names
    from ctformat.writer import save_checkpoint
    names = ["model.layers.0.w", "model.layers.1.w", "model.layers.².w", "model.layers.٣.w", "x²1.w", "x²2.w"]
    assert fold_names(names) == ["model.layers.{0..1}.w", "model.layers.².w", "model.layers.٣.w", "x²1.w", "x²2.w"]
    out = save_checkpoint(tmp_path / "m", {f"{n}eight": torch.zeros(2, 2) for n in names}, {"model_type": "llama"})
    r = cli_in_process("inspect", out, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["dense_linear_modules"] == ["model.layers.{0..1}", "model.layers.²", "model.layers.٣",
                                                            "x²1", "x²2"]


def test_fold_names_splits_each_parent_once():
    """fold_names splits a parent once for all its children: a child that is itself a number,
    a name without a dot, an empty last part and a non-ASCII last part fold as written."""
    from ctformat.summary import fold_names
    names = ["model.layers.0.mlp.experts.1.up_proj", "model.layers.0.mlp.experts.1.down_proj",
             "model.layers.1.mlp.experts.0.up_proj", "model.layers.0.mlp.experts.0.up_proj", "h.0", "h.2", "h.1",
             "embed", "a.b.", "a.7.", "a.8.", "m.3.²", "m.4.²", "7", "9"]
    assert fold_names(names) == ["a.b.", "a.{7..8}.", "embed", "h.{0..2}", "m.{3..4}.²",
                                 "model.layers.0.mlp.experts.1.down_proj",
                                 "model.layers.{0..1}.mlp.experts.{0..1}.up_proj", "{7,9}"]


def _fold_one_by_one(names):
    """fold_names as spec'd, name by name: each name split by one regex into text and number parts."""
    import re
    part = re.compile(r"(?<![^.])([0-9]+)(?![^.])")
    groups = {}
    for name in names:
        pieces = part.split(name)
        groups.setdefault(tuple(pieces[::2]), []).append(pieces[1::2])
    out = []
    for key, rows in groups.items():
        spans = []
        for i in range(len(key) - 1):
            v = sorted({int(r[i]) for r in rows})
            spans.append(str(v[0]) if len(v) == 1 else f"{{{v[0]}..{v[-1]}}}" if v == list(range(v[0], v[-1] + 1))
                         else "{" + ",".join(map(str, v)) + "}")
        out.append("".join(p for pair in zip(key, spans) for p in pair) + key[-1])
    return sorted(out, key=lambda s: [int(t) if k % 2 else t for k, t in enumerate(re.split("([0-9]+)", s))])


def test_fold_names_equals_name_by_name():
    """fold_names works on templates (digits read as '0') shared by many names; it gives what
    splitting each name on its own gives, for digits inside parts, leading zeros, non-ASCII
    digits, newlines and lone surrogates in names too."""
    import random

    from ctformat.summary import fold_names
    rnd = random.Random(7)
    parts = ["a", "fc1", "fc2", "0", "1", "2", "10", "01", "007", "x²", "٣", "", "7b", "1a1", "a\n1", "\ud8001", "é5"]
    for _ in range(3000):
        names = [".".join(rnd.choice(parts) for _ in range(rnd.randint(1, 4))) for _ in range(rnd.randint(0, 12))]
        assert fold_names(names) == _fold_one_by_one(names), names
    experts = [f"model.layers.{i}.mlp.experts.{e}.{p}_proj" for i in range(3, 61) for e in range(0, 384, 7)
               for p in ("gate", "up", "down")]
    assert fold_names(experts) == _fold_one_by_one(experts)
