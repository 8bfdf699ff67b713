"""A Milvus standalone server for development, tests and CI: PyPI's `milvus` 2.3.5 in its own virtual environment.

    python tools/milvus_server.py install [--venv .venv-milvus]            # the server's venv (never the project's)
    python tools/milvus_server.py start --state DIR/server.json [--data DIR] [--timeout 180]   # prints the URI
    python tools/milvus_server.py stop --state DIR/server.json [--remove-data]   # ends the server's process group

`milvus` 2.3.5 pins pymilvus < 2.4, which clashes with the project's pymilvus: it lives in its own venv. Its
`milvus-server` wrapper starts `milvus run standalone` (embedded etcd + local storage) as a child and leaves it
running when the wrapper is killed, so `start` runs the wrapper in a process group of its own and `stop` (or kill)
ends the whole group. Every port the server listens on is a free loopback port chosen here (two servers on one
machine do not collide). `start` waits, bounded, until the project's pymilvus can list collections, else ends the
group and exits 1 with one line naming the log file. The state file records what `stop` and `restart` need.
Importable: Server.start / stop / kill / restart (tools/torture.py kills and restarts a server mid-run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_VENV = ROOT / ".venv-milvus"
PACKAGE = "milvus==2.3.5"
# The wrapper's port options (milvus-server --help); every one gets a free port, or it binds its fixed default. The
# embedded etcd's peer port (2380) is no wrapper option: it goes into an etcd config file ($ETCD_CONFIG_PATH).
PORT_OPTIONS = ("proxy-port", "etcd-port", "etcd-peer-port", "root-coord-port", "proxy-internal-port", "query-coord-port",
                "query-node-port", "index-coord-port", "index-node-port", "data-coord-port", "data-node-port")


class ServerError(RuntimeError):
    """The server could not be installed, started or reached (one line, naming the log file)."""


def free_ports(n: int) -> list[int]:
    """n distinct free loopback ports (held open together while chosen, so none is picked twice)."""
    sockets = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def install(venv: Path = DEFAULT_VENV) -> Path:
    """The server's venv with `milvus` 2.3.5 (made if missing); returns its milvus-server executable."""
    exe = venv / "bin" / "milvus-server"
    if exe.exists():
        return exe
    subprocess.run([sys.executable if not (venv / "bin" / "python").exists() else str(venv / "bin" / "python"),
                    "-m", "venv", str(venv)], check=True)
    done = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", PACKAGE],
                          capture_output=True, text=True)
    if done.returncode or not exe.exists():
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ServerError(f"{venv}: pip install {PACKAGE} failed: {tail[0]}")
    return exe


def reachable(uri: str, timeout: float = 5.0) -> bool:
    """Whether the project's pymilvus can list collections at `uri`."""
    import logging

    logging.getLogger("pymilvus").setLevel(logging.CRITICAL)  # "not up yet" is no error: no tracebacks logged
    try:
        from pymilvus import MilvusClient

        client = MilvusClient(uri=uri, timeout=timeout)
        try:
            client.list_collections()
        finally:
            client.close()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not up (yet)"
        return False


