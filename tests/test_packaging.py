"""What ``pip install .`` ships: every subpackage, the ``py.typed`` marker and the bundled MNIST files
(setuptools' own ``build_py`` step, asked for its file lists from ``pyproject.toml``)."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import REPO


def _build_py():
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    here = Path.cwd()
    os.chdir(REPO)  # setuptools resolves the package folders against the working directory
    try:
        dist = Distribution()
        dist.script_name = "setup.py"  # what distutils expects a build to be started by (the file need not exist)
        apply_configuration(dist, REPO / "pyproject.toml")
        # A fresh clone has no egg-info whose SOURCES.txt could add files: only package-data counts
        dist.include_package_data = False
        cmd = dist.get_command_obj("build_py")
        cmd.ensure_finalized()
        packages = set(dist.packages)
        data = {str(Path(src, f)) for _pkg, src, _build, files in cmd.data_files for f in files}  # relative to REPO
    finally:
        os.chdir(here)
    return packages, data


def test_a_wheel_holds_every_subpackage_and_the_bundled_mnist_files() -> None:
    packages, data = _build_py()
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mnist_peft").rglob("__init__.py")}
    assert on_disk - packages == set()
    bundled = {str(p.relative_to(REPO)) for p in (REPO / "mnist_peft" / "model" / "mnist").glob("*.gz")}
    assert len(bundled) == 4  # train/test images and labels
    assert bundled <= data
    assert "mnist_peft/py.typed" in data
