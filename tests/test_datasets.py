"""Unpacking the real archives in ../shared/data into labelled folders (skipped when the data is absent)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest

from siamesedb.data import scan_folder
from siamesedb.datasets import default_data_root, omniglot, svc2004
from siamesedb.errors import FolderError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "omniglot").is_dir(), reason=f"{DATA} not present")


@needs_data
def test_omniglot_evaluation_unpacks_to_alphabet_character_labels(tmp_path):
    root = omniglot("evaluation", source=DATA, cache_dir=tmp_path)
    images = scan_folder(root)
    labels = {im.label for im in images}
    assert len(images) == 13180 and len(labels) == 659
    assert len({label.split("/")[0] for label in labels}) == 20
    assert all(label.count("/") == 1 and label.split("/")[1].startswith("character") for label in labels)
    # Unpacked once: a second call reuses the folder.
    assert omniglot("evaluation", source=DATA, cache_dir=tmp_path) == root
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".unpack-")]


@needs_data
def test_svc2004_unpacks_genuine_and_forged_folders(tmp_path):
    root = svc2004(source=DATA, cache_dir=tmp_path)
    labels = {im.label for im in scan_folder(root)}
    assert len(labels) == 80
    assert {"U01/genuine", "U01/forged", "U40/genuine", "U40/forged"} <= labels


def test_a_local_zip_is_found_as_file_folder_or_dataset_subfolder(tmp_path):
    archive_dir = tmp_path / "data" / "omniglot"
    archive_dir.mkdir(parents=True)
    with zipfile.ZipFile(archive_dir / "images_background.zip", "w") as zf:
        zf.writestr("images_background/Latin/character01/0001_01.png", b"png bytes")
    for source in (tmp_path / "data", archive_dir, archive_dir / "images_background.zip"):
        cache = tmp_path / f"cache-{abs(hash(str(source)))}"
        root = omniglot("background", source=source, cache_dir=cache)
        assert (root / "Latin" / "character01" / "0001_01.png").read_bytes() == b"png bytes"


def test_a_broken_archive_leaves_no_half_unpacked_folder(tmp_path):
    (tmp_path / "images_evaluation.zip").write_bytes(b"not a zip")
    with pytest.raises(FolderError, match="cannot unpack"):
        omniglot("evaluation", source=tmp_path, cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "images_evaluation.d").exists()


def test_unknown_split_and_missing_signatures(tmp_path):
    with pytest.raises(FolderError, match="split"):
        omniglot("test", source=tmp_path)
    with pytest.raises(FolderError, match="svc2004_png.zip"):
        svc2004(source=tmp_path, cache_dir=tmp_path / "cache")


def test_default_data_root_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SIAMESEDB_DATA", str(tmp_path))
    assert default_data_root() == tmp_path
