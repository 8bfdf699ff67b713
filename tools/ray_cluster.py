"""A real multi-node Ray cluster on this one machine, for `siamesedb build --ray --ray-address` (tests, benchmarks).

    eval "$(python tools/ray_cluster.py start [--nodes 2] [--cpus 1] [--dir DIR])"   # exports RAY_ADDRESS, the token
    python tools/ray_cluster.py stop --dir DIR
    python tools/ray_cluster.py bench --folder FOLDER [--runs 2]   # in-process vs the cluster's build, a table

Each node is one `ray start` (`--head --port P` first, then `--address 127.0.0.1:P`), every one with `--num-cpus`,
loopback only, free ports (no fixed 8265 / 10001 to collide with another cluster on the machine), its session files
under DIR (`--temp-dir`; never /tmp/ray, never the working directory). Each `ray start` runs in its own process
group, and `stop` ends those groups (SIGTERM, then SIGKILL), then any process still naming DIR: `ray stop` would end
*every* Ray process on the machine, other users' included, so it is not used.

Token authentication: Ray 2.60 (the one installed here) turns it on for a head node whenever a token exists
(~/.ray/auth_token, written by any local `ray.init()`), while a node or driver joining an explicit address sends none
unless RAY_AUTH_MODE=token. So the cluster runs with RAY_AUTH_MODE=token and a fresh RAY_AUTH_TOKEN, and `env()` /
the printed `export` lines give a driver (e.g. `siamesedb build --ray-address`) the same two variables.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STATE_FILE = "cluster.json"  # in DIR: address, token, process groups
STOP_GRACE_S = 3.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ray_command() -> str:
    """The `ray` script beside this interpreter (the venv's), else the one on PATH."""
    here = Path(sys.executable).with_name("ray")
    found = str(here) if here.exists() else shutil.which("ray")
    if not found:
        raise SystemExit("ray_cluster: no `ray` command: pip install 'siamesedb[ray]'")
    return found


class RayCluster:
    """`nodes` Ray nodes of `cpus` CPUs each on 127.0.0.1, session files under `root`. Context manager: stopped on
    exit, whatever happened."""

    def __init__(self, root: str | os.PathLike | None = None, nodes: int = 2, cpus: int = 1,
                 object_store_bytes: int = 256 << 20, timeout_s: float = 120.0):
        # Ray's unix sockets live under the session folder: keep the root short (a socket path has 107 bytes).
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="sdb-ray-"))
        self.nodes, self.cpus, self.object_store_bytes, self.timeout_s = nodes, cpus, object_store_bytes, timeout_s
        self.port = 0
        self.token = ""
        self.groups: list[int] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """What a driver needs in its environment to join: token authentication (its session files go where the
        nodes keep theirs, under root, without being told)."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, "RAY_USAGE_STATS_ENABLED": "0"}

    def _start_node(self, head: bool) -> None:
        ports = ["--node-manager-port", str(free_port()), "--object-manager-port", str(free_port()),
                 "--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                 "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port()),
                 "--min-worker-port", "0", "--max-worker-port", "0"]
        where = (["--head", "--port", str(self.port), "--ray-client-server-port", str(free_port()),
                  "--include-dashboard", "false"]
                 if head else ["--address", self.address])
        command = [ray_command(), "start", *where, "--num-cpus", str(self.cpus), "--num-gpus", "0",
                   "--node-ip-address", "127.0.0.1", "--temp-dir", str(self.root / "ray"),
                   "--object-store-memory", str(self.object_store_bytes), "--disable-usage-stats", *ports]
        log = self.root / f"node{len(self.groups)}.log"
        with open(log, "wb") as out:
            # Its own process group: `ray start` exits once the node is up, its daemons stay in the group.
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                       env={**os.environ, **self.env()})
            self.groups.append(process.pid)
            try:
                code = process.wait(timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                code = None
        if code != 0:
            tail = log.read_text(errors="replace").strip().splitlines()[-3:]
            raise RuntimeError(f"ray start ({'head' if head else 'node'}) failed ({code}), see {log}: "
                               + " | ".join(tail))

    def start(self) -> RayCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.token = secrets.token_hex(32)
        try:
            for n in range(self.nodes):
                self._start_node(head=n == 0)
            self.wait_for_nodes()
        except BaseException:
            self.stop()
            raise
        self.save()
        return self

    def wait_for_nodes(self) -> None:
        """Until the GCS lists `nodes` alive nodes (a subprocess: this process never joins the cluster)."""
        probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR', log_to_driver=False);"
                 "print(sum(1 for n in ray.nodes() if n['Alive']))")
        deadline = time.monotonic() + self.timeout_s
        while True:
            result = subprocess.run([sys.executable, "-c", probe, self.address], capture_output=True, text=True,
                                    env={**os.environ, **self.env()}, timeout=self.timeout_s)
            alive = result.stdout.strip().splitlines()[-1:] if result.returncode == 0 else []
            if alive == [str(self.nodes)]:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"Ray cluster at {self.address}: {alive or result.stderr[-300:]} nodes alive, "
                                   f"not {self.nodes}, after {self.timeout_s:.0f} s")
            time.sleep(1.0)

    def leftovers(self) -> list[int]:
        """Pids of processes whose command line names this cluster's root (ours by construction)."""
        marker, found = str(self.root), []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and int(entry.name) != os.getpid():
                try:
                    if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                        found.append(int(entry.name))
                except OSError:
                    pass
        return found

    def stop(self) -> None:
        """End this cluster's process groups (SIGTERM, SIGKILL after STOP_GRACE_S), then any leftover naming root."""
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        deadline = time.monotonic() + STOP_GRACE_S
        while time.monotonic() < deadline and any(_group_alive(g) for g in self.groups):
            time.sleep(0.2)
        for group in self.groups:
            try:
                os.killpg(group, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        # A killed process lingers in /proc for a moment (and one may have left the group): sweep until none is left.
        deadline = time.monotonic() + STOP_GRACE_S
        while (pids := self.leftovers()) and time.monotonic() < deadline:
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.2)

    def save(self) -> None:
        (self.root / STATE_FILE).write_text(json.dumps(
            {"address": self.address, "token": self.token, "groups": self.groups, "port": self.port}))

    @classmethod
    def load(cls, root: str | os.PathLike) -> RayCluster:
        state = json.loads((Path(root) / STATE_FILE).read_text())
        cluster = cls(root)
        cluster.port, cluster.token, cluster.groups = state["port"], state["token"], state["groups"]
        return cluster

    def __enter__(self) -> RayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _vectors_by_path(index: Path) -> dict[str, Any]:
    from siamesedb.db import SiameseDB

    with SiameseDB.open(index) as db:
        ids, vectors = db.backend.vectors()
        return {item.path: vector for item, vector in zip(db.backend.items(ids), vectors)}


