"""The Hub's limits and secrets: a pull stops reading a file at the size its index records, keeps
the remote version numbers, and no token reaches the terminal, not even in debug tracebacks."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import REPO, run_cli

from mnist_peft.registry.adapter_registry import AdapterRegistry

BASE = REPO / "adapters" / "base" / "v1"
ADAPTER = REPO / "adapters" / "digit-9" / "v1"

# ----------------------------------------------------------------------------- no token in debug output
TOKEN = "hf_SENTINELtokenDoNotPrint1234567890"  # the configured one (HF_TOKEN)
IN_BODY = ("hf_AnotherTokenTheServerLeaks987654", "sk-opaque-secret-after-bearer")  # tokens of the server's own


class _Leaky(BaseHTTPRequestHandler):
    """Answers every request with HTTP 500 and an error body that echoes the request's
    Authorization header and carries other tokens, bare and after ``Bearer``."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _answer(self) -> None:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            self.rfile.read(n)
        text = f"echo: {self.headers.get('Authorization')}; also {IN_BODY[0]} and Bearer {IN_BODY[1]}"
        body = json.dumps({"error": text}).encode()
        self.send_response(500)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_HEAD = do_PUT = _answer


def test_debug_tracebacks_never_print_a_token(tmp_path: Path) -> None:
    """MNIST_PEFT_DEBUG=1 prints the whole traceback (the server's message included), with every
    token in it redacted: the configured one, ``hf_...`` and ``Bearer ...``."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Leaky)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reg = AdapterRegistry(tmp_path / "reg")
        reg.add("digit-9", ADAPTER)
        env = {
            "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
            "HF_TOKEN": TOKEN,
            "HF_HOME": str(tmp_path / "hf"),
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_ETAG_TIMEOUT": "2",
            "HF_HUB_DOWNLOAD_TIMEOUT": "2",
            "MNIST_PEFT_DEBUG": "1",
        }
        for args in (
            ["push", "--repo-id", "team/x", "--root", str(reg.root)],
            ["pull", "--repo-id", "team/x", "--root", str(tmp_path / "new")],
        ):
            proc = run_cli(*args, env=env, timeout=120)
            out = proc.stdout + proc.stderr
            assert proc.returncode == 1, out
            assert "Traceback" in out and "<redacted>" in out, out  # the debug output is there, redacted
            for secret in (TOKEN, *IN_BODY):
                assert secret not in out and secret[:12] not in out, (secret, out)
    finally:
        server.shutdown()


# ----------------------------------------------------------------------------- the real local Hub
@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory):
    from hub_server import HubServer

    server = HubServer.start(tmp_path_factory.mktemp("hub"))
    yield server
    server.stop()


OVERSIZED = 40 << 20  # what the tampered server hands out instead of the recorded ~30 kB


def test_a_file_larger_than_its_recorded_size_is_cut_off_not_downloaded(hub, tmp_path: Path) -> None:
    """The server swaps an adapter's weights for 40 MB: the pull refuses it from the size the
    index records, before reading it (the server got at most what the loopback's socket buffers
    hold, a few MB, onto the wire; without the cap it sent all 40 MB); nothing is left in the
    registry or the Hub cache."""
    env = hub.env(tmp_path / "hf-home")
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-9", ADAPTER)
    assert run_cli("push", "--repo-id", "team/big", "--root", str(reg.root), env=env).returncode == 0
    recorded = reg.get("digit-9").files["adapter_model.safetensors"]
    obj = hub.lfs_object_path("team/big", str(recorded["sha256"]))
    obj.write_bytes(b"\0" * OVERSIZED)
    hub.sent.clear()
    root = tmp_path / "victim"
    proc = run_cli("pull", "--repo-id", "team/big", "--root", str(root), env=env)
    assert proc.returncode == 1, proc.stderr
    assert (
        f"digit-9/adapter_model.safetensors from 'team/big' is larger than the {recorded['size']:,} bytes its index records" in proc.stderr
    )
    sent = {path: n for path, n in hub.sent.items() if path.endswith("adapter_model.safetensors")}
    assert sent and max(sent.values()) < OVERSIZED // 4, sent  # far from all of it
    assert not root.exists()
    blobs = [p for p in (tmp_path / "hf-home").rglob("*") if p.is_file() and p.stat().st_size > recorded["size"]]
    assert blobs == []


def test_a_stream_without_a_length_is_cut_off_at_the_recorded_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that announces no length (chunked) and streams 40 MB: the download stops reading
    one chunk past the recorded size, and the file on disk never holds more than that size."""
    from huggingface_hub import constants

    from mnist_peft.errors import IntegrityError
    from mnist_peft.hub.pull import DOWNLOAD_CHUNK, download_capped

    sent = [0]

    class Endless(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            piece = b"\1" * (1 << 16)
            try:
                for _ in range(OVERSIZED // len(piece)):
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    sent[0] += len(piece)
                self.wfile.write(b"0\r\n\r\n")
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True

    server = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"  # as HF_ENDPOINT would make it, set after import
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    dest = tmp_path / "files" / "digit-9" / "adapter_model.safetensors"
    try:
        with pytest.raises(IntegrityError, match="larger than the 100,000 bytes its index records") as err:
            download_capped("team/x", "a" * 40, "digit-9/adapter_model.safetensors", dest, size=100_000, token=None, label="d")
    finally:
        server.shutdown()
    read = int(str(err.value).split("stopped after ")[1].split(" bytes")[0].replace(",", ""))
    assert 100_000 < read <= 100_000 + DOWNLOAD_CHUNK
    assert dest.stat().st_size <= 100_000  # the excess was never written
    assert sent[0] < OVERSIZED // 4  # and never read from the socket: the server's writes backed up and failed


def test_a_pull_keeps_the_remote_version_number_where_it_is_free(hub, tmp_path: Path) -> None:
    """digit-9@2 pushed comes back as digit-9@2 into an empty registry; into one that numbered
    digit-9 up to 3 already, it becomes digit-9@4, and the output says so."""
    env = hub.env(tmp_path / "hf-home")
    reg = AdapterRegistry(tmp_path / "reg")
    reg.add("digit-9", REPO / "adapters" / "digit-3" / "v1")
    reg.add("digit-9", ADAPTER)
    pushed = run_cli("push", "--repo-id", "team/versions", "--root", str(reg.root), "--json", env=env)
    assert pushed.returncode == 0 and json.loads(pushed.stdout)["pushed"] == ["digit-9@2"], pushed.stderr
    empty = tmp_path / "empty"
    proc = run_cli("pull", "--repo-id", "team/versions", "--root", str(empty), "--json", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["added"] == ["digit-9@2"] and json.loads(proc.stdout)["renumbered"] == {}
    assert [e.ref for e in AdapterRegistry(empty).list()] == ["digit-9@2"]
    assert (AdapterRegistry(empty).path("digit-9@2") / "adapter_model.safetensors").read_bytes() == (
        ADAPTER / "adapter_model.safetensors"
    ).read_bytes()

    busy = AdapterRegistry(tmp_path / "busy")
    for _ in range(3):
        busy.add("digit-9", REPO / "adapters" / "digit-3" / "v1")
    proc = run_cli("pull", "--repo-id", "team/versions", "--root", str(busy.root), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "digit-9@2 is used here already (versions are never reused), stored as digit-9@4" in proc.stdout, proc.stdout
    assert [e.ref for e in busy.list()] == ["digit-9@1", "digit-9@2", "digit-9@3", "digit-9@4"]


def test_a_recorded_size_beyond_any_real_file_is_refused_before_the_download(tmp_path: Path) -> None:
    """The recorded size comes from the remote index, a stranger's word: it caps the download, but is
    itself capped (a hostile index may record a terabyte). Nothing is fetched: the endpoint is dead."""
    from mnist_peft.errors import IntegrityError
    from mnist_peft.hub.pull import MAX_PULLED_FILE_BYTES, download_capped

    dest = tmp_path / "x" / "adapter_model.safetensors"
    with pytest.raises(IntegrityError, match=r"recorded as 1,099,511,627,776 bytes, more than any base or adapter file needs"):
        download_capped("me/repo", "0" * 40, "x/adapter_model.safetensors", dest, size=1 << 40, token=None, label="x")
    assert MAX_PULLED_FILE_BYTES < 1 << 40 and not dest.exists() and not dest.parent.exists()


def test_a_warning_printed_by_the_cli_never_shows_a_token(capsys: pytest.CaptureFixture[str]) -> None:
    import warnings

    from mnist_peft.cli.common import warnings_as_lines

    with warnings_as_lines():
        warnings.warn("the server said: Bearer hf_abcdefghijklmnop rejected", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert err.startswith("warning: the server said: ") and "hf_abcdefghijklmnop" not in err and "<redacted>" in err
