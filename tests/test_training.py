"""The training loop on a tiny generated folder: artefacts, twin weights, resume, determinism, augmentation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from siamesedb.encoder import Encoder
from siamesedb.training import TrainConfig, augment, train


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """6 classes x 6 images of simple shapes, 20x20, with small jitter."""
    root = tmp_path_factory.mktemp("shapes")
    rng = np.random.default_rng(0)
    for c in range(6):
        (root / f"class{c}").mkdir()
        for i in range(6):
            image = Image.new("L", (20, 20), 255)
            pen = ImageDraw.Draw(image)
            dx, dy = rng.integers(-2, 3, size=2)
            if c % 3 == 0:
                pen.ellipse((3 + dx, 3 + dy, 15 + dx, 15 + dy), outline=0, width=2)
            elif c % 3 == 1:
                pen.rectangle((4 + dx, 4 + dy, 15 + dx, 15 + dy), outline=0, width=2)
            else:
                pen.line((2, 2 + dy, 18, 18 - dx), fill=0, width=2)
            if c >= 3:
                pen.line((0, 10, 20, 10), fill=0, width=1)
            image.save(root / f"class{c}" / f"{i}.png")
    return root


def tiny(loss="contrastive", **overrides):
    base = dict(loss=loss, epochs=2, steps_per_epoch=3, batch_size=8, image_size=16, width=8, embedding_dim=8,
                val_fraction=0.34, val_episodes=5, val_way=2, way=3, shot=2, queries=2, per_class=2, workers=0, device="cpu",
                validation="classes")  # these tests pin the class split itself (few classes: test_train_validation.py)
    base.update(overrides)
    return TrainConfig(**base)


@pytest.mark.parametrize("loss", ["contrastive", "triplet", "bce", "proto"])
def test_each_loss_trains_and_writes_every_artefact(folder, tmp_path, loss):
    encoder = train(folder, tmp_path / "run", tiny(loss), progress=False)
    for name in ("config.json", "model.safetensors", "train_config.json", "history.json", "loss_curve.png"):
        assert (tmp_path / "run" / name).exists(), name
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    assert all(np.isfinite(h["loss"]) for h in history)
    loaded = Encoder.load(tmp_path / "run")
    # Validation: 5 seeded 2-way 1-shot episodes of the 2 held-out classes, one query a class: 10 answers, so each
    # epoch's accuracy is a whole number of tenths; the run keeps the best epoch and says which and how good.
    scores = [h["val_accuracy"] for h in history]
    assert all(abs(10 * s - round(10 * s)) < 1e-9 for s in scores), scores
    notes = loaded.config.notes
    assert notes["val_accuracy"] == max(scores) == scores[notes["best_epoch"] - 1], (notes, scores)
    assert loaded.fingerprint == encoder.fingerprint
    assert {"pair_threshold", "trained_on", "train_config"} <= set(loaded.config.notes)
    assert (tmp_path / "run" / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    # verify's fallback threshold: FAR <= 5% on one-shot trials of the held-out classes; the data's profile, for the
    # out-of-domain warning.
    calibration = loaded.config.pair_calibration
    assert calibration["far"] <= 0.05 and loaded.config.pair_threshold == calibration["threshold"]
    assert calibration["impostors"] == "any other class"  # a flat folder: no groups
    assert loaded.config.data_profile["size"] == [20, 20] and loaded.config.data_profile["light_background"] == 1.0


def test_training_is_deterministic_for_a_seed(folder, tmp_path):
    a = train(folder, tmp_path / "a", tiny(seed=3), progress=False)
    b = train(folder, tmp_path / "b", tiny(seed=3), progress=False)
    for (name, x), (_, y) in zip(a.net.state_dict().items(), b.net.state_dict().items()):
        assert torch.equal(x, y), name


def test_an_interrupted_run_resumes_to_the_same_weights(folder, tmp_path):
    straight = train(folder, tmp_path / "straight", tiny(epochs=2), progress=False)

    def crash_after_first_epoch(line: str) -> None:
        if line.startswith("epoch 1:"):  # logged once epoch 1's checkpoint is on disk
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(folder, tmp_path / "resumed", tiny(epochs=2), progress=False, log=crash_after_first_epoch)
    assert not (tmp_path / "resumed" / "model.safetensors").exists()
    lines = []
    resumed = train(folder, tmp_path / "resumed", tiny(epochs=2), progress=False, resume=True, log=lines.append)
    assert any("resumed from epoch 1" in line for line in lines)
    history = json.loads((tmp_path / "resumed" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    for (name, x), (_, y) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(x, y), name


def test_resume_from_a_checkpoint_skips_finished_epochs(folder, tmp_path):
    train(folder, tmp_path / "run", tiny(epochs=2), progress=False)
    lines = []
    train(folder, tmp_path / "run", tiny(epochs=3), progress=False, resume=True, log=lines.append)
    assert any("resumed from epoch 2" in line for line in lines)
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]


def test_init_starts_from_another_encoders_weights(folder, tmp_path):
    from siamesedb.errors import InvalidInputError

    first = train(folder, tmp_path / "first", tiny(epochs=1, seed=1), progress=False)
    lines = []
    # With a learning rate of zero nothing moves: the weights that come out are the ones that went in.
    tuned = train(folder, tmp_path / "tuned", tiny(epochs=1, lr=0.0, init=str(tmp_path / "first")), progress=False,
                  log=lines.append)
    assert any("starting from the weights of" in line for line in lines)
    # The same seed with a learning rate of zero: the initial weights `first` started from (a seed-0 run would
    # differ from `first` even with no optimiser step at all).
    fresh = train(folder, tmp_path / "fresh", tiny(epochs=1, seed=1, lr=0.0), progress=False)
    for (name, x), (_, y), (_, z) in zip(first.net.named_parameters(), tuned.net.named_parameters(),
                                         fresh.net.named_parameters()):
        assert torch.equal(x, y), name
    assert not all(torch.equal(x, z) for (_, x), (_, z) in zip(first.net.named_parameters(), fresh.net.named_parameters()))
    with pytest.raises(InvalidInputError, match="--init"):
        train(folder, tmp_path / "wider", tiny(epochs=1, width=16, init=str(tmp_path / "first")), progress=False)


def test_augmentation_keeps_shapes_and_is_the_identity_at_zero_strength():
    g = torch.Generator().manual_seed(0)
    batch = torch.rand(5, 1, 16, 16)
    out = augment(batch, g, strength=1.0)
    assert out.shape == batch.shape and not torch.equal(out, batch)
    same = augment(batch, torch.Generator().manual_seed(0), strength=0.0)
    assert torch.allclose(same, batch, atol=1e-5)
    assert augment(torch.rand(2, 3, 12, 20), g).shape == (2, 3, 12, 20)


def test_raw_embeddings_option_trains(folder, tmp_path):
    encoder = train(folder, tmp_path / "raw", tiny("proto", normalize_train=False, proto_scale=1.0), progress=False)
    vectors = encoder.encode_tensors(torch.rand(3, 1, 16, 16))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)  # search vectors are normalised regardless


def test_rotated_copies_add_training_classes(folder, tmp_path):
    lines = []
    train(folder, tmp_path / "rot", tiny("proto", rotate_classes=True), progress=False, log=lines.append)
    assert (tmp_path / "rot" / "model.safetensors").exists()
    # 6 classes, 2 held out (val_fraction 0.34): 4 training classes x 4 rotations, 6 images each
    assert "rotated copies: 16 training classes, 96 images" in lines
    with pytest.raises(Exception, match="square"):
        TrainConfig(rotate_classes=True, image_size=16, image_width=32)


def test_mirrored_copies_add_training_classes(folder, tmp_path):
    lines = []
    train(folder, tmp_path / "mir", tiny("proto", mirror_classes=True), progress=False, log=lines.append)
    assert "mirrored copies: 8 training classes, 48 images" in lines
    lines.clear()
    train(folder, tmp_path / "dih", tiny("proto", rotate_classes=True, mirror_classes=True), progress=False,
          log=lines.append)
    # the eight symmetries of the square: 4 training classes x 4 rotations x 2 mirror images
    assert "mirrored copies: 32 training classes, 192 images" in lines


def test_bad_config_is_refused():
    from siamesedb.errors import InvalidInputError

    with pytest.raises(InvalidInputError, match="loss"):
        TrainConfig(loss="magic")
    with pytest.raises(InvalidInputError):
        TrainConfig(epochs=0)
    with pytest.raises(InvalidInputError, match="augment_strength"):
        TrainConfig(augment_strength=-1)


def test_augment_strength_reaches_the_distortions(folder, tmp_path):
    def losses(name, **overrides):
        train(folder, tmp_path / name, tiny("proto", **overrides), progress=False)
        return [h["loss"] for h in json.loads((tmp_path / name / "history.json").read_text())]

    plain = losses("plain", augment=False)
    # strength 0 is the identity warp: the same training as no augmentation, up to interpolation rounding
    assert np.allclose(losses("zero", augment_strength=0.0), plain, atol=1e-4)
    assert not np.allclose(losses("one"), losses("two", augment_strength=2.0), atol=1e-4)


def test_within_group_episodes_train_with_groups_smaller_than_the_way(folder, tmp_path):
    import shutil

    grouped = tmp_path / "grouped"
    for c in range(6):  # alphabets A (classes 0-2) and B (3-5), as Omniglot's Alphabet/character folders
        shutil.copytree(folder / f"class{c}", grouped / ("A" if c < 3 else "B") / f"class{c}")
    # way 3, but after holding out 2 classes a group may keep only 2: those episodes are 2-way
    config = tiny("proto", within_group=1.0)
    encoder = train(grouped, tmp_path / "wg", config, progress=False)
    plain = train(grouped, tmp_path / "plain", tiny("proto"), progress=False)
    assert json.loads((tmp_path / "wg" / "train_config.json").read_text())["within_group"] == 1.0
    assert encoder.fingerprint != plain.fingerprint  # other episodes were drawn
    with pytest.raises(Exception, match="within_group"):
        TrainConfig(within_group=2.0)


def test_within_class_whitening_matches_an_explicit_computation():
    from siamesedb.training import within_class_whitening

    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 5)) * np.array([3.0, 1.0, 0.5, 0.2, 0.1])
    labels = np.repeat(["a", "b", "c", "d", "e", "f"], 5).tolist()
    labels[-1] = "lonely"  # a class of one item carries no spread and is skipped
    matrix = within_class_whitening(vectors, labels, ridge=0.05)
    covariances = []
    for name in sorted(set(labels)):
        rows = vectors[[i for i, lab in enumerate(labels) if lab == name]]
        if len(rows) >= 2:
            covariances.append(np.cov(rows, rowvar=False, bias=True))
    within = np.mean(covariances, axis=0)
    regularised = within + 0.05 * np.trace(within) / 5 * np.eye(5)
    assert np.allclose(matrix, matrix.T)
    assert np.allclose(matrix @ regularised @ matrix, np.eye(5), atol=1e-8)  # it whitens the regularised scatter
    with pytest.raises(Exception, match="two or more"):
        within_class_whitening(vectors[:3], ["x", "y", "z"])


def test_a_whitened_encoder_applies_its_map_and_survives_save_and_load(tmp_path):
    from siamesedb.encoder import EncoderConfig
    from siamesedb.training import whitened_encoder, within_class_whitening

    torch.manual_seed(0)
    base = Encoder(EncoderConfig(embedding_dim=8, width=8))
    batch = torch.rand(12, 1, 28, 28)
    vectors = base.encode_tensors(batch)
    labels = np.repeat(["a", "b", "c"], 4).tolist()
    whitened = whitened_encoder(base, vectors, labels, ridge=0.1, notes={"groups": "test"})
    mapped = vectors @ within_class_whitening(vectors, labels, ridge=0.1)
    expected = mapped / np.linalg.norm(mapped, axis=1, keepdims=True)
    assert np.allclose(whitened.encode_tensors(batch), expected, atol=1e-5)
    whitened.save(tmp_path / "w")
    again = Encoder.load(tmp_path / "w")
    assert again.config.whitening and again.config.notes["whitening"]["groups"] == "test"
    assert again.fingerprint == whitened.fingerprint
    assert np.allclose(again.encode_tensors(batch), expected, atol=1e-5)
    with pytest.raises(Exception, match="already whitened"):
        whitened_encoder(again, vectors, labels)
