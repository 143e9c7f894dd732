"""Checkpoints on the Hugging Face Hub, read without downloading weights (spec §1.6).

config.json and the index come through huggingface_hub's cache like any small file; each
shard's header is read with HTTP Range requests against the commit the revision resolves
to, so every byte read belongs to one snapshot. With HF_HUB_OFFLINE=1 the local cache is
used instead. Tensor data (validate --deep) is read by range, one tensor at a time.
"""
from __future__ import annotations

import threading
from concurrent.futures import Future, ThreadPoolExecutor

from ._version import __version__
from .checkpoint import Checkpoint, open_checkpoint, read_checkpoint
from .errors import CheckpointNotFoundError, CtFormatError, HeaderError
from .header import TensorInfo, header_length, parse_header

__all__ = ["open_hub_checkpoint", "HubFiles"]

_FIRST_READ = 100_000          # one request covers most headers, as huggingface_hub does
_POOL = 16                     # range requests in flight at once when many shards are read


class HubFiles:
    """The files of one Hub repo at one commit, read over HTTP."""

    def __init__(self, repo_id: str, commit: str, siblings: set[str], *, endpoint: str | None,
                 cache_dir: str | None) -> None:
        self.repo_id, self.commit, self.siblings = repo_id, commit, siblings
        self.endpoint, self.cache_dir = endpoint, cache_dir
        self.label = f"{repo_id}@{commit[:12]}"
        self.bytes_read = 0                 # body bytes received, for tests and --debug
        self._fetched: dict[str, Future] = {}   # prefetch(): shard -> (raw header, file size) to come
        self._lock = threading.Lock()       # bytes_read is counted from several threads

    def is_file(self, name: str) -> bool:
        return name in self.siblings

    def present(self, name: str) -> bool:
        return name in self.siblings

    def names(self) -> list[str]:
        return sorted(self.siblings)

    def read_bytes(self, name: str) -> bytes:
        from huggingface_hub import hf_hub_download
        path = hf_hub_download(self.repo_id, name, revision=self.commit, endpoint=self.endpoint,
                               cache_dir=self.cache_dir, library_name="ctformat", library_version=__version__)
        with open(path, "rb") as fh:
            return fh.read()

    def _get(self, name: str, start: int, end: int) -> tuple[bytes, int]:
        """Bytes [start, end] of a file and the file's total size, by one Range request."""
        from huggingface_hub import hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status
        url = hf_hub_url(self.repo_id, name, revision=self.commit, endpoint=self.endpoint)
        headers = build_hf_headers(library_name="ctformat", library_version=__version__)
        headers["Range"] = f"bytes={start}-{end}"
        r = get_session().get(url, headers=headers, follow_redirects=True)
        hf_raise_for_status(r)
        body = r.content
        with self._lock:
            self.bytes_read += len(body)
        if r.status_code == 206:
            total = int(r.headers.get("Content-Range", "/0").rsplit("/", 1)[1])
            return body, total
        return body[start:end + 1], len(body)   # server ignored Range: slice the full body

    def prefetch(self, names: list[str]) -> None:
        """Start fetching the headers of many shards at once (a bounded pool of range requests,
        each shard: its 8-byte length, then its header exactly); header() waits for its own, so
        parsing overlaps the transfers. No byte beyond the headers but 8 per shard."""
        todo = [n for n in dict.fromkeys(names) if n in self.siblings and n not in self._fetched]
        if len(todo) < 2:
            return                          # one shard: header() reads it in one request
        pool = ThreadPoolExecutor(min(_POOL, len(todo)), thread_name_prefix="ctformat-hub")
        self._fetched.update((n, pool.submit(self._exact_header, n)) for n in todo)
        pool.shutdown(wait=False)           # the submitted requests still run; no new ones

    def _exact_header(self, name: str) -> tuple[bytes, int]:
        prefix, size = self._get(name, 0, 7)
        n = header_length(prefix, size, name)
        return self._get(name, 8, 8 + n - 1)[0], size

    def header(self, name: str) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        pending = self._fetched.pop(name, None)
        if pending is not None:
            raw, size = pending.result()        # raises what the request raised
            return parse_header(raw, size, name)
        first, size = self._get(name, 0, _FIRST_READ - 1)
        n = header_length(first[:8], size, name)
        raw = first[8:8 + n]
        if len(raw) < n:
            raw += self._get(name, 8 + len(raw), 8 + n - 1)[0]
        return parse_header(raw, size, name)

    def readinto(self, name: str, start: int, buf) -> int:
        body, _ = self._get(name, start, start + len(buf) - 1)
        view = memoryview(buf).cast("B")
        view[: len(body)] = body
        return len(body)


def open_hub_checkpoint(repo_id: str, revision: str | None = None, *, strict: bool = True,
                        endpoint: str | None = None, cache_dir: str | None = None) -> Checkpoint:
    """Open `org/name` at `revision` from its headers, or from the local cache when offline."""
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import (LocalEntryNotFoundError, OfflineModeIsEnabled, RepositoryNotFoundError,
                                        RevisionNotFoundError)
    if constants.HF_HUB_OFFLINE:
        return _open_cached(repo_id, revision, strict, cache_dir)
    endpoint = endpoint or constants.ENDPOINT   # one endpoint for every request
    try:
        info = HfApi(endpoint=endpoint, library_name="ctformat", library_version=__version__).model_info(
            repo_id, revision=revision)
    except RepositoryNotFoundError:
        raise CheckpointNotFoundError(f"{repo_id}: no such model on the Hub, or no access to it", rule="FILE-01") from None
    except RevisionNotFoundError:
        raise CheckpointNotFoundError(f"{repo_id}: no revision {revision!r}", rule="FILE-01") from None
    except (OfflineModeIsEnabled, LocalEntryNotFoundError):
        return _open_cached(repo_id, revision, strict, cache_dir)
    except Exception as err:  # network failures come as httpx errors, not OSError
        raise CtFormatError(f"{repo_id}: no such local path, and the Hub could not be reached "
                            f"({type(err).__name__}: {err}); set HF_HUB_OFFLINE=1 to use the local cache") from None
    siblings = {s.rfilename for s in (info.siblings or [])}
    files = HubFiles(repo_id, info.sha, siblings, endpoint=endpoint, cache_dir=cache_dir)
    try:
        return read_checkpoint(files, strict=strict)
    except CtFormatError:
        raise
    except Exception as err:  # HTTP errors and dropped connections while reading headers
        raise HeaderError(f"Hub request failed: {type(err).__name__}: {err}", rule="FILE-05",
                          file=files.label) from None


def _open_cached(repo_id: str, revision: str | None, strict: bool, cache_dir: str | None) -> Checkpoint:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError
    try:
        folder = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise CheckpointNotFoundError(f"{repo_id}: offline and not in the local Hub cache ({type(err).__name__})",
                                      rule="FILE-01") from None
    return open_checkpoint(folder, strict=strict)
