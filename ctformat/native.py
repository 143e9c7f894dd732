"""The compiled GGUF block codec (ggml_native.c, spec/gguf.md §2.1), built at first use.

The C source ships with the package; the system C compiler (`$CC`, else `cc`) builds it once into
`$CTFORMAT_CACHE` (default ~/.cache/ctformat), under a name carrying the digest of the source,
the build flags and the machine, so a changed source is a new file and a stale one is never
loaded. Each build writes a private temporary file and renames it into place: concurrent first
uses (threads, worker processes) each get a whole library. Without a compiler, or when the build
or load fails, `codec()` is None and ggml.py takes the numpy path, which writes the same bytes.
`CTFORMAT_NATIVE=0` turns the compiled codec off. Nothing here is a runtime dependency: ctypes
is in the standard library and the library uses no Python C-API.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shlex
import subprocess
import tempfile
import threading
from pathlib import Path

__all__ = ["SOURCE", "cache_dir", "library_path", "build", "codec", "enabled"]

SOURCE = Path(__file__).with_name("ggml_native.c")
_FLAGS = ("-O3", "-shared", "-fPIC", "-fno-strict-aliasing")
_VARIANTS = {"auto": (), "scalar": ("-DCTF_SCALAR",)}
_LOCK = threading.Lock()
_LOADED: dict[str, object] = {}         # variant -> ctypes library, or None when it cannot be had


def enabled() -> bool:
    return os.environ.get("CTFORMAT_NATIVE", "1").strip().lower() not in ("0", "false", "no", "off")


def cache_dir() -> Path:
    return Path(os.environ.get("CTFORMAT_CACHE") or Path.home() / ".cache" / "ctformat")


def _compiler() -> list[str]:
    return shlex.split(os.environ.get("CC") or "cc")


def library_path(variant: str = "auto") -> Path:
    """Where the build of `variant` lives: the name carries the digest of source, compiler, flags
    and machine, so any change is another file."""
    h = hashlib.sha256(SOURCE.read_bytes())
    h.update("\0".join((*_compiler(), *_FLAGS, *_VARIANTS[variant], platform.machine())).encode())
    return cache_dir() / f"ggml_native-{variant}-{h.hexdigest()[:16]}.so"


def build(variant: str = "auto") -> Path:
    """Compile `variant` into the cache unless it is there; raises on any failure."""
    target = library_path(variant)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=target.stem + ".", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        subprocess.run([*_compiler(), *_FLAGS, *_VARIANTS[variant], "-o", tmp, str(SOURCE)], check=True,
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        os.replace(tmp, target)              # atomic: a reader sees no file or a whole one
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _load(path: Path):
    lib = ctypes.CDLL(str(path))             # CDLL: every call releases the GIL
    lib.ctf_variant.restype = ctypes.c_int
    lib.ctf_variant.argtypes = []
    p, i64, i = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ctf_encode.restype = ctypes.c_int
    lib.ctf_encode.argtypes = [p, p, i64, i64, i, i, p, p, p, i, i64]
    return lib


def codec(variant: str = "auto"):
    """The loaded library (ctf_encode, ctf_variant), or None: disabled, no compiler, or the build
    or load failed. Decided once per process and variant."""
    if not enabled():
        return None
    with _LOCK:
        if variant not in _LOADED:
            try:
                _LOADED[variant] = _load(build(variant))
            except (OSError, subprocess.SubprocessError, AttributeError):
                _LOADED[variant] = None
        return _LOADED[variant]


def _forget() -> None:
    """Drop what this process decided (tests change the environment between calls)."""
    with _LOCK:
        _LOADED.clear()
