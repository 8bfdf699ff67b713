"""Encoder: shapes, normalisation, one-in-one-out, safetensors round trip, fingerprint, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from siamesedb.data import Preprocessing
from siamesedb.encoder import BACKBONES, DEFAULT_ENCODER, Encoder, EncoderConfig, resolve_device
from siamesedb.errors import EncoderError, ImageLoadError


def config(backbone="conv4", size=28, channels=1, dim=16):
    return EncoderConfig(backbone=backbone, embedding_dim=dim, width=8,
                         preprocessing=Preprocessing(size=(size, size), channels=channels))


def images(n=3):
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)) for _ in range(n)]


@pytest.mark.parametrize("backbone, size, channels",
                         [("conv4", 28, 1), ("conv4", 64, 1), ("conv4map", 28, 1), ("resnet", 32, 3), ("signet", 48, 1)])
def test_backbones_map_images_to_unit_vectors(backbone, size, channels):
    torch.manual_seed(0)
    encoder = Encoder(config(backbone, size, channels))
    vectors = encoder.encode(images())
    assert vectors.shape == (3, 16) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_one_in_one_out_list_in_list_out():
    torch.manual_seed(0)
    encoder = Encoder(config())
    ims = images(2)
    single = encoder.encode(ims[0])
    assert single.shape == (16,)
    assert np.allclose(encoder.encode(ims)[0], single, atol=1e-6)
    assert encoder.encode(tuple(ims)).shape == (2, 16)
    assert encoder.encode([]).shape == (0, 16)


def test_paths_arrays_and_pil_give_the_same_vector(tmp_path):
    torch.manual_seed(0)
    encoder = Encoder(config())
    image = images(1)[0]
    image.save(tmp_path / "x.png")
    from_path = encoder.encode(tmp_path / "x.png")
    assert np.allclose(from_path, encoder.encode(image), atol=1e-6)
    assert np.allclose(from_path, encoder.encode(np.asarray(image)), atol=1e-6)
    (tmp_path / "bad.png").write_bytes(b"nope")
    with pytest.raises(ImageLoadError, match="bad.png"):
        encoder.encode([tmp_path / "x.png", tmp_path / "bad.png"])


def test_save_load_round_trip_is_identical(tmp_path):
    torch.manual_seed(0)
    encoder = Encoder(config("resnet", 32, 3))
    encoder.save(tmp_path / "enc")
    assert sorted(p.name for p in (tmp_path / "enc").iterdir()) == ["config.json", "model.safetensors"]
    again = Encoder.load(tmp_path / "enc")
    assert again.fingerprint == encoder.fingerprint and len(encoder.fingerprint) == 16
    assert np.array_equal(again.encode(images()), encoder.encode(images()))
    assert again.config.to_dict() == encoder.config.to_dict()


def test_fingerprint_changes_with_weights_or_config():
    torch.manual_seed(0)
    a = Encoder(config())
    torch.manual_seed(1)
    b = Encoder(config())
    assert a.fingerprint != b.fingerprint
    c = Encoder(config(dim=8))
    assert c.fingerprint != a.fingerprint


def test_broken_encoder_folders_are_clear_errors(tmp_path):
    torch.manual_seed(0)
    Encoder(config()).save(tmp_path / "enc")
    with pytest.raises(EncoderError, match="no such encoder"):
        Encoder.load(tmp_path / "missing")
    (tmp_path / "enc" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(EncoderError, match="model.safetensors"):
        Encoder.load(tmp_path / "enc")
    (tmp_path / "enc" / "config.json").write_text("{ broken")
    with pytest.raises(EncoderError, match="config.json"):
        Encoder.load(tmp_path / "enc")
    other = tmp_path / "other"
    Encoder(config()).save(other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["embedding_dim"] = 99
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EncoderError, match="do not fit"):
        Encoder.load(other)
    cfg["backbone"] = "vgg-zillion"
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EncoderError, match="unknown backbone"):
        Encoder.load(other)


def test_weights_are_never_pickled(tmp_path):
    torch.manual_seed(0)
    Encoder(config()).save(tmp_path / "enc")
    head = (tmp_path / "enc" / "model.safetensors").read_bytes()[:2]
    assert head != b"\x80\x02" and not (tmp_path / "enc" / "model.safetensors").read_bytes().startswith(b"PK")


def test_the_default_encoder_is_shipped_and_loads_offline():
    encoder = Encoder.load(DEFAULT_ENCODER)
    assert encoder.dimension == encoder.config.embedding_dim
    assert "pair_threshold" in encoder.config.notes  # calibrated at training time on held-out classes
    assert encoder.config.notes.get("trained_on", "").endswith("images_background")  # never the evaluation set


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(EncoderError, match="CUDA"):
            resolve_device("cuda")
    assert {"conv4", "conv4map", "resnet", "signet"} <= set(BACKBONES)


@pytest.mark.parametrize("backbone, size, channels", [("conv4", 28, 1), ("resnet", 32, 3)])
def test_cpu_lanes_give_the_one_thread_vectors(backbone, size, channels):
    """Encoding split across single-threaded lanes must give the vectors of one thread doing the whole batch."""
    torch.manual_seed(0)
    encoder = Encoder(config(backbone, size, channels))
    batch = torch.randn(100, channels, size, size)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = encoder.encode_tensors(batch, batch_size=64)
        assert encoder._cpu_lanes() is None
        torch.set_num_threads(3)  # three lanes, whatever this machine has: the split is what is tested
        laned = encoder.encode_tensors(batch, batch_size=64)
        assert encoder._cpu_lanes() is not None
        assert torch.get_num_threads() == 3  # the lanes' own one-thread setting did not leak into this thread
    finally:
        torch.set_num_threads(threads)
    assert laned.shape == (100, 16)
    np.testing.assert_allclose(laned, alone, rtol=0, atol=1e-6)


@pytest.mark.parametrize("backbone, size, channels",
                         [("conv4", 28, 1), ("conv4map", 28, 1), ("resnet", 32, 3), ("signet", 48, 1), ("mlp", 28, 1)])
def test_channels_last_encoding_gives_the_default_layouts_vectors(backbone, size, channels):
    """The CPU's NHWC copy of the net (Encoder._inference_net) is the same model: vectors agree to float rounding."""
    torch.manual_seed(0)
    encoder = Encoder(config(backbone, size, channels))
    batch = torch.randn(20, channels, size, size)
    encoder.channels_last = False
    nchw = encoder.encode_tensors(batch)
    encoder.channels_last = True
    nhwc = encoder.encode_tensors(batch)
    assert (encoder._inference_net() is encoder.net) == (backbone == "mlp")  # nothing to lay out in an MLP
    np.testing.assert_allclose(nhwc, nchw, rtol=0, atol=1e-5)


