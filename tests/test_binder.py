"""binder/ stays consistent with pyproject.toml and the Makefile: every runtime dependency is installed,
torch is the CPU build `make setup` uses, postBuild builds the kernels and opens an existing tour."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
BINDER = ROOT / "binder"
REPO_LINES = {".", "-e .", "--editable .", "--editable=."}
tomllib = pytest.importorskip("tomllib")  # Python 3.11+


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def binder_lines() -> list[str]:
    """requirements.txt lines without comments and blanks."""
    lines = (line.split("#", 1)[0].strip() for line in (BINDER / "requirements.txt").read_text().splitlines())
    return [line for line in lines if line]


def binder_requirements() -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in (Requirement(line) for line in binder_lines()
                                                   if not line.startswith("-") and line not in REPO_LINES)}


def installed_by_binder() -> set[str]:
    """Canonical names of what `pip install -r binder/requirements.txt` installs directly: the named
    packages, plus every runtime dependency of pyproject.toml when it installs the repository."""
    names = set(binder_requirements())
    if any(line in REPO_LINES for line in binder_lines()):
        names |= {canonicalize_name(Requirement(d).name) for d in pyproject()["project"]["dependencies"]}
    return names


def test_every_runtime_dependency_is_installed_by_binder():
    needed = {canonicalize_name(Requirement(d).name) for d in pyproject()["project"]["dependencies"]}
    assert needed - installed_by_binder() == set()


def test_binder_pins_agree_with_pyproject():
    wanted = {canonicalize_name(r.name): r for r in map(Requirement, pyproject()["project"]["dependencies"])}
    for name, pin in binder_requirements().items():
        versions = [Version(s.version) for s in pin.specifier if s.operator == "=="]
        assert versions, f"binder pins {name} without an exact version: {pin}"
        if name in wanted:
            assert wanted[name].specifier.contains(versions[0], prereleases=True), (pin, wanted[name])


def test_torch_is_the_cpu_build_make_setup_installs():
    makefile = (ROOT / "Makefile").read_text()
    version = re.search(r"^TORCH_VERSION \?= (\S+)$", makefile, re.M).group(1)
    torch = binder_requirements()["torch"]
    assert str(torch.specifier) == f"=={version}+cpu"
    index = [line for line in binder_lines() if line.startswith(("--extra-index-url", "--index-url"))]
    assert any("download.pytorch.org/whl/cpu" in line for line in index), index


def test_binder_python_satisfies_requires_python():
    runtime = (BINDER / "runtime.txt").read_text().strip()
    assert runtime.startswith("python-"), runtime
    requires = pyproject()["project"]["requires-python"]
    assert Requirement(f"python{requires}").specifier.contains(runtime.removeprefix("python-") + ".0")


def test_post_build_builds_the_kernels_and_opens_the_tour():
    post = BINDER / "postBuild"
    assert os.access(post, os.X_OK), "binder/postBuild must be executable"
    subprocess.run(["bash", "-n", str(post)], check=True)
    commands = [shlex.split(line) for line in post.read_text().splitlines() if line and not line.startswith("#")]
    assert ["python", "setup.py", "-q", "build_ext", "--inplace"] in commands
    url = re.search(r'default_url = "/lab/tree/(\S+)"', post.read_text()).group(1)
    assert (ROOT / url).is_file(), f"postBuild opens {url}, which does not exist"
    assert url == "notebooks/01_tour.ipynb"
