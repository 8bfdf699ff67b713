"""Labelled folders, robust image loading, preprocessing and samplers, on small generated images."""

from __future__ import annotations

import functools
import io
import json
import os
import struct
import zlib

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
from siamesedb.errors import FolderError, ImageLoadError, InvalidInputError


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
    assert label_for(tmp_path / "x.png", tmp_path) == "x"
    with pytest.raises(InvalidInputError):
        label_for("/elsewhere/x.png", tmp_path)


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


def uint16(value):
    return Image.fromarray(np.full((10, 12), value, dtype=np.uint16))  # mode "I;16"


def int32(value):
    return Image.fromarray(np.full((10, 12), value, dtype=np.int32))  # mode "I"


def palette_with_transparency():
    image = grey().convert("P")
    image.info["transparency"] = 0
    return image


@pytest.mark.parametrize(
    "make, name",
    [
        (lambda: grey(), "grey.png"),
        (lambda: grey().convert("RGB"), "rgb.jpg"),
        (lambda: grey().convert("RGB"), "rgb.JPEG"),
        (lambda: grey(), "grey.pgm"),
        (lambda: grey().convert("RGB"), "rgb.ppm"),
        (lambda: grey().convert("1"), "bits.pbm"),
        (lambda: grey().convert("RGB"), "rgb.bmp"),
        (lambda: grey(), "grey.bmp"),
        (lambda: grey().convert("RGB"), "rgb.webp"),
        (lambda: Image.new("RGBA", (12, 10), (0, 0, 0, 0)), "rgba.webp"),
        (lambda: grey(), "grey.tif"),
        (lambda: grey().convert("RGB"), "rgb.tiff"),
        (lambda: Image.new("RGBA", (12, 10), (0, 0, 0, 0)), "rgba.png"),
        (lambda: Image.new("LA", (12, 10), (0, 128)), "la.png"),
        (lambda: grey().convert("P"), "palette.png"),
        (palette_with_transparency, "palette_transparent.png"),
        (lambda: grey().convert("1"), "bits.png"),
        (lambda: grey().convert("1"), "bits.tif"),
        (lambda: uint16(40000), "sixteen.png"),
        (lambda: uint16(40000), "sixteen.tif"),
        (lambda: int32(40000), "thirtytwo.tif"),
        (lambda: Image.new("CMYK", (12, 10), (0, 0, 0, 0)), "cmyk.tif"),
        (lambda: Image.new("CMYK", (12, 10), (0, 0, 0, 0)), "cmyk.jpg"),
    ],
)
def test_every_format_and_mode_loads_as_l_or_rgb(tmp_path, make, name):
    path = tmp_path / name
    make().save(path)
    image = load_image(path)
    assert image.mode in ("L", "RGB") and image.size == (12, 10)
    tensor = Preprocessing(size=(8, 8)).to_tensor(image)
    assert tensor.shape == (1, 8, 8) and torch.isfinite(tensor).all()


def test_high_bit_depths_are_scaled_not_clipped(tmp_path):
    # 32768 / 65535 is mid-grey; PIL's own convert("L") would clip it to white.
    uint16(32768).save(tmp_path / "mid.png")
    assert np.asarray(load_image(tmp_path / "mid.png")).max() == 128
    int32(32768).save(tmp_path / "mid.tif")  # mode "I" above 255: read as 16-bit
    assert np.asarray(load_image(tmp_path / "mid.tif")).max() == 128
    int32(200).save(tmp_path / "low.tif")  # mode "I" within 0..255: read as 8-bit
    assert np.asarray(load_image(tmp_path / "low.tif")).max() == 200
    assert np.asarray(load_image(Image.fromarray(np.full((3, 3), 0.5, np.float32)))).max() == 128  # mode "F" in [0, 1]
    # to_tensor accepts such modes directly too
    assert Preprocessing(size=(4, 4), invert=False).to_tensor(uint16(65535)).min() == 1.0


def test_palette_and_cmyk_colours_survive(tmp_path):
    Image.new("RGB", (4, 4), (255, 0, 0)).convert("P").save(tmp_path / "red.png")
    assert load_image(tmp_path / "red.png").getpixel((0, 0)) == (255, 0, 0)
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "red.tif")  # cyan-free, full magenta + yellow
    assert load_image(tmp_path / "red.tif").getpixel((0, 0)) == (255, 0, 0)


