"""Odd input at the command line (issue 29): JSON whose shape is set by the arguments, never by how many images
could be read; `verify --exit-code`; a folder whose images are all unreadable; paths that do not exist or hold the
user's own files; a reroot that matches nothing; one message per problem wherever it is met."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from siamesedb.cli import cli
from siamesedb.db import SiameseDB
from siamesedb.errors import FolderError, ImageLoadError, IndexExistsError, InvalidInputError

from helpers import SHAPE_NAMES  # tests/helpers.py


def run(*args: object):
    """(exit status, stdout, stderr) of `siamesedb ARGS...` in process."""
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert not (result.exception and not isinstance(result.exception, SystemExit)), result.exception
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def index_dir(drawn_shapes, encoder_dir, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("odd") / "index"
    with SiameseDB.build(drawn_shapes, path=path, encoder=encoder_dir) as db:
        db.calibrate()  # the tiny encoder carries no threshold of its own
    return path


@pytest.fixture()
def bad_image(tmp_path) -> Path:
    path = tmp_path / "bad.png"
    path.write_text("not an image\n")
    return path


# ---------------------------------------------------------------------------------------------- JSON shapes


@pytest.mark.parametrize("command", [["query", "-k", "2"], ["classify"]])
def test_query_and_classify_json_is_an_empty_list_when_every_image_fails(index_dir, bad_image, tmp_path, command):
    code, out, err = run(*command, bad_image, tmp_path / "missing.png", "--index", index_dir, "--json")
    assert code == 1
    assert json.loads(out) == []
    assert "bad.png" in err and "missing.png: no such file" in err
    code, out, err = run(*command, bad_image, "--index", index_dir, "--json")
    assert (code, json.loads(out)) == (1, [])


def test_verify_json_is_an_object_for_one_image_and_a_list_for_several_whatever_failed(index_dir, drawn_shapes,
                                                                                       bad_image):
    good = drawn_shapes / "line" / "00.png"
    base = ("--index", index_dir, "--label", "line", "--json")
    code, out, _ = run("verify", good, *base)
    assert code == 0 and isinstance(json.loads(out), dict)
    # Two images, one unreadable: still a list (of the one answer), exit 1.
    code, out, err = run("verify", good, bad_image, *base)
    document = json.loads(out)
    assert code == 1 and isinstance(document, list) and [d["query"] for d in document] == [str(good)]
    assert "bad.png" in err
    # Several images, all unreadable: an empty list.
    code, out, _ = run("verify", bad_image, bad_image, *base)
    assert (code, json.loads(out)) == (1, [])
    # One image that fails: still one object, naming the image and the error.
    code, out, err = run("verify", bad_image, *base)
    document = json.loads(out)
    assert code == 1 and isinstance(document, dict)
    assert document["query"] == str(bad_image) and document["label"] == "line" and "bad.png" in document["error"]
    assert "accepted" not in document and "bad.png" in err


def test_verify_pair_json_is_an_object_even_when_an_image_fails(drawn_shapes, encoder_dir, bad_image):
    code, out, err = run("verify", drawn_shapes / "line" / "00.png", bad_image, "--encoder", encoder_dir,
                         "--threshold", "0.5", "--json")
    document = json.loads(out)
    assert code == 1 and isinstance(document, dict) and "bad.png" in document["error"] and "bad.png" in err


# ---------------------------------------------------------------------------------------------- --exit-code


def test_verify_exit_code_tells_accepted_rejected_and_errors_apart(index_dir, drawn_shapes, bad_image):
    good = drawn_shapes / "line" / "00.png"
    base = ("--index", index_dir, "--label", "line")
    assert run("verify", good, *base, "--threshold", "-1", "--exit-code")[0] == 0
    code, out, _ = run("verify", good, *base, "--threshold", "1.5", "--exit-code")
    assert code == 3 and "REJECTED" in out
    assert run("verify", good, good, *base, "--threshold", "1.5", "--exit-code", "--json")[0] == 3
    assert run("verify", good, bad_image, *base, "--threshold", "-1", "--exit-code")[0] == 1
    # Without the flag a rejection still exits 0 (unchanged).
    assert run("verify", good, *base, "--threshold", "1.5")[0] == 0


# ---------------------------------------------------------------------------------------------- build


def test_a_folder_of_unreadable_images_is_an_error_and_leaves_no_index(tmp_path, encoder_dir):
    folder = tmp_path / "junk"
    (folder / "a").mkdir(parents=True)
    for name in ("x.png", "y.png", "z.jpg"):
        (folder / "a" / name).write_text("not an image\n")
    with pytest.raises(FolderError, match=r"junk: none of its 3 images could be read"):
        SiameseDB.build(folder, path=tmp_path / "index", encoder=encoder_dir)
    assert not (tmp_path / "index").exists()
    code, out, err = run("build", folder, "--index", tmp_path / "cli", "--encoder", encoder_dir, "-q")
    assert code == 1 and out == ""
    errors = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "none of its 3 images could be read" in errors[0] and str(folder) in errors[0]
    assert sum(line.startswith("warning: skipped") for line in err.splitlines()) == 3
    assert not (tmp_path / "cli").exists()
    # An empty folder that already existed stays, and empty.
    (tmp_path / "empty").mkdir()
    with pytest.raises(FolderError):
        SiameseDB.build(folder, path=tmp_path / "empty", encoder=encoder_dir)
    assert list((tmp_path / "empty").iterdir()) == []


def test_a_folder_of_symlink_loops_only_is_an_error_too(tmp_path, encoder_dir):
    folder = tmp_path / "loops"
    folder.mkdir()
    os.symlink(folder / "l.png", folder / "l.png")
    with pytest.raises(FolderError, match="none of its 1 images could be read"):
        SiameseDB.build(folder, path=tmp_path / "index", encoder=encoder_dir)
    assert not (tmp_path / "index").exists()


def test_an_unreadable_folder_into_an_existing_index_loses_nothing(index_dir, tmp_path, encoder_dir):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "x.png").write_text("not an image\n")
    with SiameseDB.open(index_dir) as db:
        before = db.label_counts()
    with pytest.raises(FolderError, match="could be read"):
        SiameseDB.build(folder, path=index_dir, encoder=encoder_dir)
    with SiameseDB.open(index_dir) as db:
        assert db.label_counts() == before


def test_build_refuses_a_folder_holding_the_users_own_files(tmp_path, drawn_shapes, encoder_dir):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "notes.txt").write_text("mine\n")
    with pytest.raises(IndexExistsError, match=r"mine: .*not an index.*notes\.txt"):
        SiameseDB.build(drawn_shapes, path=target, encoder=encoder_dir)
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    code, _, err = run("build", drawn_shapes, "--index", target, "--encoder", encoder_dir, "-q")
    assert code == 1 and len(err.strip().splitlines()) == 1 and "notes.txt" in err
    assert sorted(p.name for p in target.iterdir()) == ["notes.txt"]
    # An empty folder, and a creation cut short (no manifest, an empty store), stay allowed.
    (tmp_path / "empty").mkdir()
    assert len(SiameseDB.build(drawn_shapes, path=tmp_path / "empty", encoder=encoder_dir)) == 4 * len(SHAPE_NAMES)
    cut = tmp_path / "cut"
    SiameseDB.create(cut, encoder=encoder_dir).close()
    (cut / "manifest.json").unlink()
    assert len(SiameseDB.build(drawn_shapes, path=cut, encoder=encoder_dir)) == 4 * len(SHAPE_NAMES)


# ---------------------------------------------------------------------------------------------- paths


@pytest.mark.parametrize("command", [["query"], ["classify"]])
def test_sheet_into_a_missing_folder_is_refused_in_one_line(index_dir, drawn_shapes, tmp_path, command):
    sheet = tmp_path / "nope" / "deeper" / "x.png"
    code, out, err = run(*command, drawn_shapes / "line" / "00.png", "--index", index_dir, "--sheet", sheet)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [f"Error: {sheet.parent}: folder not found"]
    assert not (tmp_path / "nope").exists()


def test_plot_map_into_a_missing_folder_is_refused(index_dir, tmp_path):
    code, _, err = run("plot-map", "--index", index_dir, "--out", tmp_path / "nope" / "map.png")
    assert code == 1 and "folder not found" in err and not (tmp_path / "nope").exists()


def test_reroot_matching_nothing_is_an_error(drawn_shapes, encoder_dir, tmp_path):
    path = tmp_path / "index"
    db = SiameseDB.build(drawn_shapes, path=path, encoder=encoder_dir)
    with pytest.raises(InvalidInputError, match=r"no stored path starts with /nope \(16 items; e\.g\. /.*\.png\)"):
        db.reroot("/nope", "/new")
    db.close()
    code, out, err = run("reindex", "--index", path, "--reroot", "/nope", "/new")
    assert code == 1 and out == "" and "no stored path starts with /nope (16 items" in err
    code, out, _ = run("reindex", "--index", path, "--reroot", drawn_shapes, tmp_path / "moved", "--json")
    assert code == 0 and json.loads(out)["rerooted"] == 16


# ---------------------------------------------------------------------------------------------- messages


def test_import_of_a_wrong_suffix_says_what_import_expects(tmp_path, bad_image):
    code, _, err = run("import", bad_image, "--index", tmp_path / "index")
    assert code == 1 and "export to" not in err
    assert "import a .parquet or .npy export" in err


def test_a_symlink_loop_and_a_broken_link_read_the_same_in_queries_and_builds(tmp_path, encoder):
    from siamesedb.data import load_image

    os.symlink(tmp_path / "loop.png", tmp_path / "loop.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "broken.png")
    with pytest.raises(ImageLoadError, match="loop.png: symbolic link loop"):
        load_image(tmp_path / "loop.png")
    with pytest.raises(ImageLoadError, match="broken.png: broken symbolic link"):
        load_image(tmp_path / "broken.png")
    with pytest.raises(ImageLoadError, match="loop.png: symbolic link loop"):
        encoder.encode(tmp_path / "loop.png")
    with pytest.raises(ImageLoadError, match="gone.png: no such file"):
        load_image(tmp_path / "gone.png")


def test_readme_synopsis_names_classify_top_and_import_backend_and_train_lists_mlp():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    block = readme.split("## Command line", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    synopsis = {line.split()[1]: line for line in block.splitlines() if line.startswith("siamesedb ")}
    assert "--top" in synopsis["classify"] and "--backend" in synopsis["import"]
    assert "--exit-code" in synopsis["verify"]
    code, out, _ = run("train", "--help")
    assert code == 0 and "mlp" in out
