"""Operator files (sidecar/files.py): bounded reads that refuse anything but a regular file.

A FIFO, directory, socket or device at the config, vault or private key path must be
refused at once with an error naming the path; `sidecar check` says so and exits 1.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.crypto import Opener, generate_private_key, write_private_key
from sidecar.files import read_regular_file
from sidecar.vault import create_vault
from tests.harness import sidecar_cmd, subprocess_env


def read_bounded_wait(path: Path, *, limit: int = 1024) -> bytes:
    """`read_regular_file` in a thread, so a read that blocks fails the test instead of hanging it.

    A blocked thread is left behind on purpose: the FIFO's writer end is opened at teardown.
    """
    result: list[bytes | BaseException] = []

    def run() -> None:
        try:
            result.append(read_regular_file(path, limit=limit))
        except BaseException as exc:
            result.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(5)
    assert result, f"reading {path} blocked"
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


@pytest.fixture
def fifo(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "fifo"
    os.mkfifo(path)
    yield path
    # Release a reader left blocked by a failing test (ENXIO: there is none).
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))


# --------------------------------------------------------------------------- read_regular_file


def test_reads_a_regular_file(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"hello\n")
    assert read_bounded_wait(path) == b"hello\n"


def test_reads_through_a_symlink(tmp_path: Path) -> None:
    """Kubernetes mounts are symlinks to regular files: they are normal, not refused."""
    (tmp_path / "..data").mkdir()
    (tmp_path / "..data" / "f").write_bytes(b"mounted")
    os.symlink("..data/f", tmp_path / "f")
    assert read_bounded_wait(tmp_path / "f") == b"mounted"


def test_reads_a_file_of_exactly_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1024)
    assert read_bounded_wait(path, limit=1024) == b"x" * 1024


def test_refuses_a_file_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1025)
    with pytest.raises(OSError, match="larger than 1024 bytes") as info:
        read_bounded_wait(path, limit=1024)
    assert info.value.filename == str(path)


def test_a_missing_file_is_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_bounded_wait(tmp_path / "nosuch")


def test_refuses_a_fifo_without_blocking(fifo: Path) -> None:
    with pytest.raises(OSError, match=r"not a regular file.*FIFO") as info:
        read_bounded_wait(fifo)
    assert info.value.filename == str(fifo)
    assert str(fifo) in str(info.value)


def test_refuses_a_symlink_to_a_fifo(fifo: Path, tmp_path: Path) -> None:
    os.symlink(fifo, tmp_path / "link")
    with pytest.raises(OSError, match="not a regular file"):
        read_bounded_wait(tmp_path / "link")


def test_refuses_a_directory(tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"not a regular file.*directory"):
        read_bounded_wait(tmp_path)


def test_refuses_a_character_device() -> None:
    with pytest.raises(OSError, match=r"not a regular file.*device"):
        read_bounded_wait(Path("/dev/zero"))


def test_refuses_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
        with pytest.raises(OSError, match=r"not a regular file.*socket"):
            read_bounded_wait(path)


# --------------------------------------------------------------------------- `sidecar check` on first load


@pytest.fixture
def deployment(tmp_path: Path) -> Path:
    """keygen + vault + a config with no providers; returns the config path."""
    key = generate_private_key()
    write_private_key(tmp_path / "sidecar.key", key)
    create_vault(tmp_path / "vault.json", Opener(key).public_key)
    config = tmp_path / "sidecar.yaml"
    config.write_text(
        "listen: 127.0.0.1:0\nadmin_listen: 127.0.0.1:0\n"
        "vault: {path: vault.json, private_key_file: sidecar.key}\n"
    )
    return config


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path, 0o600)


def _replace_with_directory(path: Path) -> None:
    path.unlink()
    path.mkdir()


def run_check(config: Path) -> subprocess.CompletedProcess[str]:
    env = subprocess_env()
    env.pop("SIDECAR_PRIVATE_KEY", None)
    return subprocess.run(sidecar_cmd("check", "--config", str(config)), capture_output=True,
                          text=True, env=env, timeout=30, check=False)  # fmt: skip


@pytest.mark.parametrize("name", ["sidecar.yaml", "vault.json", "sidecar.key"])
@pytest.mark.parametrize("replace", [_replace_with_fifo, _replace_with_directory],
                         ids=["fifo", "directory"])  # fmt: skip
def test_check_refuses_a_non_regular_file_naming_it(
    deployment: Path, name: str, replace: Callable[[Path], None]
) -> None:
    assert run_check(deployment).returncode == 0
    bad = deployment.parent / name
    replace(bad)
    result = run_check(deployment)  # with the bug: blocks on the FIFO until the timeout
    assert result.returncode == 1, result
    assert str(bad) in result.stderr
    assert "not a regular file" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_names_a_missing_config_file(tmp_path: Path) -> None:
    result = run_check(tmp_path / "nosuch.yaml")
    assert result.returncode == 1
    assert str(tmp_path / "nosuch.yaml") in result.stderr
    assert "no such file" in result.stderr


def test_check_refuses_an_oversized_config(deployment: Path) -> None:
    with deployment.open("a") as fh:
        fh.write("# " + "x" * (5 << 20) + "\n")
    result = run_check(deployment)
    assert result.returncode == 1
    assert str(deployment) in result.stderr
    assert "larger than" in result.stderr
