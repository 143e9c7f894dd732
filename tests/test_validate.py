"""Every rule has a broken fixture that yields exactly that rule, and spec, code and fixtures
list the same rule IDs."""
from __future__ import annotations

import json
import re

import pytest

from conftest import BAD, FIXTURES, REAL, REAL_FOLDERS, ROOT, tree_snapshot
from ctformat.spec import DENSE_REFUSALS, GGUF_REFUSALS, MARLIN_REFUSALS, RULES
from ctformat.validate import validate_checkpoint
from ctformat_cli.main import main

TARGETS = {"VLLM": "vllm", "TRF": "transformers", "FMT-20": "vllm"}
GOOD = sorted(p for p in FIXTURES.iterdir() if (p / "config.json").is_file())
DEEP = ("DATA", "MRL-07", "FMT-3", "KV-04", "XFM-04")        # rules that look at tensor values


def target_of(rule: str) -> str | None:
    return TARGETS.get(rule, TARGETS.get(rule.split("-")[0]))


def test_every_rule_has_a_bad_fixture_and_nothing_else():
    assert sorted(p.name for p in BAD.iterdir()) == sorted(RULES)


SPECS = sorted((ROOT / "spec").glob("*.md"))
RULE_TABLE = r"^\|\s*`?((?:FILE|HDR|CFG|TEN|DATA|VLLM|TRF|MRL|GGUF|FMT|KV|XFM)-\d\d)`?\s*\|"


def test_spec_lists_exactly_the_rules_of_the_code():
    """Every spec file's rule tables together list RULES, each ID in one file only."""
    found = [i for p in SPECS for i in set(re.findall(RULE_TABLE, p.read_text(), re.M))]
    assert sorted(found) == sorted(RULES)


@pytest.mark.parametrize("prefix,catalogue,spec", [("MCV", MARLIN_REFUSALS, "ctformat.md"),
                                                   ("GCV", GGUF_REFUSALS, "gguf.md")])
def test_spec_lists_exactly_the_refusals_of_the_code(prefix, catalogue, spec):
    text = (ROOT / "spec" / spec).read_text()
    assert set(re.findall(rf"^\|\s*`({prefix}-\d\d)`\s*\|", text, re.M)) == set(catalogue)


def test_spec_lists_exactly_the_dense_refusals_of_the_code():
    text = (ROOT / "spec" / "formats.md").read_text()
    assert set(re.findall(r"^\|\s*`(DCV-\d\d)`\s*\|", text, re.M)) == set(DENSE_REFUSALS)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_bad_fixture_yields_exactly_its_rule(rule):
    report = validate_checkpoint(BAD / rule, deep=rule.startswith(DEEP), target=target_of(rule))
    assert {i.rule for i in report.issues} == {rule}, [str(i) for i in report.issues]
    assert report.ok == (RULES[rule][0] == "warning")
    for issue in report.issues:
        assert issue.message and str(issue).endswith(f"[{rule}]")


@pytest.mark.parametrize("rule", sorted(RULES))
def test_cli_validate_json_exit_code_and_no_changes(rule, capsys):
    before = tree_snapshot(BAD / rule)
    target = target_of(rule)
    args = ["validate", str(BAD / rule), "--json"] + (["--deep"] if rule.startswith(DEEP) else []) + (
        ["--target", target] if target else [])
    with pytest.raises(SystemExit) as exc:
        main(args)
    out = json.loads(capsys.readouterr().out)
    assert {i["rule"] for i in out["issues"]} == {rule}
    assert exc.value.code == (0 if RULES[rule][0] == "warning" else 1)
    assert tree_snapshot(BAD / rule) == before


@pytest.mark.parametrize("path", GOOD, ids=lambda p: p.name)
def test_good_fixtures_validate_clean_deep(path):
    report = validate_checkpoint(path, deep=True)
    assert report.issues == () and report.modules_checked > 0


def test_deep_reports_progress_per_module():
    seen = []
    validate_checkpoint(FIXTURES / "int4-g32", deep=True, progress=lambda k, n: seen.append((k, n)))
    assert seen == [(1, 4), (2, 4), (3, 4), (4, 4)]


def test_vllm_profile_is_silent_on_loadable_real_checkpoints():
    for path in (p for p in REAL_FOLDERS if p.parent.name == "llmcompressor-0.14"):
        assert validate_checkpoint(path, target="vllm").issues == (), path.name
    old = validate_checkpoint(REAL / "llmcompressor-0.4.1" / "w4a16-gptq-actorder-group-g128", target="vllm")
    assert {i.rule for i in old.issues} == {"VLLM-01"} and old.ok      # a warning: ctformat still reads it


def test_vllm_profile_off_by_default():
    assert validate_checkpoint(BAD / "VLLM-01").issues == ()


def test_transformers_profile_flags_llmcompressor_014_expert_names():
    new = validate_checkpoint(REAL / "llmcompressor-0.14" / "w4a16-sym-g128", target="transformers")
    assert [i.rule for i in new.issues] == ["TRF-01"] and "gate_proj" in new.issues[0].message
    old = validate_checkpoint(REAL / "llmcompressor-0.4.1" / "w4a16-gptq-g128", target="transformers")
    assert old.issues == ()
