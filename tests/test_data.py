"""Labelled folders, robust image loading, preprocessing and samplers, on small generated images."""

from __future__ import annotations

import io
import os

import numpy as np
import pytest
import torch
from PIL import Image

from siamesedb.data import (
    ClassBalancedSampler,
    EpisodeSampler,
    LabelledImage,
    PairSampler,
    Preprocessing,
    file_sha256,
    iter_batches,
    label_for,
    load_batch,
    load_image,
    scan_folder,
)
from siamesedb.errors import FolderError, ImageLoadError


def write(path, image, **kwargs):
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def grey(size=(12, 10), value=100):
    return Image.new("L", size, value)


def test_labels_from_folders(tmp_path):
    write(tmp_path / "Latin" / "character07" / "a.png", grey())
    write(tmp_path / "Latin" / "character07" / "b.PNG", grey())
    write(tmp_path / "s12" / "x.jpg", grey().convert("RGB"))
    write(tmp_path / "rootlevel.bmp", grey())
    write(tmp_path / ".hidden" / "c.png", grey())
    write(tmp_path / "Latin" / ".d.png", grey())
    (tmp_path / "notes.txt").write_text("not an image")
    found = scan_folder(tmp_path)
    assert [(im.label, im.path.name) for im in found] == [
        ("Latin/character07", "a.png"),
        ("Latin/character07", "b.PNG"),
        ("rootlevel", "rootlevel.bmp"),
        ("s12", "x.jpg"),
    ]
    assert label_for(tmp_path / "a" / "b" / "c.png", tmp_path) == "a/b"


def test_scan_folder_errors(tmp_path):
    with pytest.raises(FolderError, match="not found"):
        scan_folder(tmp_path / "missing")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(FolderError, match="not a folder"):
        scan_folder(tmp_path / "file.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FolderError, match="no images"):
        scan_folder(tmp_path / "empty")


def test_symlink_loops_do_not_hang(tmp_path):
    write(tmp_path / "cls" / "a.png", grey())
    os.symlink(tmp_path, tmp_path / "cls" / "loop")
    found = scan_folder(tmp_path)
    assert [im.path.name for im in found] == ["a.png"]


@pytest.mark.parametrize(
    "make, fmt",
    [
        (lambda: grey(), "PNG"),
        (lambda: grey().convert("RGB"), "JPEG"),
        (lambda: grey(), "PPM"),  # PGM-family
        (lambda: grey().convert("RGB"), "BMP"),
        (lambda: grey().convert("RGB"), "WEBP"),
        (lambda: grey(), "TIFF"),
        (lambda: Image.new("RGBA", (12, 10), (0, 0, 0, 0)), "PNG"),
        (lambda: Image.new("LA", (12, 10), (0, 128)), "PNG"),
        (lambda: grey().convert("P"), "PNG"),
        (lambda: grey().convert("1"), "PNG"),
        (lambda: Image.fromarray(np.full((10, 12), 40000, dtype=np.uint16)), "PNG"),
        (lambda: Image.new("CMYK", (12, 10), (0, 0, 0, 0)), "TIFF"),
    ],
)
def test_every_mode_loads_as_l_or_rgb(tmp_path, make, fmt):
    path = tmp_path / f"img.{fmt.lower()}"
    make().save(path, format=fmt)
    image = load_image(path)
    assert image.mode in ("L", "RGB") and image.size == (12, 10)


def test_alpha_is_composited_on_white_and_16_bit_is_scaled(tmp_path):
    write(tmp_path / "t.png", Image.new("RGBA", (4, 4), (0, 0, 0, 0)))
    assert np.asarray(load_image(tmp_path / "t.png")).min() == 255
    write(tmp_path / "w.png", Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16)))
    assert np.asarray(load_image(tmp_path / "w.png")).min() == 255


