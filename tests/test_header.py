"""The header parser's bulk path against the per-entry reference it replaced: on valid and
broken headers alike, parse_header must return the same tensors or raise the same rule-tagged
error as the original one-entry-at-a-time parser (kept below as the oracle, as
compressed-tensors keeps its old packer)."""
from __future__ import annotations

import json
from math import prod
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ctformat.errors import HeaderError
from ctformat.header import TensorInfo, parse_header, parse_index
from ctformat.spec import DTYPE_SIZES


# -- the oracle: the parser as it was, one object hook call and one check per entry ---------
def _old_no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _old_is_int(x):
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _old_entry(name, entry, base, file):
    if not isinstance(entry, dict):
        raise HeaderError("entry is not an object", rule="HDR-03", file=file, where=name)
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
        raise HeaderError(f"unknown dtype {dtype!r}", rule="HDR-03", file=file, where=name)
    if not isinstance(shape, list) or not all(_old_is_int(d) for d in shape):
        raise HeaderError(f"shape {shape!r} is not a list of non-negative integers", rule="HDR-03", file=file,
                          where=name)
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(_old_is_int(o) for o in offsets)
            or offsets[0] > offsets[1]):
        raise HeaderError(f"data_offsets {offsets!r} is not [begin, end] with begin <= end", rule="HDR-03",
                          file=file, where=name)
    begin, end = offsets
    want = prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != want:
        raise HeaderError(f"{dtype} {tuple(shape)} needs {want} bytes, data_offsets give {end - begin}",
                          rule="HDR-04", file=file, where=name)
    return (name, dtype, tuple(shape), file, base + begin, end - begin)


def _old_parse_header(raw: bytes, file_size: int, file: str):
    try:
        obj = json.loads(raw.decode("utf-8"), object_pairs_hook=_old_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        raise HeaderError(f"header is not UTF-8 JSON: {str(err)[:200]}", rule="HDR-02", file=file) from None
    if not isinstance(obj, dict):
        raise HeaderError("header is not a JSON object", rule="HDR-02", file=file)
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise HeaderError("__metadata__ is not an object of strings", rule="HDR-03", file=file)
    base, buffer = 8 + len(raw), file_size - 8 - len(raw)
    tensors = {name: _old_entry(name, entry, base, file) for name, entry in obj.items()}
    pos = 0
    for t in sorted(tensors.values(), key=lambda t: (t[4], t[5])):
        if t[4] - base != pos:
            kind = "overlaps the tensor before it" if t[4] - base < pos else "leaves a hole before it"
            raise HeaderError(f"data_offsets begin at {t[4] - base}: {kind} (expected {pos})", rule="HDR-05",
                              file=file, where=t[0])
        pos += t[5]
    if pos > buffer:
        raise HeaderError(f"file is truncated: tensors need {pos} data bytes, file has {buffer}", rule="HDR-06",
                          file=file)
    if pos < buffer:
        raise HeaderError(f"{buffer - pos} stray bytes after the last tensor", rule="HDR-06", file=file)
    return list(tensors.values()), metadata


def _outcome(fn, *args) -> Any:
    try:
        tensors, metadata = fn(*args)
    except HeaderError as err:
        return ("error", err.rule, err.where, str(err))
    rows = [tuple(t) for t in (tensors.values() if isinstance(tensors, dict) else tensors)]
    return ("ok", rows, list(tensors) if isinstance(tensors, dict) else [r[0] for r in rows], metadata)


def same_as_oracle(raw: bytes, file_size: int) -> None:
    got = _outcome(parse_header, raw, file_size, "s.safetensors")
    want = _outcome(_old_parse_header, raw, file_size, "s.safetensors")
    if want[0] == "ok":
        want = (want[0], want[1], [r[0] for r in want[1]], want[3])
    assert got == want


# -- headers: a valid one, then one change from a catalogue of ways to break it -------------
def valid_header(specs: list[tuple[str, str, list[int]]]) -> tuple[dict, int]:
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape in specs:
        n = DTYPE_SIZES[dtype] * prod(shape)
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    return header, pos


def _first(h):
    return next(k for k in h if k != "__metadata__")


def mutate(kind: str, h: dict, data: int) -> tuple[Any, int, Any]:
    """One way to break (or keep) a valid header: (header, data bytes, serialization tweak)."""
    e = h[_first(h)]
    edits = {
        "bool_dim": lambda: e.__setitem__("shape", [True]), "float_dim": lambda: e["shape"].append(1.0),
        "negative_dim": lambda: e["shape"].append(-1), "missing_dtype": lambda: e.pop("dtype"),
        "dtype_list": lambda: e.__setitem__("dtype", ["I32"]), "dtype_unknown": lambda: e.__setitem__("dtype", "Q4"),
        "extra_key": lambda: e.__setitem__("extra", 1), "extra_object": lambda: e.__setitem__("extra", {"a": 1}),
        "offsets_three": lambda: e["data_offsets"].append(0),
        "begin_after_end": lambda: e.__setitem__("data_offsets", e["data_offsets"][::-1]),
        "entry_not_object": lambda: h.__setitem__(_first(h), [1, 2]),
        "meta_not_strings": lambda: h["__metadata__"].__setitem__("n", 1),
        "meta_not_object": lambda: h.__setitem__("__metadata__", ["pt"]),
        "meta_last": lambda: h.__setitem__("__metadata__", h.pop("__metadata__")),
        "meta_as_tensor": lambda: h.__setitem__("__metadata__", {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]}),
    }
    if kind in edits:
        edits[kind]()
        return h, data, None
    sizes = {"hole": 4, "truncated": -1, "stray": 3}
    if kind == "hole":             # every tensor moves 4 bytes up: a hole before the first
        for k, v in h.items():
            if k != "__metadata__":
                v["data_offsets"] = [o + 4 for o in v["data_offsets"]]
    if kind in sizes:
        return h, data + sizes[kind], None
    tweaks = {"dup_top": ("dup", "top"), "dup_entry": ("dup", "entry"), "dup_meta": ("dup", "meta"),
              "dup_same_value": ("dup", "same"), "spaced_colon": ("spaced", None), "trailing_garbage": ("append", b"x"),
              "not_utf8": ("append", b"\xff")}
    if kind == "reversed_order":
        return dict(reversed(list(h.items()))), data, None
    if kind == "array":
        return [h], data, None
    return h, data, tweaks.get(kind)


