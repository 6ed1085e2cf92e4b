"""A real local Hugging Face Hub, for trying push and pull without an account and for the tests:
olah for reads, a small write server in front (``mnist-peft hub-local`` runs it).

olah (a self-hosted Hub mirror) serves git repositories in its local-mirror folder over the Hub's
read API (repo info, revisions, tree, ``resolve`` with LFS objects). It has no write API, so
:class:`HubServer` listens in front of it and implements only the write endpoints
``huggingface_hub`` calls (create repo, validate-yaml, preupload, the LFS batch API + PUT, commit)
by making real git commits, with LFS pointer files and objects under ``.git/lfs/objects``, in
olah's mirror folder. Every other request is forwarded to olah unchanged.

Only 127.0.0.1 is used, with no accounts: any client may write, so it is for trying things on one's
own machine, never a server for others. Start with ``HubServer.start(folder)``; ``stop()`` ends both
servers. olah pins its own dependencies, so it lives in a venv of its own (``.olah-venv``).
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from mnist_peft.errors import HubError

LFS_SUFFIXES = (".safetensors", ".bin", ".pt")
GIT = [
    "git",
    "-c",
    "user.name=mnist-peft test hub",
    "-c",
    "user.email=hub@127.0.0.1",
    "-c",
    "filter.lfs.clean=",
    "-c",
    "filter.lfs.smudge=",
    "-c",
    "filter.lfs.process=",
    "-c",
    "filter.lfs.required=false",
]


def find_olah() -> str:
    """The ``olah-cli`` executable: ``$MNIST_PEFT_OLAH``, ``.olah-venv/bin/olah-cli`` in the current
    folder or the checkout this package runs from, or on PATH."""
    candidates = [
        os.environ.get("MNIST_PEFT_OLAH"),
        str(Path.cwd() / ".olah-venv/bin/olah-cli"),
        str(Path(__file__).resolve().parents[2] / ".olah-venv/bin/olah-cli"),
        shutil.which("olah-cli"),
    ]
    for c in candidates:
        if c and Path(c).is_file():
            return c
    raise HubError(
        'olah is needed for the local Hub: `python3 -m venv .olah-venv && .olah-venv/bin/pip install "olah==0.5.4"` '
        "(or set MNIST_PEFT_OLAH to its olah-cli); .ci/run does this for the tests",
        repo_id="",
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_port(port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise HubError(f"olah exited with code {proc.returncode} (its log: olah.log in the Hub's folder)", repo_id="")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise HubError(f"nothing listens on 127.0.0.1:{port} after {timeout} s (olah's log: olah.log in the Hub's folder)", repo_id="")


class HubServer:
    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.mirrors = root / "mirrors"
        self.staging = root / "lfs-staging"
        self.port = port or free_port()
        self.olah_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._olah: subprocess.Popen | None = None
        self._httpd: ThreadingHTTPServer | None = None
        self._git_lock = threading.Lock()
        self.sent: dict[str, int] = {}
        """Body bytes the server got onto the wire per request path (what a client could have read)."""

    # -- lifecycle
    @classmethod
    def start(cls, root: str | os.PathLike[str], port: int | None = None) -> HubServer:
        server = cls(Path(root), port)
        server._start()
        return server

    def _start(self) -> None:
        (self.mirrors / "models").mkdir(parents=True, exist_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        config = self.root / "olah.toml"
        config.write_text(
            "[basic]\n"
            'host = "127.0.0.1"\n'
            f"port = {self.olah_port}\n"
            f'repos-path = "{self.root / "olah-repos"}"\n'
            f'mirrors-path = ["{self.mirrors}"]\n'
            f'mirror-netloc = "127.0.0.1:{self.port}"\n'
            f'mirror-lfs-netloc = "127.0.0.1:{self.port}"\n'
            "metadata-cache-ttl = 0\n"  # a push must be visible at once, not after 10 minutes
            "\n[accessibility]\noffline = true\n"
        )
        olah = find_olah()
        log = open(self.root / "olah.log", "wb")  # noqa: SIM115 (olah writes to it until stop() closes it)
        try:
            self._olah = subprocess.Popen([olah, "-c", str(config)], cwd=self.root, stdout=log, stderr=subprocess.STDOUT)
            _wait_for_port(self.olah_port, 60, self._olah)
            handler = type("Handler", (_Handler,), {"hub": self})
            self._httpd = ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        except OSError as exc:  # the port is taken: olah must not outlive the failed start
            self.stop()
            if isinstance(exc, HubError):
                raise
            raise HubError(f"cannot listen on 127.0.0.1:{self.port} ({exc.strerror}); choose another port", repo_id="") from exc
        except BaseException:
            self.stop()
            raise
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._olah is not None:
            self._olah.terminate()
            try:
                self._olah.wait(10)
            except subprocess.TimeoutExpired:
                self._olah.kill()
            self._olah = None

    def env(self, hf_home: Path) -> dict[str, str]:
        """What a client needs to talk to this Hub."""
        return {"HF_ENDPOINT": self.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(hf_home), "HF_HUB_DISABLE_TELEMETRY": "1"}

    # -- repos
    def repo_path(self, repo_id: str) -> Path:
        return self.mirrors / "models" / repo_id

    def create_repo(self, repo_id: str) -> bool:
        path = self.repo_path(repo_id)
        with self._git_lock:
            if path.exists():
                return False
            path.mkdir(parents=True)
            subprocess.run([*GIT, "init", "-q", "-b", "main"], cwd=path, check=True)
            (path / ".gitattributes").write_text("".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES))
            subprocess.run([*GIT, "add", "-A"], cwd=path, check=True)
            subprocess.run([*GIT, "commit", "-q", "-m", "initial commit"], cwd=path, check=True)
        return True

    def lfs_object_path(self, repo_id: str, oid: str) -> Path:
        return self.repo_path(repo_id) / ".git" / "lfs" / "objects" / oid[:2] / oid[2:4] / oid

    def head(self, repo_id: str) -> str:
        return subprocess.run(
            [*GIT, "rev-parse", "HEAD"], cwd=self.repo_path(repo_id), check=True, capture_output=True, text=True
        ).stdout.strip()

    def tag(self, repo_id: str, tag: str, revision: str) -> tuple[int, str]:
        """``git tag`` as the Hub's tag endpoint does it: 409 if the tag exists, 404 for an unknown repo or revision."""
        path = self.repo_path(repo_id)
        if not path.exists():
            return 404, "Repository not found"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", tag):
            return 400, f"invalid tag {tag!r}"
        with self._git_lock:
            if subprocess.run([*GIT, "rev-parse", "-q", "--verify", f"refs/tags/{tag}"], cwd=path, capture_output=True).returncode == 0:
                return 409, f"tag {tag} already exists"
            done = subprocess.run([*GIT, "tag", tag, revision], cwd=path, capture_output=True, text=True)
            if done.returncode != 0:
                return 404, f"revision {revision} not found"
        return 200, ""

    def commit(self, repo_id: str, lines: list[dict]) -> str:
        path = self.repo_path(repo_id)
        header = next(line["value"] for line in lines if line["key"] == "header")
        with self._git_lock:
            parent = header.get("parentCommit")
            if parent and parent != self.head(repo_id):  # as the real Hub: a commit on a stale parent is refused
                raise StaleParentError(f"parent commit {parent} is not the head of {repo_id}")
            for line in lines:
                key, value = line["key"], line["value"]
                if key == "file":
                    dest = _safe_join(path, value["path"])
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes(base64.b64decode(value["content"]))
                elif key == "lfsFile":
                    oid, size = value["oid"], value["size"]
                    staged = self.staging / oid
                    obj = self.lfs_object_path(repo_id, oid)
                    if staged.exists():
                        obj.parent.mkdir(parents=True, exist_ok=True)
                        shutil.move(staged, obj)
                    if not obj.exists():
                        raise ValueError(f"LFS object {oid} was never uploaded")
                    dest = _safe_join(path, value["path"])
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n")
                elif key in ("deletedFile", "deletedFolder"):
                    target = _safe_join(path, value["path"])
                    if target.is_dir():
                        shutil.rmtree(target)
                    elif target.exists():
                        target.unlink()
            subprocess.run([*GIT, "add", "-A"], cwd=path, check=True)
            message = header.get("summary") or "commit"
            if header.get("description"):
                message += "\n\n" + header["description"]
            subprocess.run([*GIT, "commit", "-q", "--allow-empty", "-m", message], cwd=path, check=True)
            return subprocess.run([*GIT, "rev-parse", "HEAD"], cwd=path, check=True, capture_output=True, text=True).stdout.strip()


