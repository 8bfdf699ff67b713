"""bfloat16 CPU encoding (EncoderConfig.precision): vectors within a tight cosine of float32's, recorded in the
fingerprint, float32 encoders' fingerprints unchanged."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from siamesedb.encoder import Encoder, EncoderConfig
from siamesedb.errors import EncoderError


def with_precision(encoder: Encoder, precision: str) -> Encoder:
    config = EncoderConfig.from_dict({**encoder.config.to_dict(), "precision": precision})
    return Encoder(config, net=copy.deepcopy(encoder.net), device="cpu")


def test_bfloat16_vectors_match_float32_within_tolerance():
    """The shipped default (five views) on strokes-like inputs: bf16 autocast changes vectors only slightly."""
    fp32 = Encoder.load("default")
    bf16 = with_precision(fp32, "bfloat16")
    generator = torch.Generator().manual_seed(0)
    batch = (torch.rand(96, 1, 28, 28, generator=generator) > 0.85).float()  # sparse bright strokes on black
    a, b = fp32.encode_tensors(batch), bf16.encode_tensors(batch)
    assert a.dtype == b.dtype == np.float32 and a.shape == b.shape
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(a * b, axis=1)
    assert cosine.min() >= 0.999, cosine.min()  # measured 0.99997 mean on Omniglot (BENCHMARKS.md)
    assert not np.array_equal(a, b)  # it did run in bfloat16


def test_precision_is_in_the_fingerprint_only_when_set(tmp_path):
    fp32 = Encoder.load("default")
    assert "precision" not in fp32.config.to_dict()  # float32 encoders keep the fingerprints they always had
    bf16 = with_precision(fp32, "bfloat16")
    assert bf16.fingerprint != fp32.fingerprint
    bf16.save(tmp_path / "enc")
    assert json.loads((tmp_path / "enc" / "config.json").read_text())["precision"] == "bfloat16"
    loaded = Encoder.load(tmp_path / "enc")
    assert loaded.config.precision == "bfloat16" and loaded.fingerprint == bf16.fingerprint


def test_unknown_precision_is_refused():
    with pytest.raises(EncoderError, match="precision"):
        EncoderConfig(precision="float8")