class Server:
    """One Milvus standalone server: its data folder, ports, log file and process group."""

    def __init__(self, data: Path, ports: dict[str, int], venv: Path = DEFAULT_VENV, pgid: int | None = None,
                 tick_ms: int | None = None):
        self.data, self.ports, self.venv, self.pgid = Path(data), dict(ports), Path(venv), pgid
        self.tick_ms = tick_ms  # proxy.timeTickInterval (None: Milvus's 200 ms); a Strong read waits up to one tick

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.ports['proxy-port']}"

    @property
    def log(self) -> Path:
        return self.data / "server.log"

    @classmethod
    def start(cls, data: Path | None = None, venv: Path = DEFAULT_VENV, timeout: float = 180.0,
              tick_ms: int | None = None) -> Server:
        """Install if needed, start on free ports with its data under `data` (default a new temp folder)."""
        data = Path(data) if data is not None else Path(tempfile.mkdtemp(prefix="siamesedb-milvus-"))
        server = cls(data, dict(zip(PORT_OPTIONS, free_ports(len(PORT_OPTIONS)))), venv, tick_ms=tick_ms)
        server.launch(timeout)
        return server

    def launch(self, timeout: float = 180.0) -> None:
        """Start the wrapper in a new process group and wait until pymilvus reaches it (ServerError if not)."""
        exe = install(self.venv)
        self.data.mkdir(parents=True, exist_ok=True)
        args = [str(exe), "--data", str(self.data)]
        for option, port in self.ports.items():
            if option != "etcd-peer-port":
                args += [f"--{option}", str(port)]
        etcd, peer = f"http://127.0.0.1:{self.ports['etcd-port']}", f"http://127.0.0.1:{self.ports['etcd-peer-port']}"
        etcd_config = self.data / "embed-etcd.yaml"
        etcd_config.write_text(f"listen-client-urls: {etcd}\nadvertise-client-urls: {etcd}\nlisten-peer-urls: {peer}\n"
                               f"initial-advertise-peer-urls: {peer}\ninitial-cluster: default={peer}\n")
        env = {**os.environ, "ETCD_CONFIG_PATH": str(etcd_config)}
        if self.tick_ms is not None:
            args += ["--extra-config", f"proxy.timeTickInterval={int(self.tick_ms)}"]
        with open(self.log, "ab") as log:
            proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True)  # own session = own process group (pgid = pid)
        self.pgid = proc.pid
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None or self._crashed():
                self.stop()
                raise ServerError(f"Milvus server died while starting; see {self.data / 'logs'} and {self.log}")
            if reachable(self.uri):
                return
            time.sleep(1.0)
        self.stop()
        raise ServerError(f"Milvus server not reachable at {self.uri} after {timeout:.0f} s; see {self.log}")

    def _crashed(self) -> bool:
        """Whether `milvus run standalone` panicked (its wrapper does not notice and would wait on)."""
        try:
            return b"panic:" in (self.data / "logs" / "milvus-stderr.log").read_bytes()[-200_000:]
        except OSError:
            return False

    def _signal_group(self, sig: int) -> bool:
        try:
            os.killpg(self.pgid, sig)
            return True
        except (ProcessLookupError, PermissionError, TypeError):
            return False

    def kill(self) -> None:
        """kill -9 the whole process group (the wrapper and `milvus run standalone`), as a crash would."""
        if self.pgid is not None and self._signal_group(signal.SIGKILL):
            self._wait_gone(10.0)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the group, then SIGKILL what is left after `grace` seconds."""
        if self.pgid is None:
            return
        if self._signal_group(signal.SIGTERM) and not self._wait_gone(grace):
            self._signal_group(signal.SIGKILL)
            self._wait_gone(10.0)
        self.pgid = None

    def _wait_gone(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                os.waitpid(-self.pgid, os.WNOHANG)  # reap our own child, if it is one
            except ChildProcessError:
                pass
            if not self._signal_group(0):
                return True
            time.sleep(0.2)
        return False

    def restart(self, timeout: float = 60.0, tries: int = 4) -> int:
        """Start again on the same data folder and ports (after kill / stop): the collections come back. After a
        kill -9, Milvus 2.3 standalone may hang on its first start (the dead process's sessions in etcd, its
        rocksmq lock: milvus-io/milvus#25182 "needs restart 3 times to recover"), so a start that does not answer
        within `timeout` s is ended and tried again, up to `tries` times; returns the starts it took."""
        for attempt in range(1, tries + 1):
            try:
                self.launch(timeout)
                return attempt
            except ServerError:
                if attempt == tries:
                    raise
        return tries

    def save(self, state: Path) -> None:
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"uri": self.uri, "data": str(self.data), "ports": self.ports,
                                     "venv": str(self.venv), "pgid": self.pgid, "log": str(self.log),
                                     "tick_ms": self.tick_ms}))

    @classmethod
    def load(cls, state: Path) -> Server:
        record = json.loads(Path(state).read_text())
        return cls(Path(record["data"]), record["ports"], Path(record["venv"]), record["pgid"], record.get("tick_ms"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["install", "start", "stop"])
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help="the server's own virtual environment")
    parser.add_argument("--state", type=Path, help="state file written by start, read by stop")
    parser.add_argument("--data", type=Path, help="the server's data folder (default: a new temp folder)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for the server (start)")
    parser.add_argument("--remove-data", action="store_true", help="stop: also delete the server's data folder")
    parser.add_argument("--tick-ms", type=int, help="proxy.timeTickInterval in ms (default Milvus's 200; a Strong "
                        "read waits up to one tick, so tests run a shorter one)")
    args = parser.parse_args(argv)
    try:
        if args.action == "install":
            print(install(args.venv))
        elif args.action == "start":
            server = Server.start(args.data, args.venv, args.timeout, args.tick_ms)
            if args.state:
                server.save(args.state)
            print(server.uri)
        else:
            if args.state is None or not args.state.exists():
                print(f"error: no state file {args.state} (nothing to stop)", file=sys.stderr)
                return 1
            server = Server.load(args.state)
            server.stop()
            if args.remove_data:
                shutil.rmtree(server.data, ignore_errors=True)
    except (ServerError, subprocess.CalledProcessError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
