"""A local HTTP server that speaks the parts of the Hugging Face Hub protocol that
huggingface_hub uses (reference: HUB.md §6): model info, tree listing, resolve with HEAD,
ETag, X-Repo-Commit, Range -> 206, and X-Error-Code on 404s. It records every request and
the body bytes sent per file, so tests can prove that only headers crossed the wire."""
from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class _Server(ThreadingHTTPServer):
    request_queue_size = 64     # the default 5 drops the connections of parallel range requests
                                # (the client then waits 1 s for a SYN retransmit)
    daemon_threads = True


class FakeHub:
    def __init__(self, repos: dict[str, Path]) -> None:
        self.repos = repos
        self.shas = {r: hashlib.sha1(r.encode()).hexdigest() for r in repos}
        self.requests: list[tuple[str, str, str | None]] = []
        self.sent: dict[str, int] = defaultdict(int)      # "repo/file" -> body bytes sent
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):        # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    # -- routing ---------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlparse(h.path).path)
        self.requests.append((h.command, path, h.headers.get("Range")))
        m = re.match(r"^/api/models/([^/]+/[^/]+)(?:/revision/([^/]+))?/?$", path)
        if m:
            return self._model_info(h, m.group(1), m.group(2) or "main", head)
        m = re.match(r"^/api/models/([^/]+/[^/]+)/tree/([^/]+)/?$", path)
        if m:
            return self._tree(h, m.group(1), m.group(2), head)
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if m:
            return self._resolve(h, m.group(1), m.group(2), m.group(3), head)
        self._error(h, 404, None, head)

    def _repo(self, h, repo: str, rev: str, head: bool) -> Path | None:
        if repo not in self.repos:
            self._error(h, 404, "RepoNotFound", head)
            return None
        if rev not in ("main", self.shas[repo]):
            self._error(h, 404, "RevisionNotFound", head)
            return None
        return self.repos[repo]

    def _files(self, root: Path) -> list[Path]:
        return sorted(p for p in root.iterdir() if p.is_file())

    def _model_info(self, h, repo, rev, head):
        root = self._repo(h, repo, rev, head)
        if root is not None:
            doc = {"id": repo, "modelId": repo, "sha": self.shas[repo], "private": False,
                   "siblings": [{"rfilename": p.name} for p in self._files(root)]}
            self._json(h, doc, head)

    def _tree(self, h, repo, rev, head):
        root = self._repo(h, repo, rev, head)
        if root is not None:
            doc = [{"type": "file", "path": p.name, "size": p.stat().st_size,
                    "oid": hashlib.sha1(p.name.encode() + self.shas[repo].encode()).hexdigest()}
                   for p in self._files(root)]
            self._json(h, doc, head)

    def _resolve(self, h, repo, rev, name, head):
        root = self._repo(h, repo, rev, head)
        if root is None:
            return
        f = root / name
        if ".." in Path(name).parts or not f.is_file():
            return self._error(h, 404, "EntryNotFound", head, commit=self.shas[repo])
        size = f.stat().st_size
        start, end, status = 0, size - 1, 200
        rng = h.headers.get("Range")
        if rng and not head:
            m = re.match(r"bytes=(\d+)-(\d*)", rng)
            start, end = int(m.group(1)), min(int(m.group(2) or size - 1), size - 1)
            status = 206
        h.send_response(status)
        h.send_header("X-Repo-Commit", self.shas[repo])
        h.send_header("ETag", '"' + hashlib.sha256(f"{repo}/{name}/{size}".encode()).hexdigest() + '"')
        h.send_header("Accept-Ranges", "bytes")
        h.send_header("Content-Length", str(size if head else end - start + 1))
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        h.end_headers()
        if not head:
            with open(f, "rb") as fh:
                fh.seek(start)
                body = fh.read(end - start + 1)
            self.sent[f"{repo}/{name}"] += len(body)    # counted before sending: the client may act at once
            h.wfile.write(body)

    def _json(self, h, doc, head):
        body = json.dumps(doc).encode()
        h.send_response(200)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)

    def _error(self, h, code, error_code, head, commit=None):
        body = json.dumps({"error": error_code or "not found"}).encode()
        h.send_response(code)
        if error_code:
            h.send_header("X-Error-Code", error_code)
        if commit:
            h.send_header("X-Repo-Commit", commit)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
