"""The temporary folder of a conversion, made resumable (spec §1.7): its name is derived from
what decides the output bytes (the source's identity, the target, its options, the plan), a
manifest inside says so in full, and a record per finished piece (written after the piece's
bytes are on disk) names its byte range and SHA-256. A later run with `resume` keeps every
piece whose record and bytes agree, redoes the rest, and publishes by one rename; a run whose
source or options differ from the folder's is refused, never mixed.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping

from ._version import __version__
from .errors import CtFormatError, ResumableError, SpecError, UnsupportedError
from .writer import Piece, ShardLayout, check_output, finish_folder, fsync_path, publish

__all__ = ["Staging", "RECORDS", "identity", "source_identity", "write_record"]

RECORDS = ".ctformat-resume"          # inside the temporary folder; removed before publishing
MANIFEST = "manifest.json"
SCHEMA = "ctformat.staging/1"


def source_identity(root: Path, shards: Iterable[str]) -> dict[str, list]:
    """Per input shard: size, modification time and SHA-256 of its header. Data is not hashed
    (that would read the whole input); a file rewritten in place gets a new mtime."""
    out = {}
    for name in shards:
        path = root / name if root.is_dir() else root
        st = path.stat()
        with open(path, "rb") as fh:
            head = fh.read(8)
            head += fh.read(int.from_bytes(head, "little")) if len(head) == 8 else b""
        out[name] = [st.st_size, st.st_mtime_ns, hashlib.sha256(head).hexdigest()]
    return out


def identity(*, source: dict[str, list], target: str, options: Mapping[str, Any] | None, layout: ShardLayout,
             sources: list[list[str]], config: Mapping[str, Any] | None, piece_size: int) -> dict[str, Any]:
    """Everything the output bytes depend on, as JSON; its digest names the temporary folder."""
    plan = hashlib.sha256(json.dumps([layout.plan, layout.names, sources], separators=(",", ":")).encode())
    return {"schema": SCHEMA, "ctformat": __version__, "target": target,
            "options": {k: str(v) for k, v in sorted((options or {}).items())}, "source": source,
            "plan": plan.hexdigest(), "config": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            "piece_size": piece_size}


def _key(ident: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def _write_json(path: Path, doc: Any) -> None:
    """Write, flush to disk, rename into place: a reader sees the old file or the whole new one."""
    part = path.with_name(path.name + ".part")
    with open(part, "w") as fh:
        fh.write(json.dumps(doc, indent=1))
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(part, path)
    fsync_path(path.parent)


def write_record(tmp: Path, key: str, index: int, piece: Piece, digest: str) -> None:
    """Piece `index` is on disk (fsynced by the writer): say so, durably."""
    try:
        _write_json(tmp / RECORDS / f"piece-{index:06d}.json",
                    {"key": key, "piece": piece.to_json(), "sha256": digest})
    except OSError as err:
        raise ResumableError(f"{err.strerror or err} while recording piece {index}", file=str(tmp),
                             option="resume") from err


def _differs(old: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    """How the run that made a folder differs from this one, in words."""
    if old.get("schema") != new["schema"] or old.get("ctformat") != new["ctformat"]:
        return f"by ctformat {old.get('ctformat')} (this is {new['ctformat']})"
    if old["source"] != new["source"]:
        changed = sorted(set(old["source"]) ^ set(new["source"]) |
                         {n for n in old["source"] if old["source"][n] != new["source"].get(n)})
        return f"from a different source (input file {changed[0]} differs in size, time or header)"
    if old["target"] != new["target"]:
        return f"to another target ({old['target']})"
    if old["options"] != new["options"] or old["piece_size"] != new["piece_size"]:
        words = ", ".join(f"{k}={v}" for k, v in old["options"].items())
        return f"with other options ({words or 'none'}; piece size {old['piece_size']})"
    return "with a different plan (another max shard size, or a changed config.json)"


class Staging:
    """The temporary folder beside OUT for one (source, target, options): created, or found and
    checked for `resume`; pieces record themselves into it; publish() renames it to OUT."""

    def __init__(self, out: Path, tmp: Path, key: str, layout: ShardLayout, pieces: list[Piece],
                 done: set[int], lock: int) -> None:
        self.out, self.tmp, self.key, self.layout, self.pieces = out, tmp, key, layout, pieces
        self.done = done              # indexes of pieces on disk and verified
        self.resumed = len(done)
        self.redone = 0               # recorded pieces whose bytes no longer matched
        self._lock = lock

    @classmethod
    def open(cls, out: Path, source: Path | None, *, layout: ShardLayout, pieces: list[Piece],
             ident: dict[str, Any], resume: bool, force: bool) -> Staging:
        """Refuse what cannot be written; continue the folder of an earlier run only with `resume`."""
        check_output(out, source, force)
        key = _key(ident)
        tmp = out.parent / f".{out.name}.tmp-{key[:8]}"
        for other in sorted(out.parent.glob(f".{glob_escape(out.name)}.tmp-*")):
            manifest = other / RECORDS / MANIFEST
            if other != tmp and manifest.is_file():
                old = json.loads(manifest.read_text())
                raise CtFormatError(f"{other}: an interrupted conversion into {out} made {_differs(old['identity'], ident)}"
                                    f" is kept there; remove it to convert again (--resume continues only the same "
                                    "source, target and options)")
        if (tmp / RECORDS / MANIFEST).is_file():
            lock = _lock(tmp)
            st = cls(out, tmp, key, layout, pieces, set(), lock)
            if not resume:
                os.close(lock)
                raise CtFormatError(f"{tmp}: holds an interrupted conversion into {out} "
                                    f"({len(st._recorded())} of {len(pieces)} pieces done)", option="resume")
            st._verify()
            return st
        shutil.rmtree(tmp, ignore_errors=True)        # a folder without a manifest holds nothing to keep
        (tmp / RECORDS).mkdir(parents=True)
        lock = _lock(tmp)
        try:
            _write_json(tmp / RECORDS / MANIFEST, {"identity": ident, "out": str(out),
                                                   "pieces": [p.to_json() for p in pieces]})
            for name, size in zip(layout.names, layout.sizes):
                with open(tmp / name, "wb") as fh:
                    fh.truncate(size)                 # sparse: each piece is written at its offset
            fsync_path(tmp)
        except OSError as err:
            os.close(lock)
            shutil.rmtree(tmp, ignore_errors=True)
            raise ResumableError(f"{err.strerror or err} while creating the temporary folder", file=str(tmp)) from err
        return cls(out, tmp, key, layout, pieces, set(), lock)

    @property
    def pending(self) -> list[int]:
        return [i for i in range(len(self.pieces)) if i not in self.done]

    def record(self, index: int, digest: str) -> None:
        write_record(self.tmp, self.key, index, self.pieces[index], digest)
        self.done.add(index)

    def _recorded(self) -> dict[int, str]:
        """Piece index -> recorded digest, for records that match this run's pieces."""
        out = {}
        for path in sorted((self.tmp / RECORDS).glob("piece-*.json")):
            try:
                doc = json.loads(path.read_text())
                index = int(path.stem.split("-")[1])
            except (ValueError, OSError):
                continue                               # a torn record: that piece is redone
            if doc.get("key") == self.key and index < len(self.pieces) and doc["piece"] == self.pieces[index].to_json():
                out[index] = doc["sha256"]
        return out

    def _verify(self) -> None:
        """Keep every recorded piece whose bytes still hash to its record (files read in
        parallel: the check is bound by reading them)."""
        recorded = self._recorded()

        def ok(index: int) -> bool:
            p = self.pieces[index]
            path = self.tmp / p.file
            if not path.is_file() or path.stat().st_size != self.layout.sizes[self.layout.names.index(p.file)]:
                return False
            return _hash_range(path, p.start, p.end) == recorded[index]
        with ThreadPoolExecutor(min(8, os.cpu_count() or 1)) as pool:
            good = dict(zip(recorded, pool.map(ok, recorded)))
        self.done = {i for i, g in good.items() if g}
        self.resumed, self.redone = len(self.done), len(recorded) - len(self.done)
        for path in sorted((self.tmp / RECORDS).glob("piece-*.json")):
            index = path.stem.split("-", 1)[1]
            if index.isascii() and index.isdigit() and int(index) not in self.done:   # '²' is a digit to isdigit()
                path.unlink()

    def publish(self, config: Mapping[str, Any] | None, source: Path | None, force: bool, *,
                extra_files: Mapping[str, Any] | None = None, skip_files: tuple[str, ...] = ()) -> Path:
        """Every piece done: the index, config and other files (writer.finish_folder's
        `extra_files` and `skip_files`), flushed; then one rename."""
        missing = self.pending
        if missing:
            raise CtFormatError(f"{self.tmp}: {len(missing)} piece(s) not written; internal error")
        try:
            finish_folder(self.tmp, self.layout, config, source, durable=True, extra_files=extra_files,
                          skip_files=skip_files)
            shutil.rmtree(self.tmp / RECORDS)
            publish(self.tmp, self.out, force)
            fsync_path(self.out.parent)
        except OSError as err:
            raise ResumableError(f"{err.strerror or err} while finishing", file=str(self.tmp), option="resume") from err
        finally:
            self.release()
        return self.out

    def release(self) -> None:
        if self._lock >= 0:
            os.close(self._lock)
            self._lock = -1

    def abandon(self, exc: BaseException) -> None:
        """After a failure: a refusal of the input removes the folder (nothing is left, spec §1.5),
        and so does any failure before a piece was recorded; otherwise (no space, a kill, a
        worker lost, Ctrl-C) the folder is kept for --resume."""
        self.release()
        refused = isinstance(exc, (SpecError, UnsupportedError))
        if refused or not (isinstance(exc, ResumableError) or self.done or self._recorded()):
            shutil.rmtree(self.tmp, ignore_errors=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def _lock(tmp: Path) -> int:
    """An exclusive lock on the folder, held by the driver until it publishes or fails."""
    fd = os.open(tmp / RECORDS / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise CtFormatError(f"{tmp}: another conversion is writing there now") from None
    return fd


def _hash_range(path: Path, start: int, end: int) -> str:
    h, buf = hashlib.sha256(), bytearray(16 << 20)
    with open(path, "rb", buffering=0) as fh:
        fh.seek(start)
        left = end - start
        while left > 0:
            n = fh.readinto(memoryview(buf)[:min(left, len(buf))])
            if not n:
                break
            h.update(memoryview(buf)[:n])
            left -= n
    return h.hexdigest()