def test_animated_image_gives_its_first_frame(tmp_path):
    frames = [Image.new("L", (6, 6), v) for v in (10, 200, 90)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    frames[0].save(tmp_path / "anim.webp", save_all=True, append_images=frames[1:], lossless=True)
    frames[0].save(tmp_path / "anim.png", save_all=True, append_images=frames[1:])  # APNG
    for name in ("anim.gif", "anim.webp", "anim.png"):
        pixels = np.asarray(load_image(tmp_path / name).convert("L"))
        assert abs(int(pixels.mean()) - 10) <= 2, name


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
    with Image.open(tmp_path / "r.jpg") as opened:  # straight from Image.open: treated like the file
        assert load_image(opened).size == (10, 20)
    assert load_image(Image.new("L", (20, 10))).size == (20, 10)  # an in-memory image is taken as it is


def test_arrays_and_pil_images(tmp_path):
    assert load_image(np.zeros((5, 6), dtype=np.uint8)).size == (6, 5)
    assert load_image(np.ones((5, 6, 3), dtype=np.float32)).mode == "RGB"
    assert load_image(np.zeros((5, 6), dtype=np.uint16)).mode == "L"
    assert load_image(grey()).mode == "L"
    assert np.asarray(load_image(np.array([[0, 255]]))).tolist() == [[0, 255]]  # int64 in 0..255: 8-bit
    assert np.asarray(load_image(np.array([[0, 65535]]))).tolist() == [[0, 255]]  # beyond 255: 16-bit
    assert np.asarray(load_image(np.array([[True, False]]))).tolist() == [[255, 0]]
    assert np.asarray(load_image(np.full((2, 2, 1), 0.5))).max() == 128
    for bad in (np.array([[-1, 3]]), np.array([[np.nan]]), np.zeros((0, 4), np.uint8), np.zeros((2, 2), complex)):
        with pytest.raises(ImageLoadError):
            load_image(bad)
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((2, 3, 7)))
    with pytest.raises(ImageLoadError):
        load_image(12345)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"", "empty"),
        (b"hello, I am text", "not a recognised"),
        (None, "unreadable"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a recognised|unreadable"),
    ],
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


def png_header_only(width, height):
    """A PNG that declares width x height 1-bit pixels and holds none: a bomb is judged by its header alone."""

    def chunk(kind, payload):
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [9_000, 20_000, 60_000])  # 81 M (our limit), 400 M (PIL's error), 3.6 G pixels
def test_decompression_bomb_is_refused_from_its_declared_size(tmp_path, side, monkeypatch):
    (tmp_path / "bomb.png").write_bytes(png_header_only(side, side))
    # Refused from the header: no pixel decode is even started (a behaviour, not a wall-clock bound, which a busy
    # shared machine would break).
    from PIL import ImageFile

    decoded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: decoded.append(self.size) or real_load(self))
    with pytest.raises(ImageLoadError, match="too large") as info:
        load_image(tmp_path / "bomb.png")
    assert "bomb.png" in str(info.value) and decoded == []


def test_a_real_bomb_file_is_refused(tmp_path):
    Image.new("1", (9000, 9000)).save(tmp_path / "bomb.png")  # 81 M pixels, a few KB on disk
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    with pytest.raises(ImageLoadError, match="too large"):
        load_image(tmp_path / "bomb.png")


def test_a_fifo_is_refused_without_blocking(tmp_path):
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    os.mkfifo(tmp_path / "pipe.png")
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path / "pipe.png")


def encoded(fmt, mode="L"):
    pixels = np.random.default_rng(1).integers(0, 255, (24, 24), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt, mode", [("PNG", "L"), ("JPEG", "RGB"), ("BMP", "RGB"), ("TIFF", "L"), ("WEBP", "RGB"),
                                       ("PPM", "L"), ("GIF", "L")])