MUTATIONS = ["none", "bool_dim", "float_dim", "negative_dim", "missing_dtype", "dtype_list", "dtype_unknown",
             "extra_key", "extra_object", "offsets_three", "begin_after_end", "entry_not_object", "meta_not_strings",
             "meta_not_object", "meta_last", "meta_as_tensor", "hole", "truncated", "stray", "dup_top", "dup_entry",
             "dup_meta", "dup_same_value", "spaced_colon", "trailing_garbage", "not_utf8", "reversed_order", "array"]


def serialize(h: Any, style: str, extra) -> bytes:
    seps = {"compact": (",", ":"), "spaced": (", ", ": ")}[style]
    text = json.dumps(h, separators=seps, ensure_ascii=style == "spaced")
    if extra and extra[0] == "dup":
        key = _first(h)
        entry = json.dumps(h[key], separators=seps)
        if extra[1] in ("top", "same"):
            value = entry if extra[1] == "same" else json.dumps({"dtype": "U8", "shape": [0], "data_offsets": [0, 0]})
            text = text[:-1] + f"{seps[0]}{json.dumps(key)}{seps[1]}{value}" + "}"
        elif extra[1] == "entry":
            text = text.replace('"dtype"', '"dtype"' + seps[1] + '"U8"' + seps[0] + '"dtype"', 1)
        else:
            text = text.replace('"format"', '"format"' + seps[1] + '"x"' + seps[0] + '"format"', 1)
    if extra and extra[0] == "spaced":
        text = text.replace('":', '" :')
    raw = text.encode()
    if extra and extra[0] == "append":
        raw += extra[1]
    return raw + b" " * (-len(raw) % 8)


NAMES = st.sampled_from(["model.layers.0.mlp.gate_proj.weight_packed", "a", "x:y", ":colon", 'quote"d',
                         "back\\slash", "ünïcode", "sp ace", "model.embed_tokens.weight", "z"])
SPECS = st.lists(st.tuples(NAMES, st.sampled_from(sorted(DTYPE_SIZES)), st.lists(st.integers(0, 5), max_size=3)),
                 min_size=1, max_size=6, unique_by=lambda t: t[0])


@settings(max_examples=600, deadline=None)
@given(specs=SPECS, mutation=st.sampled_from(MUTATIONS), style=st.sampled_from(["compact", "spaced"]))
def test_parse_header_matches_the_per_entry_oracle(specs, mutation, style):
    header, data = valid_header(specs)
    header, data, extra = mutate(mutation, header, data)
    raw = serialize(header, style, extra)
    same_as_oracle(raw, 8 + len(raw) + data)


@pytest.mark.parametrize("text", [
    '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
    '{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"shape":[1]}}',
    '{"__metadata__":{"k":"v","k":"v"},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
    '{"a" :{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a" :{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}',
])
def test_duplicate_keys_are_hdr_02_even_when_the_values_agree(text):
    raw = text.encode()
    with pytest.raises(HeaderError, match=r"duplicate key .*\[HDR-02\]"):
        parse_header(raw, 8 + len(raw) + 1, "s.safetensors")


