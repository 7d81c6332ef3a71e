"""What a new user meets before any request: the license, `make run`, the image build inputs."""

from __future__ import annotations

import hashlib
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from setuptools.config.setupcfg import read_configuration

ROOT = Path(__file__).resolve().parents[1]
# MD5 of https://www.apache.org/licenses/LICENSE-2.0.txt, byte for byte.
APACHE_2_MD5 = "3b83ef96387f14655fc854ddc3c6bd57"


def test_license_file_is_the_apache_2_text_the_metadata_names() -> None:
    license_file = ROOT / "LICENSE"
    assert hashlib.md5(license_file.read_bytes()).hexdigest() == APACHE_2_MD5
    metadata = read_configuration(ROOT / "setup.cfg")["metadata"]
    assert metadata["license"] == "Apache-2.0"
    assert metadata["license_files"] == ["LICENSE"]


def _make_dry_run(tmp_path: Path, *args: str) -> list[list[str]]:
    """The commands `make` would run in a clean clone (a virtualenv that does not exist yet)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    venv = tmp_path / "venv"
    result = subprocess.run([make, "--dry-run", "--no-print-directory", f"VENV={venv}", *args],
                            cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def _pip_installs(commands: list[list[str]]) -> list[list[str]]:
    return [c for c in commands if Path(c[0]).name == "pip" and c[1:2] == ["install"]]


def test_make_run_installs_only_what_running_needs(tmp_path: Path) -> None:
    commands = _make_dry_run(tmp_path, "run")
    project = [c for c in _pip_installs(commands) if "-e" in c]
    assert project, commands
    for install in project:
        assert install[install.index("-e") + 1] == ".", "no extras for `make run`"
        assert install[install.index("-c") + 1] == "constraints.txt"
    assert commands[-1][1:] == ["demo"]
    assert Path(commands[-1][0]).name == "sidecar"


def test_make_run_passes_args_to_the_demo(tmp_path: Path) -> None:
    commands = _make_dry_run(tmp_path, "run", "ARGS=--listen 127.0.0.1:18080")
    assert commands[-1][1:] == ["demo", "--listen", "127.0.0.1:18080"]


@pytest.mark.parametrize("target", ["test", "lint", "bench"])
def test_make_test_builds_its_toolchain_from_scratch(tmp_path: Path, target: str) -> None:
    commands = _make_dry_run(tmp_path, target)
    assert any(Path(c[0]).name.startswith("python") and c[1:3] == ["-m", "venv"] for c in commands)
    project = [c for c in _pip_installs(commands) if "-e" in c]
    assert any(c[c.index("-e") + 1] == ".[test]" for c in project), commands
    for install in project:
        assert install[install.index("-c") + 1] == "constraints.txt"


def _dockerfile_runs() -> list[str]:
    return [
        line.strip()
        for line in (ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
        if line.strip().startswith("RUN ")
    ]


def test_the_image_is_built_with_the_pinned_versions() -> None:
    (wheel,) = [run for run in _dockerfile_runs() if "pip wheel" in run]
    args = shlex.split(wheel)
    assert "-c" in args, wheel
    assert args[args.index("-c") + 1] == "constraints.txt"
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!constraints.txt" in ignore, "the build context must contain constraints.txt"
    assert "!LICENSE" in ignore
