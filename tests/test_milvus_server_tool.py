"""tools/milvus_server.py without a real server: a server that never answers or dies is reported in one line naming
its log, within the bounded wait, and its whole process group (the wrapper's child too) is gone afterwards."""

from __future__ import annotations

import importlib.util
import os
import stat
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _tool():
    spec = importlib.util.spec_from_file_location("milvus_server", ROOT / "tools" / "milvus_server.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fake_venv(root: Path, script: str) -> Path:
    """A venv folder whose bin/milvus-server is `script` (bash)."""
    exe = root / "venv" / "bin" / "milvus-server"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/bash\n" + script)
    exe.chmod(exe.stat().st_mode | stat.S_IXUSR)
    return root / "venv"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def test_a_server_that_never_answers_is_stopped_with_its_child_and_named(tmp_path):
    tool = _tool()
    # Like the real wrapper: a child that outlives a killed parent, and a parent that never serves.
    venv = _fake_venv(tmp_path, f"sleep 300 &\necho $! > {tmp_path}/child.pid\nsleep 300\n")
    began = time.monotonic()
    with pytest.raises(tool.ServerError) as caught:
        tool.Server.start(tmp_path / "data", venv=venv, timeout=3)
    assert time.monotonic() - began < 30  # bounded
    message = str(caught.value)
    assert "not reachable" in message and str(tmp_path / "data" / "server.log") in message
    assert len(message.splitlines()) == 1
    child = int((tmp_path / "child.pid").read_text())
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), "the wrapper's child outlived stop(): the process group was not ended"


def test_a_server_that_exits_while_starting_is_reported_at_once(tmp_path, capsys):
    tool = _tool()
    venv = _fake_venv(tmp_path, "echo boom\nexit 3\n")
    code = tool.main(["start", "--venv", str(venv), "--data", str(tmp_path / "data"), "--timeout", "60",
                      "--state", str(tmp_path / "state.json")])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("error: Milvus server died while starting; see ")
    assert "boom" in (tmp_path / "data" / "server.log").read_text()
    assert not (tmp_path / "state.json").exists()  # nothing to stop
    assert tool.main(["stop", "--state", str(tmp_path / "state.json")]) == 1
    assert "no state file" in capsys.readouterr().err
