"""The package's structure, as DESIGN.md draws it and README "Layout" describes it: checked from the source itself.

Each rule here is one a restructuring promised (issue 24): FAISS and SQLite stay below the backend seam, no module
grows past ~500 lines, no two modules import each other (also through a lazy import inside a function), the thin
layers (CLI, HTTP, plots, export) ask SiameseDB and never reach into `db.backend`, and the old import paths that
tests, tools and users relied on still give the same objects.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "siamesedb"
MAX_LINES = 500


def modules() -> dict[str, Path]:
    """{dotted name: file} of every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def imported(path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that `path` imports anywhere in it (top level or inside a function)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in names if name in known}


def test_no_module_is_over_the_size_limit():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_faiss_and_sqlite_are_imported_only_below_the_backend_seam():
    above = []
    for name, path in modules().items():
        if name.startswith("siamesedb.backends"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            roots = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            above += [f"{name}: {root}" for root in roots if root.split(".")[0] in ("faiss", "sqlite3")]
    assert above == []


def test_no_import_cycles():
    known = modules()
    graph = {name: imported(path, known) - {name} for name, path in known.items()}
    # A package's __init__ re-exporting its own submodules is not a cycle of jobs: leave parent -> child edges out.
    graph = {name: {dep for dep in deps if not dep.startswith(name + ".")} for name, deps in graph.items()}

    def reaches(start: str, goal: str) -> bool:
        seen, todo = set(), [start]
        while todo:
            here = todo.pop()
            if here == goal:
                return True
            if here not in seen:
                seen.add(here)
                todo += graph[here]
        return False

    cycles = sorted(f"{a} <-> {b}" for a, deps in graph.items() for b in deps if a < b and reaches(b, a))
    assert cycles == []


@pytest.mark.parametrize("module", ["cli", "cli_common", "cli_index", "cli_train", "serve", "plots", "export"])
def test_thin_layers_ask_siamesedb_not_its_backend(module):
    path = PACKAGE / f"{module}.py"
    if not path.exists():
        pytest.skip(f"{path.name} does not exist in this layout")
    assert ".backend." not in path.read_text()


@pytest.mark.parametrize("old, new, names", [
    ("siamesedb.index", "siamesedb.backends.faiss.index", ["VectorIndex"]),
    ("siamesedb.index", "siamesedb.backends.faiss.factory", ["choose_factory", "auto_search_defaults", "ivf_lists"]),
    ("siamesedb.store", "siamesedb.backends.faiss.store", ["ItemStore"]),
    ("siamesedb.store", "siamesedb.backends.items", ["Item"]),
    ("siamesedb.torch_search", "siamesedb.backends.faiss.torch_search", ["TorchExactSearch"]),
    ("siamesedb.query", "siamesedb.scoring", ["brute_force_search", "normalize", "Ranking", "eer_threshold"]),
    ("siamesedb.query", "siamesedb.rules", ["VERIFY_RULES", "verification_score"]),
    ("siamesedb.query", "siamesedb.results", ["Hit", "SearchResults", "Prediction", "Verification"]),
    ("siamesedb.data", "siamesedb.samplers", ["PairSampler", "EpisodeSampler"]),
    ("siamesedb.data", "siamesedb.images", ["load_image", "Preprocessing"]),
    ("siamesedb.encoder", "siamesedb.backbones", ["BACKBONES"]),
    ("siamesedb.evaluation", "siamesedb.episodes", ["sample_episode"]),
])
def test_old_import_paths_give_the_same_objects(old, new, names):
    old_module, new_module = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(old_module, name) is getattr(new_module, name), f"{old}.{name}"