def test_exif_orientation_is_honoured(tmp_path):
    image = Image.new("L", (20, 10), 0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displayed
    image.save(tmp_path / "r.jpg", exif=exif.tobytes())
    assert load_image(tmp_path / "r.jpg").size == (10, 20)


def test_arrays_and_pil_images(tmp_path):
    assert load_image(np.zeros((5, 6), dtype=np.uint8)).size == (6, 5)
    assert load_image(np.ones((5, 6, 3), dtype=np.float32)).mode == "RGB"
    assert load_image(np.zeros((5, 6), dtype=np.uint16)).mode == "L"
    assert load_image(grey()).mode == "L"
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((2, 3, 7)))
    with pytest.raises(ImageLoadError):
        load_image(12345)


@pytest.mark.parametrize(
    "content, reason",
    [(b"", "empty"), (b"hello, I am text", "not a recognised"), (None, "unreadable")],
)
def test_bad_files_raise_image_load_error_naming_the_file(tmp_path, content, reason):
    path = tmp_path / "bad.png"
    if content is None:  # a truncated PNG
        buffer = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(buffer, "PNG")
        content = buffer.getvalue()[: len(buffer.getvalue()) // 2]
    path.write_bytes(content)
    with pytest.raises(ImageLoadError, match=reason) as info:
        load_image(path)
    assert "bad.png" in str(info.value)


def test_decompression_bomb_is_refused_quickly(tmp_path):
    # A valid PNG header declaring 20000 x 20000 pixels: must be refused from its declared size alone.
    Image.new("1", (20000, 20000)).save(tmp_path / "bomb.png", optimize=True)
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(tmp_path / "bomb.png")


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageLoadError, match="folder"):
        load_image(tmp_path)


def test_preprocessing_shape_range_and_inversion():
    image = Image.new("L", (40, 20), 255)  # white paper
    image.paste(0, (10, 5, 20, 15))  # a black stroke
    prep = Preprocessing(size=(16, 16), channels=1, invert=True)
    t = prep.to_tensor(image)
    assert t.shape == (1, 16, 16) and t.dtype == torch.float32
    assert t.min() >= 0 and t.max() <= 1 and t[0, 0, 0] == 0  # paper -> 0
    assert Preprocessing(size=(8, 8), channels=3, invert=False).to_tensor(image).shape == (3, 8, 8)
    normalised = Preprocessing(size=(8, 8), invert=False, mean=0.5, std=0.5).to_tensor(image)
    assert normalised.max() == pytest.approx(1.0)


def test_keep_aspect_pads_with_background():
    image = Image.new("L", (40, 10), 0)  # all ink, 4:1
    t = Preprocessing(size=(16, 16), invert=True, keep_aspect=True).to_tensor(image)
    assert t[0, 0, :].sum() == 0  # top rows are padding (background -> 0 after inversion)
    assert t[0, 8, :].min() > 0.9  # the middle row is ink


def test_preprocessing_round_trip():
    prep = Preprocessing(size=(20, 30), channels=3, invert=False, mean=0.4, std=0.2, keep_aspect=True)
    assert Preprocessing.from_dict(prep.to_dict()) == prep


def test_load_batch_skips_or_raises(tmp_path):
    good = write(tmp_path / "g.png", grey())
    bad = tmp_path / "b.png"
    bad.write_bytes(b"")
    batch, kept, skipped = load_batch([good, bad, good], Preprocessing(size=(8, 8)), skip_errors=True)
    assert batch.shape == (2, 1, 8, 8) and kept == [0, 2] and skipped == [(bad, "empty file")]
    with pytest.raises(ImageLoadError):
        load_batch([good, bad], Preprocessing(size=(8, 8)))


def test_iter_batches_in_order_with_and_without_workers(tmp_path):
    images = []
    for i in range(11):
        path = write(tmp_path / "c" / f"{i:02d}.png", grey(value=i * 20))
        images.append(LabelledImage(path, "c"))
    (tmp_path / "c" / "05.png").write_bytes(b"broken")
    prep = Preprocessing(size=(4, 4), invert=False)
    runs = {}
    for workers in (0, 2):
        kept_all, tensors, skipped_all = [], [], []
        for kept, tensor, skipped in iter_batches(images, prep, batch_size=4, workers=workers):
            assert len(kept) == len(tensor)
            kept_all += kept
            tensors.append(tensor)
            skipped_all += skipped
        runs[workers] = (kept_all, torch.cat(tensors), skipped_all)
    kept, tensor, skipped = runs[0]
    assert kept == [i for i in range(11) if i != 5] and [i for i, _ in skipped] == [5]
    assert runs[2][0] == kept and torch.equal(runs[2][1], tensor) and runs[2][2] == skipped
    assert tensor[kept.index(3), 0, 0, 0] == pytest.approx(60 / 255)