def bench(folder: Path, runs: int, nodes: int, cpus: int, batch_size: int) -> None:
    """The in-process build against the same build on this machine's `nodes`-node cluster, both as the CLI runs
    them (a fresh process each, `--json`), in rounds after a warm-up round; prints a Markdown table of medians."""
    import statistics

    import numpy as np

    cli = str(Path(sys.executable).with_name("siamesedb"))
    scratch = Path(tempfile.mkdtemp(prefix="sdb-ray-bench-"))
    started = time.perf_counter()
    cluster = RayCluster(scratch / "rc", nodes=nodes, cpus=cpus).start()
    startup = time.perf_counter() - started
    settings = {"in-process": [], f"ray, {nodes} nodes x {cpus} CPU": ["--ray", "--ray-address", cluster.address]}
    timings: dict[str, list[tuple[float, float, float]]] = {name: [] for name in settings}
    try:
        for round_ in range(runs + 1):
            for name, extra in settings.items():
                index = scratch / f"{'ray' if extra else 'local'}-{round_}"
                began = time.perf_counter()
                done = subprocess.run([cli, "build", str(folder), "--index", str(index), "--batch-size",
                                       str(batch_size), "--json", *extra], capture_output=True, text=True,
                                      env={**os.environ, **cluster.env()}, check=False)
                wall = time.perf_counter() - began
                if done.returncode != 0:
                    raise SystemExit(f"{name}: build failed: {done.stderr[-1000:]}")
                report = json.loads(done.stdout)
                print(f"round {round_} {name}: {report['images_per_second']} images/s, pipeline "
                      f"{report['seconds']} s, process {wall:.1f} s", file=sys.stderr)
                if round_:
                    timings[name].append((report["images_per_second"], report["seconds"], wall))
        local, remote = _vectors_by_path(scratch / f"local-{runs}"), _vectors_by_path(scratch / f"ray-{runs}")
        assert set(local) == set(remote), "the two builds hold different paths"
        worst = max(float(np.abs(local[p] - remote[p]).max()) for p in local)
    finally:
        cluster.stop()
        shutil.rmtree(scratch, ignore_errors=True)
    print(f"cluster start ({nodes} x `ray start`, not counted): {startup:.1f} s; {len(local)} images; "
          f"max |vector difference| {worst:.2g}")
    print("| build | images/s (median) | pipeline s (rounds) | process s (rounds) |")
    print("|---|---|---|---|")
    base = statistics.median(t[0] for t in timings["in-process"])
    for name, rows in timings.items():
        rate = statistics.median(t[0] for t in rows)
        print(f"| {name} | {rate:.0f} = {rate / base:.2f}x | {statistics.median(t[1] for t in rows):.1f} "
              f"({', '.join(f'{t[1]:.1f}' for t in rows)}) | {statistics.median(t[2] for t in rows):.1f} "
              f"({', '.join(f'{t[2]:.1f}' for t in rows)}) |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["start", "stop", "bench"])
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--cpus", type=int, default=1, help="CPUs per node")
    parser.add_argument("--dir", default=None, help="session root (start: default a new temp folder)")
    parser.add_argument("--folder", type=Path, default=None, help="bench: the labelled folder to build")
    parser.add_argument("--runs", type=int, default=2, help="bench: rounds after the warm-up round")
    parser.add_argument("--batch-size", type=int, default=256, help="bench: build --batch-size")
    args = parser.parse_args(argv)
    if args.action == "bench":
        if args.folder is None:
            parser.error("bench needs --folder")
        bench(args.folder, args.runs, args.nodes, args.cpus, args.batch_size)
        return 0
    if args.action == "stop":
        if not args.dir:
            parser.error("stop needs --dir (the folder `start` printed)")
        RayCluster.load(args.dir).stop()
        return 0
    cluster = RayCluster(args.dir, nodes=args.nodes, cpus=args.cpus).start()
    # Shell lines (eval "$(python tools/ray_cluster.py start)"): with RAY_ADDRESS set, `build --ray` joins the cluster.
    for key, value in {**cluster.env(), "RAY_ADDRESS": cluster.address}.items():
        print(f"export {key}={value}")
    print(f"# {args.nodes} nodes at {cluster.address}; stop: python tools/ray_cluster.py stop --dir {cluster.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