def test_the_channels_last_copy_follows_the_weights():
    """A training step or a load_state_dict changes the weights in place: the next encode must use the new ones,
    never a copy made before (validation between epochs encodes with the net being trained)."""
    torch.manual_seed(0)
    encoder = Encoder(config())
    batch = torch.randn(8, 1, 28, 28)
    before = encoder.encode_tensors(batch)
    optimizer = torch.optim.SGD(encoder.net.parameters(), lr=0.5)
    encoder.net.train()
    loss = encoder.embed(batch).sum() + encoder.embed(batch.flip(-1)).square().sum()
    loss.backward()
    optimizer.step()
    after = encoder.encode_tensors(batch)
    encoder.channels_last = False
    assert not np.allclose(after, before, atol=1e-3)
    np.testing.assert_allclose(after, encoder.encode_tensors(batch), rtol=0, atol=1e-5)
    encoder.channels_last = True
    with torch.no_grad():
        state = {k: torch.zeros_like(v) if k.endswith("running_mean") else v for k, v in encoder.net.state_dict().items()}
    encoder.net.load_state_dict(state)
    reloaded = encoder.encode_tensors(batch)
    encoder.channels_last = False
    np.testing.assert_allclose(reloaded, encoder.encode_tensors(batch), rtol=0, atol=1e-5)