@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL reports some damage (corrupt EXIF) as a warning and reads on
def test_damaged_files_only_ever_raise_image_load_error(tmp_path, fmt, mode):
    # Truncations and byte flips all over the file: each either loads or fails as ImageLoadError, nothing else.
    data = encoded(fmt, mode)
    rng = np.random.default_rng(7)
    variants = [data[:cut] for cut in np.linspace(1, len(data) - 1, 12).astype(int)]
    for _ in range(12):
        damaged = bytearray(data)
        for at in rng.integers(0, len(data), size=4):
            damaged[at] ^= 0xFF
        variants.append(bytes(damaged))
    path = tmp_path / f"damaged.{fmt.lower()}"
    for variant in variants:
        path.write_bytes(variant)
        try:
            image = load_image(path)
        except ImageLoadError as exc:
            assert exc.source == path and exc.reason
        else:
            assert image.mode in ("L", "RGB")


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
    assert Preprocessing.from_dict(json.loads(json.dumps(prep.to_dict()))) == prep
    numpyish = Preprocessing(size=np.array([20, 30]), mean=np.float32(0.5), std=np.float64(2.0))
    assert json.loads(json.dumps(numpyish.to_dict()))["size"] == [20, 30]
    assert Preprocessing(size=16).size == (16, 16)
    assert Preprocessing.from_dict({"size": [8, 9], "future_option": 1}).size == (8, 9)


@pytest.mark.parametrize("kwargs", [{"size": (0, 5)}, {"size": (1, 2, 3)}, {"size": "big"}, {"channels": 2},
                                    {"std": 0}])
def test_preprocessing_rejects_bad_settings(kwargs):
    with pytest.raises(InvalidInputError):
        Preprocessing(**kwargs)


def test_keep_aspect_centres_a_tall_image():
    image = Image.new("L", (10, 40), 0)  # all ink, 1:4
    t = Preprocessing(size=(16, 16), invert=True, keep_aspect=True).to_tensor(image)
    assert t[0, :, 0].sum() == 0 and t[0, :, -1].sum() == 0  # left and right columns are padding
    assert t[0, :, 8].min() > 0.9


def test_load_batch_skips_or_raises(tmp_path):
    good = write(tmp_path / "g.png", grey())
    bad = tmp_path / "b.png"
    bad.write_bytes(b"")
    batch, kept, skipped = load_batch([good, bad, good], Preprocessing(size=(8, 8)), skip_errors=True)
    assert batch.shape == (2, 1, 8, 8) and kept == [0, 2] and skipped == [(bad, "empty file")]
    with pytest.raises(ImageLoadError):
        load_batch([good, bad], Preprocessing(size=(8, 8)))


@pytest.fixture()
def eleven_images(tmp_path):
    images = []
    for i in range(11):
        path = write(tmp_path / "c" / f"{i:02d}.png", grey(value=i * 20))
        images.append(LabelledImage(path, "c"))
    (tmp_path / "c" / "05.png").write_bytes(b"broken")
    (tmp_path / "c" / "09.png").write_bytes(b"")
    return images


def collect(batches):
    kept_all, tensors, skipped_all, sizes = [], [], [], []
    for kept, tensor, skipped in batches:
        assert len(kept) == len(tensor) and tensor.dtype == torch.float32
        kept_all += kept
        tensors.append(tensor)
        skipped_all += skipped
        sizes.append(len(kept) + len(skipped))
    return kept_all, torch.cat(tensors), skipped_all, sizes


@pytest.mark.parametrize("batch_size", [2, 4, 64])  # 6 batches (more than the look-ahead), 3, and a single one
def test_iter_batches_in_order_with_and_without_workers(eleven_images, batch_size):
    prep = Preprocessing(size=(4, 4), invert=False)
    serial = collect(iter_batches(eleven_images, prep, batch_size=batch_size, workers=0))
    parallel = collect(iter_batches(eleven_images, prep, batch_size=batch_size, workers=2))
    kept, tensor, skipped, sizes = serial
    assert kept == [i for i in range(11) if i not in (5, 9)]
    assert skipped == [(5, "not a recognised image format"), (9, "empty file")]
    assert sizes == [min(batch_size, 11 - s) for s in range(0, 11, batch_size)]
    assert tensor[kept.index(3), 0, 0, 0] == pytest.approx(60 / 255)
    assert parallel[0] == kept and torch.equal(parallel[1], tensor) and parallel[2:] == serial[2:]


def test_iter_batches_stops_early_and_handles_nothing(eleven_images):
    prep = Preprocessing(size=(4, 4))
    batches = iter_batches(eleven_images, prep, batch_size=1, workers=2)
    first = next(batches)
    assert first[0] == [0]
    batches.close()  # leaving early must not wait for (or leak) the remaining work
    assert list(iter_batches([], prep, workers=2)) == []
    with pytest.raises(InvalidInputError):
        next(iter_batches(eleven_images, prep, batch_size=0))


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


