"""`build --ray` (siamesedb/ray_build.py, issue 18): a small build on a local Ray against the in-process build.

Real Omniglot images (2 alphabets x 3 characters x 20 drawings, plus one duplicate file and one empty file): the Ray
build must store the same (label, path) set with the same vectors as `SiameseDB.build`; a build killed after its first
committed batch resumes to that same set without duplicates; a rerun adds nothing; a Ray build into a Milvus Lite
index holds the same items too. Skipped without Ray Data
(`pip install 'siamesedb[ray]'`) or without the Omniglot evaluation images on this machine.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

ray = pytest.importorskip("ray", reason="Ray is not installed: pip install 'siamesedb[ray]'")
pytest.importorskip("ray.data", reason="Ray Data is not installed: pip install 'siamesedb[ray]'")

from siamesedb.db import SiameseDB  # noqa: E402
from siamesedb.ray_build import build_with_ray  # noqa: E402

from helpers import OMNIGLOT_EVALUATION, require  # noqa: E402 - tests/helpers.py
from helpers import exported_items as _items  # noqa: E402

OMNIGLOT_CACHE = Path.home() / ".cache/siamesedb/omniglot/images_evaluation.d/images_evaluation"
ALPHABETS, CHARACTERS = 2, 3


@pytest.fixture(scope="module")
def local_ray():
    if ray.is_initialized():
        yield
        return
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    if OMNIGLOT_EVALUATION.exists():
        from siamesedb import datasets

        source = datasets.omniglot("evaluation", source=OMNIGLOT_EVALUATION)  # unpacked once into the cache
    elif OMNIGLOT_CACHE.is_dir():
        source = OMNIGLOT_CACHE
    else:
        require(OMNIGLOT_EVALUATION)  # skips outside CI, fails under CI=true (tests/helpers.py)
    root = tmp_path_factory.mktemp("ray-src") / "omniglot"
    for alphabet in sorted(p for p in source.iterdir() if p.is_dir())[:ALPHABETS]:
        for character in sorted(p for p in alphabet.iterdir() if p.is_dir())[:CHARACTERS]:
            shutil.copytree(character, root / alphabet.name / character.name)
    first = sorted((root / alphabet.name / character.name).iterdir())[0]
    shutil.copyfile(first, first.with_name("zz_copy_of_" + first.name))  # same content, same label: stored once
    (first.parent / "zz_empty.png").write_bytes(b"")  # unreadable: skipped, reported
    return root


@pytest.fixture(scope="module")
def reference(folder, tmp_path_factory) -> tuple[dict[str, tuple[str, np.ndarray]], list[str]]:
    """The in-process build of `folder`: its {path: (label, vector)} and labels."""
    with SiameseDB.build(folder, path=tmp_path_factory.mktemp("in-process") / "index", batch_size=32,
                         workers=0) as db:
        return _items(db), db.labels()


def _assert_same(got: dict[str, tuple[str, np.ndarray]], expected: dict[str, tuple[str, np.ndarray]]) -> None:
    assert set(got) == set(expected)  # same paths (absolute), nothing lost, nothing doubled
    for path, (label, vector) in got.items():
        assert label == expected[path][0]
        np.testing.assert_allclose(vector, expected[path][1], atol=1e-5)


def test_ray_build_matches_in_process_and_resumes(local_ray, folder, reference, tmp_path):
    expected, labels = reference
    files = sum(1 for p in folder.rglob("*.png"))
    assert len(expected) == files - 2  # the duplicate and the empty file are not stored

    class Killed(Exception):
        pass

    def kill_after_first_commit(rows: int) -> None:
        raise Killed(rows)

    target = tmp_path / "ray"
    with pytest.raises(Killed):
        build_with_ray(folder, path=target, batch_size=16, write_rows=40, _after_write=kill_after_first_commit)
    with SiameseDB.open(target) as partial:
        held = len(partial)
    assert 0 < held < len(expected)  # the first batch is durable, the rest never was

    db = build_with_ray(folder, path=target, batch_size=16, write_rows=40)
    report = db.last_report
    assert report.scanned == files
    assert report.added == len(expected) - held
    assert report.already_indexed == held + 1  # + the duplicate file
    assert [reason for _, reason in report.skipped] == ["empty file"]
    _assert_same(_items(db), expected)
    assert db.labels() == labels

    with build_with_ray(folder, path=target, batch_size=64) as rerun:
        again = rerun.last_report
    assert again.added == 0 and again.already_indexed == len(expected) + 1
    db.close()
    with SiameseDB.open(target) as reopened:
        assert len(reopened) == len(expected)


def test_ray_build_into_milvus_lite(local_ray, folder, reference, tmp_path):
    pytest.importorskip("pymilvus", reason="the Milvus backend is not installed: pip install 'siamesedb[milvus]'")
    pytest.importorskip("milvus_lite", reason="Milvus Lite is not installed: pip install 'siamesedb[milvus]'")
    with build_with_ray(folder, path=tmp_path / "milvus", batch_size=32, backend="milvus") as db:
        assert db.last_report.added == len(reference[0])
        _assert_same(_items(db), reference[0])


def test_ray_build_cli_flags(tmp_path):
    from click.testing import CliRunner

    from siamesedb.cli import cli

    result = CliRunner().invoke(cli, ["build", str(tmp_path), "--index", str(tmp_path / "i"), "--ray-address", "auto"])
    assert result.exit_code != 0 and "--ray-address needs --ray" in result.output


def test_quiet_ray_stderr_is_caught_and_replayed_only_on_failure(capfd):
    """--quiet / --json: what Ray's C++ side writes to file descriptor 2 (no logging level reaches it) is caught, and
    written back only when the build fails, since then it may say why (the real cluster: tests/test_ray_cluster.py)."""
    import os

    from siamesedb.ray_build import _RayStderr

    with _RayStderr(True):
        os.write(2, b"core_worker.cc:2465: Actor ... constructor arguments in the object store\n")
    assert capfd.readouterr().err == ""
    with pytest.raises(RuntimeError, match="build failed"), _RayStderr(True) as caught:
        os.write(2, b"raylet: why it failed\n")
        assert caught.text() == "raylet: why it failed\n"
        os.write(2, b"and more\n")  # still caught after text() read it
        raise RuntimeError("build failed")
    assert capfd.readouterr().err == "raylet: why it failed\nand more\n"
    with _RayStderr(True, on_success=True):  # Ray's start-up lines when not quiet: written back afterwards
        os.write(2, b"started\n")
    assert capfd.readouterr().err == "started\n"
    with pytest.raises(RuntimeError), _RayStderr(True) as caught:
        os.write(2, b"20 s of refused-token retries\n")
        caught.on_failure = False  # the one-line error says it all
        raise RuntimeError("refused")
    assert capfd.readouterr().err == ""
    with _RayStderr(False):  # inactive: nothing caught
        os.write(2, b"shown\n")
    assert capfd.readouterr().err == "shown\n"
