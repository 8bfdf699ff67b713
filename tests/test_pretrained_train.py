"""Fine-tuning hf: backbones (siamesedb/pretrained_train.py): bf16, --init, --resume, memory, augmentation, Euclidean
heads; tiny local models with random weights, never the network (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from siamesedb import pretrained_train  # noqa: E402
from siamesedb.encoder import Encoder, cpu_has_native_bf16  # noqa: E402
from siamesedb.errors import InvalidInputError  # noqa: E402
from siamesedb.pretrained_train import augment_pixels, train_pretrained  # noqa: E402
from siamesedb.training import TrainConfig, use_bf16  # noqa: E402
from tests.helpers import run_cli  # noqa: E402
from tests.test_pretrained import _dinov2, _photo_folder, _resnet  # noqa: E402


def _config(source, **overrides) -> TrainConfig:
    settings = dict(backbone=f"hf:{source}", loss="contrastive", epochs=2, steps_per_epoch=3, batch_size=8,
                    val_fraction=0.3, workers=0, lr=1e-2, precision="fp32", final_episodes=50, val_episodes=20)
    return TrainConfig(**{**settings, **overrides})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return _dinov2(root / "model"), _photo_folder(root / "photos", per_class=5)  # 2 per class held out


def _head(encoder: Encoder) -> torch.Tensor:
    return encoder.net.head.weight.detach().clone()


def test_bf16_training_is_recorded_and_agrees_with_fp32(setup, tmp_path):
    source, photos = setup
    lines: list[str] = []
    bf16 = train_pretrained(photos, tmp_path / "bf16", _config(source, precision="bf16", val_fraction=0.0),
                            log=lines.append)
    fp32 = train_pretrained(photos, tmp_path / "fp32", _config(source, val_fraction=0.0))  # last epochs kept
    assert bf16.config.notes["precision"] == "bf16" and fp32.config.notes["precision"] == "fp32"
    assert any("bfloat16 autocast" in line for line in lines)
    assert not torch.equal(_head(bf16), _head(fp32))  # the features were cached under autocast
    assert torch.allclose(_head(bf16), _head(fp32), atol=0.05)
    assert bf16.config.precision == "float32"  # the saved encoder computes in float32 either way


def test_auto_precision_for_hf_backbones_follows_the_cpu():
    # measured faster on this CPU for the backbone's forward passes (BENCHMARKS.md, tools/bench_pretrained_train.py)
    assert use_bf16("auto", torch.device("cpu"), "hf:any") == cpu_has_native_bf16()
    assert not use_bf16("fp32", torch.device("cpu"), "hf:any")


def test_init_starts_from_a_saved_hf_encoders_head(setup, tmp_path):
    source, photos = setup
    first = train_pretrained(photos, tmp_path / "first", _config(source, val_fraction=0.0))
    assert not torch.equal(_head(first), torch.eye(32))
    result = run_cli("train", photos, "--out", tmp_path / "second", "--backbone", f"hf:{source}", "--init",
                     tmp_path / "first", "--epochs", 1, "--steps-per-epoch", 2, "--lr", 0, "--batch-size", 8,
                     "--loss", "contrastive", "--precision", "fp32")
    assert result.exit_code == 0, result.output
    assert "starting from the head of" in result.output
    second = Encoder.load(tmp_path / "second")
    assert torch.equal(_head(second), _head(first))  # learning rate 0: the --init head as it was
    assert second.config.pretrained["init"]["fingerprint"] == first.fingerprint
    assert second.fingerprint != first.fingerprint


def test_init_refuses_other_weights_heads_and_backbones(setup, tmp_path):
    source, photos = setup
    other = _dinov2(tmp_path / "other", seed=7)
    train_pretrained(photos, tmp_path / "zero", _config(source, epochs=0))
    train_pretrained(photos, tmp_path / "head", _config(source, epochs=1))
    with pytest.raises(InvalidInputError, match="built on other pretrained weights"):
        train_pretrained(photos, tmp_path / "x", _config(other, init=str(tmp_path / "head")))
    with pytest.raises(InvalidInputError, match=r"its head \(none: --epochs 0"):
        train_pretrained(photos, tmp_path / "x", _config(source, init=str(tmp_path / "zero")))
    with pytest.raises(InvalidInputError, match="a conv4 encoder cannot seed an hf: run"):
        train_pretrained(photos, tmp_path / "x", _config(source, init="default"))
    with pytest.raises(InvalidInputError, match="--epochs 0 trains nothing"):
        train_pretrained(photos, tmp_path / "x", _config(source, epochs=0, init=str(tmp_path / "head")))


def test_resume_continues_an_interrupted_run_exactly(setup, tmp_path, monkeypatch):
    source, photos = setup
    config = _config(source, epochs=3, val_fraction=0.0)  # no validation: the last epoch's head is kept
    whole = train_pretrained(photos, tmp_path / "whole", config)
    real, calls = pretrained_train.save_checkpoint, []

    def interrupted(*args, **kwargs):
        real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt  # killed after epoch 1's checkpoint

    monkeypatch.setattr(pretrained_train, "save_checkpoint", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_pretrained(photos, tmp_path / "cut", config)
    lines: list[str] = []
    resumed = train_pretrained(photos, tmp_path / "cut", config, log=lines.append, resume=True)
    assert any("resumed from epoch 1" in line for line in lines)
    assert torch.allclose(_head(resumed), _head(whole), atol=1e-6)
    assert not torch.allclose(_head(whole), torch.eye(32), atol=1e-3)
    history = json.loads((tmp_path / "cut" / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2, 3]
    assert resumed.config.notes["best_epoch"] == whole.config.notes["best_epoch"]
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "cut" / "checkpoint" / "trainer.safetensors"))
    assert not any(name.startswith(("now.model.", "best.model.")) for name in saved)  # the frozen backbone: not copied


def test_resume_refuses_another_runs_checkpoint(setup, tmp_path):
    source, photos = setup
    train_pretrained(photos, tmp_path / "run", _config(source, epochs=1))
    with pytest.raises(InvalidInputError, match="--resume: .* not this run"):
        train_pretrained(photos, tmp_path / "run", _config(source, epochs=1, unfreeze=1), resume=True)
    state = tmp_path / "run" / "checkpoint" / "state.json"
    record = json.loads(state.read_text())
    record.pop("pretrained")
    state.write_text(json.dumps(record))
    with pytest.raises(InvalidInputError, match="a run of a non-hf: backbone"):
        train_pretrained(photos, tmp_path / "run", _config(source, epochs=1), resume=True)


def test_frozen_path_keeps_features_not_training_pixels(setup):
    source, photos = setup
    config = _config(source)
    encoder = Encoder.from_pretrained(str(source), head=True)
    data, pool = pretrained_train._load(photos, config, encoder, lambda line: None, False, features=True)
    assert data.x_train.dim() == 1 and len(data.x_train) == len(data.y_train)  # positions, no pixels
    assert pool.features.shape == (len(data.y_train), encoder.net.feature_dim)
    assert data.x_val.shape[1:] == (3, 32, 32) and len(data.x_val) == len(data.y_val) > 0
    # the cached features are the backbone's, image by image
    with torch.inference_mode():
        expect = encoder.net.features(pool.pixels(np.arange(3)))
    assert torch.allclose(pool.features[:3], expect, atol=1e-5)


def test_unfrozen_path_decodes_each_batch_from_its_files(setup):
    source, photos = setup
    encoder = Encoder.from_pretrained(str(source), head=True)
    data, pool = pretrained_train._load(photos, _config(source, unfreeze=1), encoder, lambda line: None, False,
                                        features=False)
    assert pool.features is None and len(pool.paths) == len(data.y_train)
    batch = pool.pixels(np.array([4, 0]))
    expect = torch.stack([encoder.preprocess(pool.paths[4]), encoder.preprocess(pool.paths[0])])
    assert torch.equal(batch, expect)


def test_augmentation_of_processor_pixels(setup):
    source, _ = setup
    processor = Encoder.from_pretrained(str(source)).config.preprocessing.processor
    mean = torch.tensor(processor["image_mean"]).view(1, 3, 1, 1)
    std = torch.tensor(processor["image_std"]).view(1, 3, 1, 1)
    pixels = (torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(0)) - mean) / std
    off = _config(source, augment=False, flip=False, color_jitter=0.0)
    assert torch.equal(augment_pixels(pixels, torch.Generator().manual_seed(1), off, processor), pixels)
    flipped = augment_pixels(pixels, torch.Generator().manual_seed(1), _config(source, augment=False, flip=True),
                             processor)
    same = [torch.equal(a, b) for a, b in zip(flipped, pixels)]
    mirrored = [torch.equal(a, torch.flip(b, dims=(2,))) for a, b in zip(flipped, pixels)]
    assert all(s or m for s, m in zip(same, mirrored)) and any(mirrored) and any(same)
    jittered = augment_pixels(pixels, torch.Generator().manual_seed(1),
                              _config(source, augment=False, color_jitter=0.5), processor)
    in_unit = jittered * std + mean  # jitter works on [0, 1] pixels, clamped there, then normalised again
    assert not torch.allclose(jittered, pixels) and in_unit.min() >= -1e-5 and in_unit.max() <= 1 + 1e-5


def test_unfrozen_fine_tuning_with_augmentation_keeps_batch_norm_statistics(tmp_path):
    source = _resnet(tmp_path / "resnet")
    photos = _photo_folder(tmp_path / "photos")
    lines: list[str] = []
    config = _config(source, unfreeze=1, flip=True, color_jitter=0.2, time_budget=3.0, epochs=2)
    encoder = train_pretrained(photos, tmp_path / "out", config, log=lines.append)
    assert any("augmentation: flips, colour jitter 0.2, affine strength 1" in line for line in lines), lines
    original = transformers.ResNetModel.from_pretrained(source).state_dict()
    tuned = encoder.net.model.state_dict()
    changed = {name for name, value in original.items() if not torch.equal(value, tuned[name])}
    # the frozen first stage and the stem, buffers (batch-norm running statistics) included, are as loaded
    assert changed and not any(name.startswith(("embedder.", "encoder.stages.0.")) for name in changed), changed
    assert not encoder.net.training


def test_euclidean_head_is_searched_by_l2(setup, tmp_path):
    source, photos = setup
    encoder = train_pretrained(photos, tmp_path / "enc", _config(source, metric="euclidean", margin=2.0))
    saved = Encoder.load(tmp_path / "enc")
    assert saved.config.metric == "euclidean" and saved.fingerprint == encoder.fingerprint
    norms = np.linalg.norm(saved.encode([next(photos.rglob("*.png"))]), axis=1)
    assert abs(norms[0] - 1.0) > 1e-3  # raw head output, not unit vectors
    assert run_cli("build", photos, "--index", tmp_path / "index", "--encoder", tmp_path / "enc").exit_code == 0
    info = json.loads(run_cli("info", "--index", tmp_path / "index", "--json").output)
    assert info["metric"] == "l2"  # the manifest's name for Euclidean search
    with pytest.raises(InvalidInputError, match="--epochs 0 trains nothing"):
        train_pretrained(photos, tmp_path / "x", _config(source, epochs=0, metric="euclidean"))


def test_the_fingerprint_covers_the_recorded_transformers_version(setup, tmp_path):
    source, _ = setup
    encoder = Encoder.from_pretrained(str(source))
    assert encoder.config.pretrained["model_config"]["transformers_version"] == transformers.__version__
    encoder.save(tmp_path / "enc")
    again = Encoder.load(tmp_path / "enc")
    assert again.fingerprint == encoder.fingerprint  # reopening under any transformers keeps what was recorded
    again.config.pretrained["model_config"]["transformers_version"] = "0.0.1"
    again._fingerprint = None
    assert again.fingerprint != encoder.fingerprint


def test_train_cli_resumes_an_hf_run(setup, tmp_path):
    source, photos = setup
    args = ("train", photos, "--out", tmp_path / "out", "--backbone", f"hf:{source}", "--epochs", 2,
            "--steps-per-epoch", 2, "--batch-size", 8, "--loss", "contrastive", "--precision", "fp32")
    assert run_cli(*args).exit_code == 0
    again = run_cli(*args, "--resume")
    assert again.exit_code == 0, again.output
    assert "resumed from epoch 2" in again.output
