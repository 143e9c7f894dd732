"""convert --resume (spec §1.7): a run killed at any moment, or stopped by a full disk, leaves
its temporary folder; --resume keeps every piece recorded before the stop (and only those
whose bytes still match), redoes the rest, and publishes the bytes an uninterrupted run
writes. A changed source or changed options are refused, never mixed in."""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import FIXTURES, ROOT, cli_in_process, tree_snapshot
from ctformat.convert import convert
from ctformat.errors import CtFormatError
from ctformat.staging import RECORDS
from test_convert import big_checkpoint

SHARD = "20MB"          # 48 modules of 4 MB bf16: 12 shards, one piece each


def cli(*args: str) -> subprocess.CompletedProcess:
    return cli_in_process("convert", *args)


def staging_of(out: Path) -> Path | None:
    found = [p for p in out.parent.glob(f".{out.name}.tmp-*") if (p / RECORDS / "manifest.json").is_file()]
    assert len(found) <= 1, found
    return found[0] if found else None


def recorded(tmp: Path) -> set[int]:
    return {int(p.stem.split("-")[1]) for p in (tmp / RECORDS).glob("piece-*.json")}


def touched_unrecorded(tmp: Path) -> int:
    """Pieces with bytes written but no record: those that were in flight at the kill."""
    manifest = json.loads((tmp / RECORDS / "manifest.json").read_text())
    done, n = recorded(tmp), 0
    for k, (file, _, _, start, end) in enumerate(manifest["pieces"]):
        with open(tmp / file, "rb") as fh:
            fh.seek(start)
            n += k not in done and fh.read(end - start).strip(b"\0") != b""
    return n


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    src = big_checkpoint(root / "src")
    r = cli(str(src), str(root / "ref"), "--to", "dense", "--device", "cpu", "--max-shard-size", SHARD)
    assert r.returncode == 0, r.stderr
    return src, tree_snapshot(root / "ref")