class StaleParentError(Exception):
    """A commit named a parent that is no longer the branch head (HTTP 412 on the Hub)."""


def _safe_join(root: Path, rel: str) -> Path:
    dest = (root / rel).resolve()
    if root.resolve() not in dest.parents or ".git" in Path(rel).parts:
        raise ValueError(f"path {rel!r} escapes the repository")
    return dest


_REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    # -- helpers
    def _body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _json(self, status: int, obj: object, content_type: str = "application/json") -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    # -- routing
    def do_POST(self) -> None:
        path = self.path.split("?")[0]
        if path == "/api/repos/create":
            body = json.loads(self._body())
            repo_id = f"{body['organization']}/{body['name']}" if body.get("organization") else body["name"]
            if not self.hub.create_repo(repo_id):
                return self._json(409, {"error": "You already created this model repo", "url": f"{self.hub.endpoint}/{repo_id}"})
            return self._json(200, {"url": f"{self.hub.endpoint}/{repo_id}"})
        if path == "/api/validate-yaml":
            self._body()
            return self._json(200, {"errors": [], "warnings": []})
        m = re.fullmatch(rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", path)
        if m:
            body = json.loads(self._body())
            files = [
                {"path": f["path"], "uploadMode": "lfs" if f["path"].endswith(LFS_SUFFIXES) else "regular", "shouldIgnore": False}
                for f in body["files"]
            ]
            return self._json(200, {"files": files})
        m = re.fullmatch(rf"/{_REPO}\.git/info/lfs/objects/batch", path)
        if m:
            body = json.loads(self._body())
            objects = []
            for obj in body["objects"]:
                entry = {"oid": obj["oid"], "size": obj["size"], "authenticated": True}
                if not self.hub.lfs_object_path(m["repo"], obj["oid"]).exists():
                    entry["actions"] = {"upload": {"href": f"{self.hub.endpoint}/lfs-upload/{obj['oid']}", "header": {}}}
                objects.append(entry)
            return self._json(200, {"transfer": "basic", "objects": objects}, "application/vnd.git-lfs+json")
        m = re.fullmatch(rf"/api/models/{_REPO}/tag/(?P<rev>[^/]+)", path)
        if m:
            body = json.loads(self._body())
            status, message = self.hub.tag(m["repo"], str(body.get("tag", "")), urllib.parse.unquote(m["rev"]))
            return self._json(status, {"error": message} if status != 200 else {})
        m = re.fullmatch(rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", path)
        if m:
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            if not self.hub.repo_path(m["repo"]).exists():
                return self._json(404, {"error": "Repository not found"})
            try:
                sha = self.hub.commit(m["repo"], lines)
            except StaleParentError as exc:
                return self._json(412, {"error": str(exc)})
            except ValueError as exc:
                return self._json(400, {"error": str(exc)})
            return self._json(200, {"commitUrl": f"{self.hub.endpoint}/{m['repo']}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})
        return self._forward()

    def do_PUT(self) -> None:
        m = re.fullmatch(r"/lfs-upload/(?P<oid>[0-9a-f]{64})", self.path)
        if not m:
            return self._forward()
        data = self._body()
        if hashlib.sha256(data).hexdigest() != m["oid"]:
            return self._json(400, {"error": "sha256 mismatch"})
        (self.hub.staging / m["oid"]).write_bytes(data)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def do_GET(self) -> None:
        self._forward()

    def do_HEAD(self) -> None:
        self._forward()

    def _forward(self) -> None:
        """Relay the request to olah and its answer back, unchanged."""
        body = self._body()
        conn = http.client.HTTPConnection("127.0.0.1", self.hub.olah_port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection", "accept-encoding")}
        conn.request(self.command, self.path, body=body or None, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data) if self.command != "HEAD" else resp.getheader("content-length") or 0))
        self.end_headers()
        conn.close()
        if self.command != "HEAD":
            self._send_counted(data)

    def _send_counted(self, data: bytes, chunk: int = 1 << 16) -> None:
        """Write ``data`` a chunk at a time, counting in ``hub.sent`` what got out before the client
        hung up (a client that stops reading makes the writes block, then fail)."""
        path, sent = self.path.split("?")[0], 0
        try:
            for i in range(0, len(data), chunk):
                self.wfile.write(data[i : i + chunk])
                sent += len(data[i : i + chunk])
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        finally:
            self.hub.sent[path] = self.hub.sent.get(path, 0) + sent


if __name__ == "__main__":  # manual use: python tests/hub_server.py DIR
    hub = HubServer.start(sys.argv[1] if len(sys.argv) > 1 else ".hub")
    print(f"Hub at {hub.endpoint} (olah on {hub.olah_port}); Ctrl+C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        hub.stop()