def test_shifted_views_move_the_image_and_replicate_the_edge():
    from siamesedb.encoder import shifted_views

    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.float32).reshape(2, 1, 4, 5)
    views = shifted_views(x, 1).view(5, 2, 1, 4, 5)
    assert torch.equal(views[0], x)
    for k, (dy, dx) in enumerate([(0, 1), (0, -1), (1, 0), (-1, 0)], start=1):
        for r in range(4):
            for c in range(5):
                src_r, src_c = min(max(r - dy, 0), 3), min(max(c - dx, 0), 4)  # clamped: the edge repeats
                assert torch.equal(views[k][:, :, r, c], x[:, :, src_r, src_c])


def test_test_time_shift_is_the_mean_of_five_shifted_encodings(tmp_path):
    torch.manual_seed(0)
    plain = Encoder(config())
    tta = Encoder(EncoderConfig(**{**config().__dict__, "test_time_shift": 2}), net=plain.net)
    batch = torch.stack([plain.preprocess(im) for im in images(4)])
    by_hand = []
    for dy, dx in [(0, 0), (0, 2), (0, -2), (2, 0), (-2, 0)]:
        moved = torch.nn.functional.pad(batch, (2, 2, 2, 2), mode="replicate")[..., 2 - dy : 2 - dy + 28, 2 - dx : 2 - dx + 28]
        by_hand.append(plain.encode_tensors(moved))
    mean = np.mean(by_hand, axis=0)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    assert np.allclose(tta.encode_tensors(batch), expected, atol=1e-5)
    assert not np.allclose(tta.encode_tensors(batch), plain.encode_tensors(batch), atol=1e-3)
    # Saved and loaded with the setting; an encoder without it keeps the key out of its config (same fingerprint
    # as before the option existed), one with it has a fingerprint of its own.
    tta.save(tmp_path / "tta")
    assert json.loads((tmp_path / "tta" / "config.json").read_text())["test_time_shift"] == 2
    assert np.allclose(Encoder.load(tmp_path / "tta").encode_tensors(batch), expected, atol=1e-5)
    assert "test_time_shift" not in plain.config.to_dict() and tta.fingerprint != plain.fingerprint
    with pytest.raises(EncoderError, match="test_time_shift"):
        EncoderConfig(test_time_shift=-1)


def test_an_ensemble_scores_the_mean_of_its_members_cosines(tmp_path):
    from siamesedb.encoder import ensemble_of

    torch.manual_seed(0)
    members = [Encoder(config()) for _ in range(3)]
    combined = ensemble_of(members, name="trio")
    ims = images(4)
    vectors = combined.encode(ims)
    assert vectors.shape == (4, 48) and combined.dimension == 48
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    by_member = [m.encode(ims) for m in members]  # each (4, 16), unit rows
    mean_cosine = np.mean([v @ v.T for v in by_member], axis=0)
    assert np.allclose(vectors @ vectors.T, mean_cosine, atol=1e-5)
    # Saved and loaded as one encoder; the key is absent from single encoders' configs (old fingerprints hold).
    combined.save(tmp_path / "trio")
    again = Encoder.load(tmp_path / "trio")
    assert again.config.members == 3 and again.fingerprint == combined.fingerprint
    assert np.allclose(again.encode(ims), vectors, atol=1e-6)
    assert "members" not in members[0].config.to_dict()
    with pytest.raises(EncoderError, match="differ"):
        ensemble_of([members[0], Encoder(config(dim=8))])
    with pytest.raises(EncoderError, match="cannot be members"):
        ensemble_of([members[0], combined])
    with pytest.raises(EncoderError, match="at least two"):
        ensemble_of(members[:1])
