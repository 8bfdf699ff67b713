"""`siamesedb build --ray --ray-address` on a real two-node Ray cluster on this machine (issue 25 item 5).

tools/ray_cluster.py starts it: `ray start --head --port P --num-cpus 1`, then `ray start --address 127.0.0.1:P
--num-cpus 1`, loopback, token authentication, session files under the cluster's own temp folder; it is stopped by
ending its process groups (module fixture, whatever the tests did: `ray stop` would end every Ray process on the
machine). The CLI runs as a user runs it, a separate driver process, on real Omniglot drawings (2 alphabets x 3
characters x 10 drawers), and must store the in-process build's items and vectors: into the FAISS backend, and into a
Milvus server where $SIAMESEDB_MILVUS_URI names one (skipped without, failed under CI=true; the collections it
creates are dropped). --json / --quiet output holds no Ray line, the driver's Ray session files go under the
cluster's temp folder and nothing appears beside the working directory; a rerun (joining through $RAY_ADDRESS)
adds nothing and reports work on both nodes; a driver without the cluster's token gets one clear line and no index.
About 95 s on this 2-core machine at load 7 (the cluster's start ~25 s, each build ~15-30 s of Ray start-up).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ray", reason="Ray is not installed: pip install 'siamesedb[ray]'")
pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'siamesedb[ray]'")

from siamesedb.db import SiameseDB  # noqa: E402

from helpers import exported_items as items  # noqa: E402 - tests/helpers.py
from helpers import missing, unpack  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SIAMESEDB = Path(sys.executable).with_name("siamesedb")  # the venv's console script: a driver of its own
SERVER_URI = os.environ.get("SIAMESEDB_MILVUS_URI")
RAY_LINE = ("core_worker", "raylet", "gcs_client", "(pid=", "ray.data", "Ray Data", "INFO ", "WARNING ")

spec = importlib.util.spec_from_file_location("ray_cluster", REPO / "tools" / "ray_cluster.py")
ray_cluster = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ray_cluster)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ray-cluster-src") / "omniglot"
    unpack(lambda alphabet, character, filename, drawer: root / alphabet / character / filename,
           alphabets=2, characters=3, drawers=10)
    return root


@pytest.fixture(scope="module")
def cluster(folder, tmp_path_factory):
    """Two Ray nodes of one CPU each on 127.0.0.1; stopped (process groups, then leftovers) even if a test failed."""
    with ray_cluster.RayCluster(tmp_path_factory.mktemp("rc"), nodes=2, cpus=1) as running:
        yield running
    left = {pid: Path(f"/proc/{pid}/cmdline").read_bytes()[:160] for pid in running.leftovers()}
    assert not left, f"Ray processes of the test cluster outlived its stop: {left}"


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> tuple[dict[str, tuple[str, np.ndarray]], set[str]]:
    """The in-process build of `folder`: {path: (label, vector)} and the index folder's file names."""
    where = tmp_path_factory.mktemp("in-process") / "index"
    with SiameseDB.build(folder, path=where, batch_size=16, workers=0) as db:
        held = items(db)
    return held, {p.name for p in where.iterdir()}  # closed: as the CLI leaves its index


def assert_same(got: dict[str, tuple[str, np.ndarray]], expected: dict[str, tuple[str, np.ndarray]]) -> None:
    assert set(got) == set(expected)  # same (absolute) paths: nothing lost, nothing doubled
    for path, (label, vector) in got.items():
        assert label == expected[path][0]
        np.testing.assert_allclose(vector, expected[path][1], atol=1e-5)


