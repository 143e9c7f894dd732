"""The command line's output on every bundled fixture, recorded once and compared byte for byte:
a restructuring that changes what a user sees fails here. Regenerate deliberately with
CTFORMAT_REGEN_GOLDEN=1 (and say why in the commit)."""
from __future__ import annotations

import hashlib
import json
import os

import pytest

from conftest import BAD, FIXTURES, ROOT
from ctformat_cli import render
from ctformat_cli.main import main

GOLDEN = ROOT / "tests" / "golden"
REGEN = os.environ.get("CTFORMAT_REGEN_GOLDEN") == "1"
GOOD = sorted(p.name for p in FIXTURES.iterdir() if (p / "config.json").is_file() and p.name != "marlin")
BAD_RULES = sorted(p.name for p in BAD.iterdir() if p.is_dir())


def _cli(capsys, monkeypatch, *args: str) -> dict:
    """Run the CLI in-process from the repository root; exit code, stdout and stderr."""
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "120")
    # the consoles measured their width when first imported, maybe in another test's environment
    for console in (render.out, render.err):
        monkeypatch.setattr(console, "width", 120)
    code = 0
    try:
        main(list(args))
    except SystemExit as exc:
        code = exc.code or 0
    got = capsys.readouterr()
    return {"exit": code, "stdout": got.out, "stderr": got.err}


def _check(name: str, doc: dict) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(doc, indent=1, sort_keys=True) + "\n"
    if REGEN:
        path.write_text(text)
    assert path.read_text() == text, f"output of {name} changed (tests/golden/{name}.json)"


def _tree(path) -> dict[str, str]:
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()[:16]
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("fixture", GOOD)
def test_inspect_and_validate_of_good_fixtures(capsys, monkeypatch, fixture):
    path = f"fixtures/{fixture}"
    _check(f"good-{fixture}", {
        "inspect": _cli(capsys, monkeypatch, "inspect", path, "--json", "--tensors"),
        "inspect_text": _cli(capsys, monkeypatch, "inspect", path),
        "validate": _cli(capsys, monkeypatch, "validate", path, "--json", "--deep"),
        "validate_vllm": _cli(capsys, monkeypatch, "validate", path, "--target", "vllm"),
        "validate_transformers": _cli(capsys, monkeypatch, "validate", path, "--target", "transformers", "--json"),
    })


@pytest.mark.parametrize("rule", BAD_RULES)
def test_validate_of_bad_fixtures(capsys, monkeypatch, rule):
    path = f"fixtures/bad/{rule}"
    _check(f"bad-{rule}", {
        "validate": _cli(capsys, monkeypatch, "validate", path, "--json", "--deep"),
        "validate_text": _cli(capsys, monkeypatch, "validate", path, "--deep"),
        "inspect": _cli(capsys, monkeypatch, "inspect", path, "--json"),
    })


CONVERTS = [(f, ["--to", "dense"]) for f in GOOD if f not in ("tiny-mixtral-g64",)] + [
    ("tiny-mixtral-g64", ["--to", "dense"]), ("tiny-mixtral-g64", ["--to", "marlin"]),
    ("tiny-mixtral-g64", ["--to", "marlin", "--stack-experts"]),
    ("tiny-mixtral-ct019", ["--to", "dense", "--keep-names", "--dtype", "float32"]),
    ("tiny-mixtral", ["--to", "marlin"]), ("int3-g32-dense", ["--to", "marlin"]),
    ("tiny-mixtral", ["--to", "gptq"]), ("tiny-mixtral", ["--to", "awq"]), ("int4-g32-asym", ["--to", "gptq"]),
    ("int3-g32-padded", ["--to", "gptq", "--gptq-format", "v2"]), ("tiny-mixtral-ct019", ["--to", "gptq", "--keep-names"])]


@pytest.mark.parametrize("fixture,args", CONVERTS, ids=lambda x: x if isinstance(x, str) else "_".join(x))
def test_convert_of_fixtures(capsys, monkeypatch, tmp_path, fixture, args):
    out = tmp_path / "out"
    res = _cli(capsys, monkeypatch, "convert", f"fixtures/{fixture}", str(out), *args, "--device", "cpu", "--json")
    if res["exit"] == 0:
        stats = json.loads(res["stdout"])
        for key in ("seconds", "output"):
            stats.pop(key)
        res["stdout"] = stats
        res["files"] = _tree(out)
        if "--to" in args and args[args.index("--to") + 1] in ("marlin", "gptq", "awq"):     # and back, bit for bit
            back = _cli(capsys, monkeypatch, "convert", str(out), str(tmp_path / "back"), "--to",
                        "compressed-tensors", "--device", "cpu", "--json")
            res["back_exit"] = back["exit"]
            res["back_files"] = _tree(tmp_path / "back")
    res["stderr"] = res["stderr"].replace(str(out), "OUT")
    _check(f"convert-{fixture}-{'_'.join(a.strip('-') for a in args)}", res)