def test_file_sha256(tmp_path):
    import hashlib

    (tmp_path / "f").write_bytes(b"abc" * 1000)
    assert file_sha256(tmp_path / "f") == hashlib.sha256(b"abc" * 1000).hexdigest()


LABELS = np.repeat(np.arange(6), [5, 5, 5, 1, 4, 3])


def test_pair_sampler_balance_and_correctness():
    a, b, same = PairSampler(LABELS, seed=0).sample(200)
    assert same.sum() == 100
    assert np.all((LABELS[a] == LABELS[b]) == (same == 1))
    assert np.all(a[same == 1] != b[same == 1])  # genuine pairs are two different items


def test_class_balanced_sampler():
    idx = ClassBalancedSampler(LABELS, classes_per_batch=3, per_class=4, seed=1).sample()
    assert len(idx) == 12
    groups = LABELS[idx].reshape(3, 4)
    assert len(set(groups[:, 0])) == 3 and np.all(groups == groups[:, :1])


def test_episode_sampler_is_disjoint_and_deterministic():
    sampler = EpisodeSampler(LABELS, way=3, shot=2, queries=2, seed=2)
    support, queried, answer = sampler.sample()
    assert len(support) == 6 and len(queried) == 6 and not set(support) & set(queried)
    assert np.array_equal(LABELS[support].reshape(3, 2)[:, 0], LABELS[queried].reshape(3, 2)[:, 0])
    assert answer.tolist() == [0, 0, 1, 1, 2, 2]
    again = EpisodeSampler(LABELS, way=3, shot=2, queries=2, seed=2).sample()
    assert all(np.array_equal(x, y) for x, y in zip((support, queried, answer), again))


def test_group_selection_and_forgery_targets():
    from siamesedb.data import forgery_target, parse_groups, select_groups

    assert parse_groups("U01-U03, Latin") == {"U01", "U02", "U03", "Latin"}
    assert parse_groups("s8-s10") == {"s8", "s9", "s10"}
    assert parse_groups(None) is None and parse_groups("") is None
    images = [LabelledImage(f"/x/{g}/genuine/1.png", f"{g}/genuine") for g in ("U01", "U02", "U31")]
    assert [im.label for im in select_groups(images, "U01-U30")] == ["U01/genuine", "U02/genuine"]
    with pytest.raises(FolderError):
        select_groups(images, "U99")
    labels = {"U01/genuine", "U01/forged", "U02/forged"}
    assert forgery_target("U01/forged", labels) == "U01/genuine"
    assert forgery_target("U02/forged", labels) is None  # no genuine class to forge
    assert forgery_target("U01/genuine", labels) is None


def test_pair_sampler_uses_forgeries_as_hard_impostors_only():
    # classes: 0 = A/genuine, 1 = A/forged, 2 = B/genuine, 3 = B/forged
    labels = np.repeat(np.arange(4), 6)
    sampler = PairSampler(labels, seed=0, forgery_of={1: 0, 3: 2}, hard_fraction=0.5)
    a, b, same = sampler.sample(2000)
    genuine = same == 1
    assert set(labels[a[genuine]]) <= {0, 2}  # forgeries never make a genuine pair
    assert np.all(labels[a[genuine]] == labels[b[genuine]])
    impostor_pairs = {tuple(sorted(p)) for p in zip(labels[a[~genuine]], labels[b[~genuine]])}
    assert all(x != y for x, y in impostor_pairs)
    hard = np.mean([(x, y) in {(0, 1), (2, 3)} for x, y in (sorted(p) for p in zip(labels[a[~genuine]], labels[b[~genuine]]))])
    assert 0.5 <= hard <= 0.75  # half drawn as hard pairs, plus random pairs that happen to be (genuine, its forgery)