def test_pair_sampler_is_deterministic_and_covers_every_class():
    first = PairSampler(LABELS, seed=3).sample(1001)
    again = PairSampler(LABELS, seed=3).sample(1001)
    other = PairSampler(LABELS, seed=4).sample(1001)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not np.array_equal(first[0], other[0])
    a, b, same = first
    assert a.dtype == b.dtype == np.int64 and same.dtype == np.float32 and same.sum() == 500
    genuine = same == 1
    assert set(LABELS[a[genuine]]) == {0, 1, 2, 4, 5}  # class 3 has one item: it can make no genuine pair
    assert set(LABELS[a[~genuine]]) | set(LABELS[b[~genuine]]) == set(range(6))
    with pytest.raises(InvalidInputError):
        PairSampler([1, 2, 3], seed=0)  # no class with two items


def test_class_balanced_sampler():
    idx = ClassBalancedSampler(LABELS, classes_per_batch=3, per_class=4, seed=1).sample()
    assert len(idx) == 12
    groups = LABELS[idx].reshape(3, 4)
    assert len(set(groups[:, 0])) == 3 and np.all(groups == groups[:, :1])


def test_class_balanced_sampler_repeats_only_when_a_class_is_short():
    sampler = ClassBalancedSampler(LABELS, classes_per_batch=6, per_class=4, seed=5)
    idx = sampler.sample().reshape(6, 4)
    for row in idx:
        size = int((LABELS == LABELS[row[0]]).sum())
        assert len(set(row)) == min(size, 4)  # distinct when the class has K items, all of them otherwise
    assert np.array_equal(ClassBalancedSampler(LABELS, 6, 4, seed=5).sample(), idx.ravel())
    with pytest.raises(InvalidInputError):
        ClassBalancedSampler(LABELS, classes_per_batch=7, per_class=2)


def test_episode_sampler_is_disjoint_and_deterministic():
    sampler = EpisodeSampler(LABELS, way=3, shot=2, queries=2, seed=2)
    support, queried, answer = sampler.sample()
    assert len(support) == 6 and len(queried) == 6 and not set(support) & set(queried)
    assert np.array_equal(LABELS[support].reshape(3, 2)[:, 0], LABELS[queried].reshape(3, 2)[:, 0])
    assert answer.tolist() == [0, 0, 1, 1, 2, 2]
    again = EpisodeSampler(LABELS, way=3, shot=2, queries=2, seed=2).sample()
    assert all(np.array_equal(x, y) for x, y in zip((support, queried, answer), again))
    assert set(LABELS[support]) <= {0, 1, 2, 4}  # classes with fewer than shot + queries items never appear
    with pytest.raises(InvalidInputError):
        EpisodeSampler(LABELS, way=5, shot=2, queries=2)


def test_episode_sampler_brings_each_drawn_writer_with_their_forgeries():
    # classes 0-5 genuine writers, 10-15 their forgeries (10 imitates 0, ...), 4 items each
    labels = np.repeat(np.r_[np.arange(6), np.arange(10, 16)], 4)
    forgery_of = {10 + g: g for g in range(6)}
    for seed in range(20):
        support, _, _ = EpisodeSampler(labels, way=4, shot=1, queries=1, seed=seed, forgery_of=forgery_of).sample()
        drawn = labels[support].tolist()
        assert len(set(drawn)) == 4
        # every drawn genuine class has its forged class in the same episode, and vice versa
        assert all((c + 10 in drawn) for c in drawn if c < 10) and all((c - 10 in drawn) for c in drawn if c >= 10)
    # an odd way still fills the episode with distinct classes
    support, _, _ = EpisodeSampler(labels, way=5, shot=1, queries=1, seed=3, forgery_of=forgery_of).sample()
    assert len(set(labels[support].tolist())) == 5


def test_episode_sampler_within_group_episodes_stay_inside_one_group():
    # 10 classes of 3 items in three groups: 0-4 (five classes), 5-7 (three), 8-9 (two).
    labels = np.repeat(np.arange(10), 3)
    group_of_class = {c: 0 if c < 5 else 1 if c < 8 else 2 for c in range(10)}
    sampler = EpisodeSampler(labels, way=4, shot=1, queries=2, seed=0, group_of_class=group_of_class, within_group=1.0)
    seen_groups = set()
    for _ in range(60):
        support, queried, answer = sampler.sample()
        drawn = labels[support]
        groups = {group_of_class[int(c)] for c in drawn}
        assert len(groups) == 1  # every class of the episode from the same group
        seen_groups |= groups
        way = len(support)  # shot 1: one support item per class
        assert way == min(4, [5, 3, 2][groups.pop()]) and len(set(drawn.tolist())) == way
        assert np.array_equal(answer, np.repeat(np.arange(way), 2)) and len(queried) == 2 * way
        assert np.array_equal(labels[queried], np.repeat(drawn, 2))  # queries class-major, in support order
    assert seen_groups == {0, 1, 2}


