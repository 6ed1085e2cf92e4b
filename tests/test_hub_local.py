"""`mnist-peft hub-local`: the README's block that tries push and pull without an account runs as
written against the local Hub the tests use, and the Hub stops cleanly."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from hub_server import find_olah, free_port


def _readme_hub_block() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Push and pull without an account") :]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1)


@pytest.mark.slow  # a whole Hub round trip of the reference registry through the CLI
def test_the_readmes_hub_block_runs_against_the_local_hub_and_stops_it(tmp_path: Path) -> None:
    find_olah()  # olah is needed (.ci/run installs it; MNIST_PEFT_OLAH points at it)
    block = _readme_hub_block()
    assert "mnist-peft hub-local --port 8999 &" in block and "kill %1" in block
    port = free_port()
    shutil.copytree(REPO / "adapters", tmp_path / "adapters")
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # the venv's mnist-peft
        "HF_HOME": str(tmp_path / "hf-home"),  # no token of the machine's user goes anywhere
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
    # If a line fails, stop the Hub before bash exits (an orphan would hold the output pipe open).
    script = "set -e\ntrap 'kill %1 2>/dev/null || true' EXIT\n" + block.replace("8999", str(port)) + "wait\n"
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"a local Hub is running at http://127.0.0.1:{port}" in done.stdout
    assert re.search(r"pushed base@1, digit-0@1, .*digit-9@1 to me/mnist-peft", done.stdout), done.stdout
    assert re.search(r"pulled me/mnist-peft@[0-9a-f]{12}: added base@1, digit-0@1", done.stdout), done.stdout
    listed = run_cli("registry", "list", "--root", str(tmp_path / "pulled"), "--json")
    assert listed.returncode == 0 and listed.stdout.count('"name"') == 11, listed.stdout + listed.stderr
    assert done.stdout.rstrip().endswith("the local Hub stopped")
    with socket.socket() as s:  # both servers are gone: nothing listens on the port
        assert s.connect_ex(("127.0.0.1", port)) != 0


def test_a_port_in_use_is_one_line_error_and_no_olah_is_left_running(tmp_path: Path) -> None:
    find_olah()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = run_cli("hub-local", "--port", str(port), "--dir", str(tmp_path / "hub"), timeout=120)
    assert done.returncode == 1 and done.stderr.count("\n") == 1, done.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr and "choose another port" in done.stderr
    olahs = subprocess.run(["pgrep", "-f", str(tmp_path / "hub" / "olah.toml")], capture_output=True, text=True)
    assert olahs.stdout == "", "olah outlived the failed start"