def test_sigkill_at_random_moments_then_resume_is_byte_identical(source, tmp_path):
    """Kill the run at random moments, each time resuming; every piece recorded before a kill is
    kept by the next run (none redone), at most one piece was in flight, and the bytes published
    at the end are those of a run never interrupted."""
    src, ref = source
    out = tmp_path / "out"
    args = [str(src), str(out), "--to", "dense", "--device", "cpu", "--max-shard-size", SHARD, "--resume", "--json"]
    rng, kills, last = random.Random(7), 0, set()
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, "-m", "ctformat", "convert", *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while staging_of(out) is None and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        tmp = staging_of(out)
        while tmp is not None and len(recorded(tmp)) <= len(last) and proc.poll() is None:
            time.sleep(0.005)                  # let this run finish a piece of its own first
        time.sleep(rng.uniform(0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if out.exists():
            break
        kills += 1
        tmp = staging_of(out)
        now = recorded(tmp)
        assert last <= now                    # nothing recorded is ever lost
        assert touched_unrecorded(tmp) <= 1   # one process writes one piece at a time
        last = now
    assert kills >= 2, "no kill landed mid-run"
    if not out.exists():
        r = cli(*args)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["pieces"] == 12 and doc["pieces_resumed"] == len(last) and doc["pieces_failed_check"] == 0
    assert tree_snapshot(out) == ref
    assert staging_of(out) is None and not list(tmp_path.glob(".out*"))


def interrupted(src: Path, out: Path, after: int, **options) -> Path:
    """A run of the library stopped (as by Ctrl-C) once `after` bytes are written."""
    def progress(done, total, note=""):
        if done >= after:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        convert(src, out, to="dense", device="cpu", max_shard_size=20_000_000, progress=progress, **options)
    tmp = staging_of(out)
    assert tmp is not None and not out.exists()
    return tmp


def test_recorded_piece_whose_bytes_changed_is_redone(source, tmp_path):
    src, ref = source
    out = tmp_path / "out"
    tmp = interrupted(src, out, 60_000_000)
    done = sorted(recorded(tmp))
    assert len(done) >= 2
    manifest = json.loads((tmp / RECORDS / "manifest.json").read_text())
    file, _, _, start, end = manifest["pieces"][done[1]]
    with open(tmp / file, "r+b") as fh:        # one flipped byte in a finished piece
        fh.seek((start + end) // 2)
        b = fh.read(1)
        fh.seek(-1, os.SEEK_CUR)
        fh.write(bytes([b[0] ^ 1]))
    result = convert(src, out, to="dense", device="cpu", max_shard_size=20_000_000, resume=True)
    assert result.details["pieces_resumed"] == len(done) - 1 and result.details["pieces_failed_check"] == 1
    assert tree_snapshot(out) == ref


def test_stray_files_among_the_records_are_left_alone(source, tmp_path):
    """A file in the records folder that no run wrote ('piece-²' has a digit that int() refuses)
    neither stops --resume nor counts as a piece."""
    src, ref = source
    out = tmp_path / "out"
    tmp = interrupted(src, out, 60_000_000)
    done = recorded(tmp)
    for name in ("piece-².json", "piece-x.json"):
        (tmp / RECORDS / name).write_text("{}")
    result = convert(src, out, to="dense", device="cpu", max_shard_size=20_000_000, resume=True)
    assert result.details["pieces_resumed"] == len(done) and result.details["pieces_failed_check"] == 0
    assert tree_snapshot(out) == ref


def test_changed_source_or_options_are_refused(source, tmp_path):
    src0, _ = source
    src = tmp_path / "src"
    shutil.copytree(src0, src)
    out = tmp_path / "out"
    tmp = interrupted(src, out, 30_000_000)
    # the same run without --resume: refused, pointing at --resume
    r = cli(str(src), str(out), "--to", "dense", "--device", "cpu", "--max-shard-size", SHARD)
    assert r.returncode == 1 and "holds an interrupted conversion" in r.stderr and "--resume" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    # other options: refused, saying what differs
    with pytest.raises(CtFormatError, match=r"made with other options \(drop_kv_cache=False, dtype=torch.bfloat16, keep_names=False, originals=False; "):
        convert(src, out, to="dense", device="cpu", max_shard_size=20_000_000, resume=True, dtype=_float16())
    # a shard rewritten in place with the same header (other weights, same shapes): refused
    shard = sorted(src.glob("*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CtFormatError, match=rf"made from a different source \(input file {shard.name} differs"):
        convert(src, out, to="dense", device="cpu", max_shard_size=20_000_000, resume=True)
    assert tmp.is_dir() and not out.exists()          # refusals keep the folder as it was


def _float16():
    import torch
    return torch.float16


@pytest.fixture
def small_disk(tmp_path):
    """A 24 MB tmpfs (the real ENOSPC); without the right to mount, a monkeypatched os.pwrite."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mnt)], capture_output=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_is_one_line_keeps_the_folder_and_resume_completes(source, small_disk):
    src, ref = source
    out = small_disk / "out"
    args = [str(src), str(out), "--to", "dense", "--device", "cpu", "--max-shard-size", SHARD]
    r = cli(*args)
    assert r.returncode == 1, r.stderr
    line = r.stderr.strip()
    assert len(line.splitlines()) == 1 and "No space left on device while writing" in line, line
    assert ".out.tmp-" in line and ".safetensors" in line and "--resume" in line and "Traceback" not in line
    tmp = staging_of(out)
    assert tmp is not None and not out.exists()
    done = recorded(tmp)
    assert done
    subprocess.run(["mount", "-o", "remount,size=400m", str(small_disk)], check=True)
    r = cli(*args, "--resume", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["pieces_resumed"] == len(done)
    assert tree_snapshot(out) == ref


def test_resume_without_a_folder_runs_fresh_and_refusals_leave_nothing(tmp_path):
    result = convert(FIXTURES / "tiny-mixtral", tmp_path / "o", to="dense", device="cpu", resume=True)
    assert result.details["pieces_resumed"] == 0 and (tmp_path / "o" / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]
    assert not list((tmp_path / "o").glob(".*"))       # no records inside the output

