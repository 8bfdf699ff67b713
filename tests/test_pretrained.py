"""Pretrained Hugging Face backbones (`hf:HUB_ID_OR_DIR`, siamesedb/pretrained.py), on tiny models with random
weights made here and saved with save_pretrained: never the network (HF_HUB_OFFLINE=1)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")
from PIL import Image  # noqa: E402

from siamesedb.encoder import Encoder  # noqa: E402
from siamesedb.errors import EncoderError  # noqa: E402
from tests.helpers import run_cli  # noqa: E402

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8)


def _dinov2(folder: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    transformers.Dinov2Model(transformers.Dinov2Config(**TINY)).save_pretrained(folder)
    transformers.BitImageProcessor(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32},
                                   do_center_crop=True).save_pretrained(folder)
    return folder


def _clip_vision(folder: Path) -> Path:
    torch.manual_seed(1)
    config = transformers.CLIPVisionConfig(**TINY, projection_dim=16)
    transformers.CLIPVisionModelWithProjection(config).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _clip_dual(folder: Path) -> Path:
    torch.manual_seed(2)
    text = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=99)
    config = transformers.CLIPConfig(text_config=text, vision_config=TINY, projection_dim=16)
    transformers.CLIPModel(config).save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _vit(folder: Path) -> Path:
    torch.manual_seed(3)
    transformers.ViTModel(transformers.ViTConfig(**TINY)).save_pretrained(folder)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _resnet(folder: Path) -> Path:
    torch.manual_seed(4)
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], layer_type="basic")
    transformers.ResNetModel(config).save_pretrained(folder)
    transformers.ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(folder)
    return folder


def _images() -> list:
    rng = np.random.RandomState(0)
    colour = [Image.fromarray(rng.randint(0, 255, (50 + 7 * i, 70, 3), dtype=np.uint8)) for i in range(3)]
    grey = Image.fromarray(rng.randint(0, 255, (40, 40), dtype=np.uint8))
    palette = colour[0].convert("P")
    return colour + [grey, palette]


def _by_hand(folder: Path, images: list, model_class: str, pooled: str) -> np.ndarray:
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    model = getattr(transformers, model_class).from_pretrained(folder).eval()
    with torch.no_grad():
        pixels = processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        if pooled == "image_features":
            out = model.get_image_features(pixel_values=pixels)
            out = out if isinstance(out, torch.Tensor) else out.pooler_output
        else:
            out = getattr(model(pixel_values=pixels), pooled)
    return torch.nn.functional.normalize(out.flatten(1), dim=1).numpy()  # ResNet pools to (N, C, 1, 1)


@pytest.mark.parametrize("make, model_class, pooled", [
    (_dinov2, "Dinov2Model", "pooler_output"),
    (_clip_vision, "CLIPVisionModelWithProjection", "image_embeds"),
    (_clip_dual, "CLIPModel", "image_features"),  # kept as its vision tower with projection: the same embedding
    (_vit, "ViTModel", "pooler_output"),
    (_resnet, "ResNetModel", "pooler_output"),
])
def test_the_pretrained_embedding_equals_the_model_run_by_hand(tmp_path, make, model_class, pooled):
    folder = make(tmp_path / "model")
    encoder = Encoder.from_pretrained(str(folder))
    images = _images()
    vectors = encoder.encode(images)
    assert encoder.config.pretrained["pooling"] == ("image_embeds" if model_class == "CLIPModel" else pooled)
    if model_class == "CLIPModel":  # the text tower is left out
        assert encoder.config.pretrained["model_class"] == "CLIPVisionModelWithProjection"
        assert encoder.parameters < getattr(transformers, model_class).from_pretrained(folder).num_parameters()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = (vectors * _by_hand(folder, images, model_class, pooled)).sum(axis=1)
    assert cosines.min() >= 0.999, cosines


def test_two_checkpoints_give_different_vectors_and_fingerprints(tmp_path):
    a = Encoder.from_pretrained(str(_dinov2(tmp_path / "a", seed=0)))
    b = Encoder.from_pretrained(str(_dinov2(tmp_path / "b", seed=5)))
    images = _images()[:3]
    assert (a.encode(images) * b.encode(images)).sum(axis=1).max() < 0.99
    assert a.fingerprint != b.fingerprint
    assert a.config.pretrained["sha256"] != b.config.pretrained["sha256"]


@pytest.mark.parametrize("make", [_dinov2, _clip_dual])
def test_the_encoder_is_self_contained_and_reopens_without_its_source(tmp_path, make):
    source = make(tmp_path / "model")
    encoder = Encoder.from_pretrained(f"hf:{source}")
    images = _images()
    before = encoder.encode(images)
    encoder.save(tmp_path / "enc")
    shutil.rmtree(source)  # neither the model folder nor any hub is needed from here on
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert config["backbone"] == f"hf:{source}"
    assert config["pretrained"]["source"] == str(source.resolve())
    assert len(config["pretrained"]["sha256"]) == 64 and config["pretrained"]["parameters"] > 0
    assert config["preprocessing"]["processor"]["image_processor_type"].endswith(("ImageProcessor", "ImageProcessorPil"))
    again = Encoder.load(tmp_path / "enc")
    assert again.fingerprint == encoder.fingerprint
    assert np.allclose(again.encode(images), before, atol=1e-6)
    with torch.no_grad():  # the fingerprint covers the backbone's weights
        next(again.net.model.parameters()).add_(0.01)
    again._fingerprint = None
    assert again.fingerprint != encoder.fingerprint


def test_the_shipped_encoders_keep_their_fingerprints():
    assert Encoder.load("default").fingerprint == "8bbd3064e906683e"


def _photo_folder(root: Path, classes: int = 10, per_class: int = 3) -> Path:
    rng = np.random.RandomState(1)
    for c in range(classes):
        base = rng.randint(0, 255, 3)
        (root / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.clip(base + rng.randint(-30, 30, (36, 44, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / f"class{c}" / f"{i}.png")
    return root


def test_train_epochs_0_then_build_query_classify_verify_info_offline(tmp_path):
    source = _dinov2(tmp_path / "model")
    photos = _photo_folder(tmp_path / "photos")
    out = tmp_path / "enc"
    result = run_cli("train", photos, "--out", out, "--backbone", f"hf:{source}", "--epochs", 0, "--quiet")
    assert result.exit_code == 0, result.output
    shutil.rmtree(source)
    encoder = Encoder.load(out)
    assert encoder.config.pair_threshold is not None  # measured on the held-out classes' pairs
    assert encoder.config.notes["epochs_run"] == 0
    index = tmp_path / "index"
    assert run_cli("build", photos, "--index", index, "--encoder", out).exit_code == 0
    query = photos / "class1" / "0.png"
    hits = json.loads(run_cli("query", query, "--index", index, "-k", 3, "--json").output)
    assert hits[0]["hits"][0]["label"] == "class1" and hits[0]["hits"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    label = json.loads(run_cli("classify", query, "--index", index, "--json").output)[0]["label"]
    assert label in {f"class{c}" for c in range(10)}
    verdict = json.loads(run_cli("verify", query, "--index", index, "--label", "class1", "--json").output)
    assert verdict["label"] == "class1" and verdict["threshold"] is not None
    pair = json.loads(run_cli("verify", query, photos / "class1" / "1.png", "--encoder", out, "--json").output)
    # 3 images a class: none held out, and --epochs 0 trained nothing, so no "training pairs run high" caveat
    assert pair["accepted"] and pair["threshold_source"] == "encoder (folder pairs, nothing trained)"
    info = json.loads(run_cli("info", "--index", index, "--json").output)
    assert info["encoder"]["parameters"] == encoder.parameters > 0
    assert info["encoder"]["backbone"] == f"hf:{source}"
    assert "parameters" in run_cli("info", "--index", index).output


def _error(*args) -> str:
    result = run_cli(*args)
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.output, result.output
    return lines[0]


def test_errors_are_one_line(tmp_path, monkeypatch):
    photos = _photo_folder(tmp_path / "photos", classes=2, per_class=2)
    train = ("train", photos, "--out", tmp_path / "out", "--epochs", 0, "--quiet", "--backbone")
    assert "not in the local cache" in _error(*train, "hf:nobody/no-such-model")
    assert "no such folder" in _error(*train, f"hf:{tmp_path / 'absent'}")
    (tmp_path / "empty").mkdir()
    assert "holds no model" in _error(*train, f"hf:{tmp_path / 'empty'}")
    bert = tmp_path / "bert"
    transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64, vocab_size=99)).save_pretrained(bert)
    assert "not a vision model" in _error(*train, f"hf:{bert}")
    model = _dinov2(tmp_path / "model")
    assert "--unfreeze 5" in _error(*train[:4], "--epochs", 1, "--quiet", "--backbone", f"hf:{model}", "--unfreeze", 5)
    assert "--epochs 0 trains nothing" in _error(*train, f"hf:{model}", "--unfreeze", 1)
    assert "hf: backbones" in _error(*train[:4], "--epochs", 1, "--quiet", "--backbone", "conv4", "--unfreeze", 1)
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(EncoderError, match=r"pip install siamesedb\[pretrained\]"):
        Encoder.from_pretrained(str(model))


def test_importing_siamesedb_does_not_import_transformers():
    code = ("import sys, siamesedb, siamesedb.cli, siamesedb.encoder, siamesedb.db, siamesedb.training; "
            "from siamesedb.encoder import Encoder; Encoder.load('default'); "
            "assert 'transformers' not in sys.modules, 'transformers imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def _fine_tuned(tmp_path, unfreeze: int):
    from siamesedb.pretrained_train import train_pretrained
    from siamesedb.training import TrainConfig

    source = _dinov2(tmp_path / "model")
    photos = _photo_folder(tmp_path / "photos")
    config = TrainConfig(backbone=f"hf:{source}", loss="contrastive", epochs=2, steps_per_epoch=4, batch_size=8,
                         val_fraction=0.0, unfreeze=unfreeze, workers=0, lr=1e-2)
    encoder = train_pretrained(photos, tmp_path / "out", config)
    original = transformers.Dinov2Model.from_pretrained(source).state_dict()
    tuned = encoder.net.model.state_dict()
    changed = {name for name, value in original.items() if not torch.equal(value, tuned[name])}
    return encoder, changed, Encoder.load(tmp_path / "out")


def test_fine_tuning_trains_a_head_on_the_frozen_backbone(tmp_path):
    encoder, changed, saved = _fine_tuned(tmp_path, unfreeze=0)
    assert changed == set()  # every backbone weight as it was loaded
    head = encoder.net.head.weight.detach()
    assert head.shape == (32, 32) and not torch.allclose(head, torch.eye(32))  # identity start, then trained
    assert saved.fingerprint == encoder.fingerprint and saved.config.pretrained["trained"] == "head"
    assert saved.config.notes["epochs_run"] == 2


def test_unfreeze_trains_the_last_blocks_only(tmp_path):
    _, changed, saved = _fine_tuned(tmp_path, unfreeze=1)
    assert changed and all(not name.startswith(("embeddings.", "encoder.layer.0.")) for name in changed), changed
    assert any(name.startswith("encoder.layer.1.") for name in changed)
    assert saved.config.pretrained["trained"] == "head + last 1 blocks"


def test_train_cli_fine_tunes_within_a_time_budget_with_validation(tmp_path):
    source = _dinov2(tmp_path / "model")
    photos = _photo_folder(tmp_path / "photos")
    result = run_cli("train", photos, "--out", tmp_path / "out", "--backbone", f"hf:{source}", "--time-budget", "4s",
                     "--val-fraction", 0.3, "--loss", "triplet", "--batch-size", 8)
    assert result.exit_code == 0, result.output
    assert "cached the frozen backbone's features" in result.output and "time budget" in result.output
    encoder = Encoder.load(tmp_path / "out")
    assert encoder.config.notes["best_epoch"] is not None and encoder.config.pair_threshold is not None
