"""Fixtures shared by the test files: the tiny encoder (as a folder and loaded), one FAISS thread, drawn shapes;
and the hook that decides, for tests marked `helpers.needs(path)`, whether absent real data skips them or (CI=true)
fails them.

Each fixture is module scoped, as every copy it replaces was: built once per test file that asks for it, never shared
between files. Helpers that tests call with arguments are in helpers.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import SHAPE_NAMES, SHARED_DATA, draw_shape, in_ci, require, save_tiny_encoder


def pytest_configure(config):
    config.addinivalue_line("markers", "real_data(path): the test needs this file or folder of the real data "
                                       "(helpers.needs): skipped when absent, failed when absent under CI=true")


def pytest_report_header(config):
    mode = ("CI=true: absent real data or browser FAIL their tests" if in_ci()
            else "not CI: absent real data or browser skip their tests (CI=true makes them fail)")
    return f"siamesedb real data: {SHARED_DATA} ({'present' if SHARED_DATA.is_dir() else 'ABSENT'}); {mode}"


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture of the test runs: every path its `needs` marks name must exist (helpers.require)."""
    for mark in item.iter_markers("real_data"):
        require(*mark.args)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    """A folder holding `helpers.tiny_encoder(seed=0)`: 16-d vectors from 28x28 grey input."""
    return save_tiny_encoder(tmp_path_factory.mktemp("encoder"))


@pytest.fixture(scope="module")
def encoder(encoder_dir):
    """The tiny encoder of `encoder_dir`, loaded: an `Encoder`."""
    from siamesedb.encoder import Encoder

    return Encoder.load(encoder_dir)


@pytest.fixture(scope="module")
def one_faiss_thread():
    """One FAISS thread while a module runs, the previous setting restored afterwards. FAISS's OpenMP threads spin
    while they wait: on a busy 2-core machine k-means then crawls; one thread keeps small trainings fast and
    deterministic. Modules opt in with `pytestmark = pytest.mark.usefixtures("one_faiss_thread")`."""
    import faiss

    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(threads)


@pytest.fixture(scope="module")
def drawn_shapes(tmp_path_factory) -> Path:
    """A folder of 4 classes (SHAPE_NAMES) x 4 drawn 48x48 shapes, `<label>/<variant:02d>.png`."""
    root = tmp_path_factory.mktemp("shapes")
    for kind, name in enumerate(SHAPE_NAMES):
        (root / name).mkdir(parents=True)
        for v in range(4):
            draw_shape(kind, v).save(root / name / f"{v:02d}.png")
    return root