def driver(*args: object, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """`siamesedb ARGS` as its own process (a Ray driver joining the cluster), in `cwd`."""
    return subprocess.run([str(SIAMESEDB), *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def ray_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if any(mark in line for mark in RAY_LINE)]


def driver_logs(cluster) -> int:
    return len(list((cluster.root / "ray").glob("session_*/logs/python-core-driver-*")))


@pytest.fixture(scope="module")
def faiss_build(cluster, folder, tmp_path_factory):
    """`build --ray --ray-address --json` into a FAISS index, run from an empty working directory."""
    base = tmp_path_factory.mktemp("faiss-on-cluster")
    cwd, index = base / "cwd", base / "index"
    cwd.mkdir()
    before = driver_logs(cluster)
    result = driver("build", folder, "--index", index, "--ray", "--ray-address", cluster.address, "--batch-size", 16,
                    "--json", cwd=cwd, env={**os.environ, **cluster.env()})
    return result, base, cwd, index, driver_logs(cluster) - before


def test_cluster_build_into_faiss_matches_in_process(faiss_build, reference):
    result, base, cwd, index, _ = faiss_build
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)  # --json: stdout is the JSON document alone
    expected, files = reference
    assert report["added"] == report["items"] == len(expected) == 60
    assert report["classes"] == 6 and report["already_indexed"] == 0 and report["skipped"] == 0
    with SiameseDB.open(index) as db:
        assert_same(items(db), expected)
    assert {p.name for p in index.iterdir()} == files  # the index folder holds what an in-process build's holds


def test_cluster_build_keeps_ray_out_of_quiet_output_and_neighbours(faiss_build, cluster):
    result, base, cwd, index, new_driver_logs = faiss_build
    assert result.returncode == 0, result.stderr[-2000:]
    assert ray_lines(result.stderr) == [] and result.stderr.strip() == ""  # no Ray line under --json (quiet)
    assert list(cwd.iterdir()) == []  # nothing in the working directory...
    assert sorted(base.iterdir()) == [cwd, index]  # ...nor beside it
    assert new_driver_logs >= 1  # the driver's Ray session logs went under the cluster's temp folder


def test_cluster_rerun_adds_nothing_and_used_both_nodes(faiss_build, cluster, folder, reference):
    _, base, cwd, index, _ = faiss_build
    # --ray alone joins the cluster $RAY_ADDRESS names (what `eval "$(tools/ray_cluster.py start)"` exports).
    result = driver("build", folder, "--index", index, "--ray", "--batch-size", 16,
                    cwd=cwd, env={**os.environ, **cluster.env(), "RAY_ADDRESS": cluster.address})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "added 0 images" in result.stdout and f"{len(reference[0])} already indexed" in result.stdout
    # Each node has one CPU and the encoder actor holds one: the read tasks ran on the other node.
    assert "2 of the cluster's 2 node(s) used" in result.stderr, result.stderr[-2000:]
    assert list(cwd.iterdir()) == []


def test_cluster_driver_without_token_gets_one_line(cluster, folder, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env["RAY_gcs_server_port_wait_time_s"] = "1"  # Ray retries a refused token for ~20 s by default
    result = driver("build", folder, "--index", tmp_path / "index", "--ray", "--ray-address", cluster.address,
                    cwd=tmp_path, env=env)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"Error: --ray-address {cluster.address}: the Ray cluster refused us for want of its authentication token: "
        "set RAY_AUTH_MODE=token and its token (RAY_AUTH_TOKEN, or the file ~/.ray/auth_token its head node used)"]
    assert not (tmp_path / "index").exists()  # refused before anything was created


def test_cluster_build_into_milvus_server(cluster, folder, reference, tmp_path):
    if not SERVER_URI:
        missing("no Milvus server ($SIAMESEDB_MILVUS_URI unset)", "set SIAMESEDB_MILVUS_URI=http://host:19530")
    pytest.importorskip("pymilvus", reason="the Milvus backend is not installed: pip install 'siamesedb[milvus]'")
    from pymilvus import MilvusClient

    index = tmp_path / "milvus-index"
    try:
        result = driver("build", folder, "--index", index, "--backend", "milvus", "--milvus-uri", SERVER_URI,
                        "--ray", "--ray-address", cluster.address, "--batch-size", 16, "--quiet",
                        cwd=tmp_path, env={**os.environ, **cluster.env()})
        assert result.returncode == 0, result.stderr[-2000:]
        assert ray_lines(result.stderr) == []
        assert f"added {len(reference[0])} images" in result.stdout
        with SiameseDB.open(index) as db:
            assert_same(items(db), reference[0])
    finally:
        manifest = index / "manifest.json"
        if manifest.exists():  # drop the collection and its companions (`<collection>_meta`, ...)
            name = json.loads(manifest.read_text())["milvus"]["collection"]
            client = MilvusClient(uri=SERVER_URI)
            for held in client.list_collections():
                if held == name or held.startswith(name + "_"):
                    client.drop_collection(held)
            client.close()
