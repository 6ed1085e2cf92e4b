"""The README's Python API tour runs as written (against the local Hub for push/pull)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _tour() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Python API tour", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) >= 6, "the tour lost its code blocks"
    return "\n".join(blocks)


def test_readme_python_tour_runs(tmp_path: Path, data_root) -> None:
    from hub_server import HubServer

    shutil.copytree(REPO / "adapters", tmp_path / "adapters")
    hub = HubServer.start(tmp_path / "hub")
    try:
        env = {**os.environ, **hub.env(tmp_path / "hf-home"), "MNIST_PEFT_DATA": str(data_root)}
        proc = subprocess.run([sys.executable, "-c", _tour()], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    finally:
        hub.stop()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "pulled" / "index.db").is_file()