def test_episode_sampler_within_group_fraction_mixes_and_zero_changes_nothing():
    labels = np.repeat(np.arange(40), 2)
    group_of_class = {c: c // 10 for c in range(40)}  # four groups of ten
    plain = EpisodeSampler(labels, way=5, shot=1, queries=1, seed=7)
    off = EpisodeSampler(labels, way=5, shot=1, queries=1, seed=7, group_of_class=group_of_class, within_group=0.0)
    for _ in range(20):  # fraction 0 draws exactly what a sampler without groups draws
        assert all(np.array_equal(x, y) for x, y in zip(plain.sample(), off.sample()))
    half = EpisodeSampler(labels, way=5, shot=1, queries=1, seed=7, group_of_class=group_of_class, within_group=0.5)
    single = sum(len({group_of_class[int(c)] for c in labels[half.sample()[0]]}) == 1 for _ in range(400))
    # ~200 within-group episodes; a mixed 5-of-40 draw lands in one group with chance 4*C(10,5)/C(40,5) < 0.2%
    assert 160 < single < 250
    with pytest.raises(InvalidInputError):
        EpisodeSampler(labels, way=5, shot=1, queries=1, group_of_class=group_of_class, within_group=1.5)


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


@functools.lru_cache(maxsize=None)
def _large_photo_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like JPEG: a smooth colour field, discs of flat colour (edges) and sensor-like noise."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    field = rng.integers(0, 256, (height // 100 + 2, width // 100 + 2, 3), dtype=np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(40):
        x, y, r = int(rng.integers(0, width)), int(rng.integers(0, height)), int(rng.integers(10, width // 6))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    noisy = np.asarray(image, np.int16) + rng.normal(0, 12, (height, width, 3)).astype(np.int16)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.mark.parametrize("size, keep_aspect, channels", [((28, 28), False, 1), ((96, 96), False, 3), ((64, 128), True, 1)])
def test_jpeg_draft_decode_matches_full_decode_after_the_resize(size, keep_aspect, channels):
    """Decoding a large JPEG at reduced DCT scale (draft) gives the encoder nearly the same input as a full decode."""
    from siamesedb.data import EncodedFile, Preprocessing, load_image

    source = EncodedFile(_large_photo_jpeg(1600, 1200), "photo.jpg")
    prep = Preprocessing(size=size, keep_aspect=keep_aspect, channels=channels, invert=False)
    drafted = load_image(source, prep.draft_size)
    assert drafted.size[0] < 1600 and min(drafted.size) >= max(prep.draft_size)  # decoded smaller, still covering
    full = prep.to_array(load_image(source))
    draft = prep.to_array(drafted)
    assert full.shape == draft.shape
    assert float(np.abs(full - draft).mean()) * 255 < 0.6  # mean difference under 0.6 of one 8-bit level


def test_draft_leaves_non_jpeg_images_alone(tmp_path):
    from siamesedb.data import Preprocessing, load_image

    png = tmp_path / "big.png"
    Image.fromarray(np.full((800, 600), 200, np.uint8)).save(png)
    assert load_image(png, Preprocessing(size=(28, 28)).draft_size).size == (600, 800)


def test_draft_decode_keeps_exif_orientation():
    """A portrait photo stored landscape with EXIF orientation 6 comes out upright, drafted or not."""
    from siamesedb.data import EncodedFile, Preprocessing, load_image

    image = Image.open(io.BytesIO(_large_photo_jpeg(1600, 1200)))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90, exif=exif.tobytes())
    source = EncodedFile(buffer.getvalue(), "portrait.jpg")
    prep = Preprocessing(size=(48, 32), channels=3, invert=False)
    full, drafted = load_image(source), load_image(source, prep.draft_size)
    assert full.size == (1200, 1600) and drafted.size[0] < drafted.size[1]
    assert float(np.abs(prep.to_array(full) - prep.to_array(drafted)).mean()) * 255 < 0.6