@pytest.mark.parametrize("entries,data", [
    ([("a", "U8", [0], 0, 0), ("a", "U8", [0], 0, 0)], 0),          # a duplicate that tiles
    ([("a", "U8", [1], 0, 1), ("a", "U8", [1], 1, 2)], 2),          # a duplicate in data order
    ([("a", "U8", [4], 2, 4)], 4),                                  # first begin not 0: HDR-04
    ([("a", "U8", [4], 0, 4), ("b", "U8", [2], 4, 5)], 5),          # HDR-04 in the last entry
    ([("a", "U8", [2], 0, 2), ("b", "U8", [2], 2, 4)], 5),          # one stray byte: HDR-06
    ([("a", "U8", [2], 0, 2), ("b", "U8", [2], 3, 5)], 5),          # a hole: HDR-05
    ([("a", "U8", [2], 0, 2), ("__metadata__", "U8", [0], 2, 2)], 2),
    ([("a", "Q4", [2], 0, 2)], 2),
    ([("a", "BF16", [], 0, 2)], 2),                                 # a scalar
    ([("a", "I32", [3, 0], 0, 0), ("b", "F32", [1], 0, 4)], 4),     # an empty tensor sharing a begin
])
@pytest.mark.parametrize("metadata", [True, False])
def test_compact_layout_corner_cases_read_as_the_oracle_reads_them(entries, data, metadata):
    """The safetensors library's own layout takes the one-regex path: each case here passes
    every check of that path but one, which must hand it to the path that words the error."""
    body = ",".join(f'"{n}":{{"dtype":"{d}","shape":{json.dumps(s, separators=(",", ":"))},"data_offsets":[{b},{e}]}}'
                    for n, d, s, b, e in entries)
    text = "{" + ('"__metadata__":{"format":"pt"},' if metadata else "") + body + "}"
    raw = text.encode() + b" " * (-len(text) % 8)
    same_as_oracle(raw, 8 + len(raw) + data)


E1, E2 = '"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}', '"b":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}'


@pytest.mark.parametrize("text", [
    "{" + E1 + "{" + E2 + "}",                            # { where the comma goes
    "{" + E1 + "}," + E2 + "}",                           # the object closed early
    '{"__metadata__":{"format":"pt"}{' + E2.replace("[1,2]", "[0,1]") + "}",
    "{" + E1 + ",," + E2 + "}",
    " {" + E1 + "," + E2 + "}",                           # leading whitespace: valid JSON
    "{" + E1 + "," + E2 + "}\n\t ",                        # trailing whitespace: valid JSON
    "{" + E1 + "," + E2 + "}}",
    "{" + E1 + "," + E2,
    "{" + E1.replace("[1]", "[01]") + "}",                  # a leading zero is not JSON
    "{" + E1.replace("[0,1]", "[-0,1]") + "}",
])
def test_compact_layout_structure_reads_as_the_oracle_reads_it(text):
    raw = text.encode()
    same_as_oracle(raw, 8 + len(raw) + 2)


def test_a_name_ending_in_a_colon_quote_takes_the_exact_path_and_parses():
    """`":` inside a name makes the fast key count too high; the strict parse then decides."""
    raw = json.dumps({'odd":name': {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}).encode()
    tensors, _ = parse_header(raw, 8 + len(raw) + 2, "s")
    assert list(tensors.values()) == [TensorInfo('odd":name', "U8", (2,), "s", 8 + len(raw), 2)]


def test_tensor_info_is_a_record_with_numel():
    t = TensorInfo("w", "I32", (4, 3), "f", 16, 48)
    assert (t.name, t.dtype, t.shape, t.file, t.start, t.nbytes, t.numel) == ("w", "I32", (4, 3), "f", 16, 48, 12)
    with pytest.raises(AttributeError):
        t.start = 0                                   # read from a file: immutable


@pytest.mark.parametrize("wmap,rule,bad", [
    ({"a": "x.safetensors", "b": "../y.safetensors", "c": ["z"]}, "FILE-04", "../y.safetensors"),
    ({"a": "x.safetensors", "b": ["z"], "c": "../y.safetensors"}, "FILE-03", "['z']"),
    ({"a": "x.safetensors", "b": "/abs.safetensors", "c": "../y.safetensors"}, "FILE-04", "/abs.safetensors"),
])
def test_parse_index_reports_the_first_bad_shard_name_in_file_order(wmap, rule, bad):
    with pytest.raises(HeaderError) as err:
        parse_index(json.dumps({"weight_map": wmap}).encode(), "model.safetensors.index.json")
    assert err.value.rule == rule and repr(bad) in str(err.value) if rule == "FILE-04" else bad in str(err.value)


def test_parse_index_checks_each_shard_name_once_and_keeps_the_map():
    wmap = {f"t{k}": f"model-{k % 3 + 1:05d}-of-00003.safetensors" for k in range(1000)}
    assert parse_index(json.dumps({"weight_map": wmap}).encode(), "i") == wmap
