"""Euclidean-distance encoders and indexes (issue 19): every search path against brute force and FAISS's own L2
indexes, plain-mean prototypes, the MLP twin's save/load, metric mismatches refused, and the CLI flow end to end."""

from __future__ import annotations

import json
from pathlib import Path

import faiss
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from siamesedb import rules, scoring
from siamesedb.cli import cli
from siamesedb.data import Preprocessing
from siamesedb.db import SiameseDB
from siamesedb.encoder import MODELS_DIR, Encoder, EncoderConfig
from siamesedb.errors import EncoderError, EncoderMismatchError
from siamesedb.backends.faiss.index import VectorIndex
from siamesedb.losses import ContrastiveLoss, PrototypicalLoss
from siamesedb.backends.faiss.torch_search import TorchExactSearch


def raw_vectors(n: int, d: int = 8, seed: int = 0, scale: float = 3.0) -> np.ndarray:
    """Unnormalised vectors, as a Euclidean encoder makes them (norms far from 1)."""
    return (np.random.default_rng(seed).normal(size=(n, d)) * scale).astype(np.float32)


def loop_top_k(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The obvious way: np.linalg.norm to every corpus row, one query at a time, nearest first."""
    distances, rows = [], []
    for q in queries:
        d = np.array([np.linalg.norm(q.astype(np.float64) - c) for c in corpus])
        order = np.argsort(d, kind="stable")[:k]
        distances.append(d[order])
        rows.append(order)
    return np.array(distances), np.array(rows)


def test_flat_l2_search_equals_a_norm_loop():
    corpus, queries = raw_vectors(300), raw_vectors(9, seed=1)
    ids = np.arange(1000, 1300)
    index = VectorIndex.from_vectors(corpus, ids, factory="Flat", metric="l2")
    D, I = index.search(queries, 7)
    distances, rows = loop_top_k(queries, corpus, 7)
    assert np.array_equal(I, ids[rows])
    np.testing.assert_allclose(D, -distances, rtol=1e-5, atol=1e-5)  # score = minus the distance
    # The torch exact path and the numpy brute force agree with it.
    Dt, It = TorchExactSearch(corpus, ids, metric="l2", block_entries=512).search(queries, 7)
    assert np.array_equal(It, I)
    np.testing.assert_allclose(Dt, D, rtol=1e-5, atol=1e-5)
    Db, Ib = scoring.brute_force_search(queries, corpus, 7, metric="euclidean")
    assert np.array_equal(ids[Ib], I)
    np.testing.assert_allclose(Db, D, rtol=1e-5, atol=1e-5)
    # Fewer items than k: the answer is clamped to the 3 held (issue 29: memory bounded by the answer, not by k).
    D, I = VectorIndex.from_vectors(corpus[:3], ids[:3], metric="l2").search(queries[:1], 5)
    distances, rows = loop_top_k(queries[:1], corpus[:3], 3)
    assert I.shape == D.shape == (1, 3) and list(I[0]) == list(ids[rows[0]])
    np.testing.assert_allclose(D, -distances, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("factory", ["Flat", "HNSW16", "IVF8,Flat", "IVF8,PQ4"])
def test_l2_factories_match_faiss_own_l2_indexes(factory):
    corpus, queries = raw_vectors(2000, seed=2), raw_vectors(20, seed=3)
    ours = VectorIndex.from_vectors(corpus, np.arange(len(corpus)), factory=factory, metric="l2")
    theirs = faiss.index_factory(corpus.shape[1], factory, faiss.METRIC_L2)  # FAISS's own L2 index, same recipe
    if hasattr(faiss.downcast_index(theirs), "do_polysemous_training"):
        faiss.downcast_index(theirs).do_polysemous_training = False
    theirs.train(corpus)
    theirs.add(corpus)
    D_ours, I_ours = ours.search(queries, 5)
    D_theirs, I_theirs = theirs.search(queries, 5)
    assert np.array_equal(I_ours, I_theirs)
    np.testing.assert_allclose(D_ours, -np.sqrt(D_theirs), rtol=1e-5, atol=1e-4)


def test_l2_index_removal_and_files_keep_the_metric(tmp_path):
    corpus, queries = raw_vectors(400, seed=4), raw_vectors(5, seed=5)
    ids = np.arange(1, 401)
    for factory in ("Flat", "HNSW16"):
        index = VectorIndex.from_vectors(corpus, ids, factory=factory, metric="l2")
        index.remove(ids[:200])
        path = tmp_path / f"{factory}.faiss"
        index.save(path)
        loaded = VectorIndex.load(path, factory=factory)
        assert loaded.metric == "l2" and loaded.ntotal == 200
        D, I = loaded.search(queries, 3)
        assert not np.isin(I, ids[:200]).any()
        distances, rows = loop_top_k(queries, corpus[200:], 3)
        assert np.array_equal(I, ids[200:][rows])
        np.testing.assert_allclose(D, -distances, rtol=1e-5, atol=1e-4)


def test_euclidean_scores_of_every_rule_match_slow_loops():
    vectors, labels = raw_vectors(40, seed=6), [f"c{i % 5}" for i in range(40)]
    labels[-1] = "solo"  # a class of one item: no genuine pair, impostor scores only
    names = sorted(set(labels))
    for rule in rules.VERIFY_RULES:
        genuine, impostor = rules.genuine_impostor_scores(vectors, labels, rule=rule, metric="euclidean")
        expected_genuine, expected_impostor = [], []
        for i, own in enumerate(labels):
            for name in names:
                members = [j for j, label in enumerate(labels) if label == name and j != i]
                support = vectors[members]
                if name == own and members:
                    expected_genuine.append(rules.verification_score(vectors[i], support, rule, metric="euclidean"))
                elif name != own:
                    expected_impostor.append(rules.verification_score(vectors[i], support, rule, metric="euclidean"))
        np.testing.assert_allclose(genuine, expected_genuine, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(impostor, expected_impostor, rtol=1e-5, atol=1e-5)
    # ... and verification_score itself against the obvious formulas.
    q, support = vectors[0], vectors[1:6]
    mean = support.astype(np.float64).mean(axis=0)
    assert rules.verification_score(q, support, "prototype", "euclidean") == pytest.approx(-np.linalg.norm(q - mean))
    assert rules.verification_score(q, support, "max", "euclidean") == pytest.approx(
        -min(np.linalg.norm(q - s) for s in support), rel=1e-5)
    spread = np.mean([np.linalg.norm(s - np.delete(support, j, 0).mean(axis=0)) for j, s in enumerate(support)])
    assert rules.verification_score(q, support, "relative", "euclidean") == pytest.approx(
        -np.linalg.norm(q - mean) / spread, rel=1e-6)


def test_euclidean_knn_vote_rewards_more_and_nearer_neighbours():
    # Three neighbours of "a" at distance 1 outvote one of "b" at distance 0.5 (a sum of -distances would not).
    ranking = scoring.rank_by_knn([["b", "a", "a", "a"]], np.array([[-0.5, -1.0, -1.0, -1.0]]), 4, metric="euclidean")[0]
    assert [label for label, _ in ranking] == ["a", "b"]
    assert ranking[0][1] == pytest.approx(3 * 1 / 2) and ranking[1][1] == pytest.approx(1 / 1.5)


def test_pair_scores_match_a_loop():
    from siamesedb.evaluation import pair_scores

    vectors, a, b = raw_vectors(10, seed=8), np.array([0, 3, 5]), np.array([1, 3, 9])
    expected = [-np.linalg.norm(vectors[i].astype(np.float64) - vectors[j]) for i, j in zip(a, b)]
    np.testing.assert_allclose(pair_scores(vectors, a, b, "euclidean"), expected, rtol=1e-6)
    np.testing.assert_allclose(pair_scores(vectors, a, b, "cosine"), [vectors[i] @ vectors[j] for i, j in zip(a, b)],
                               rtol=1e-5)


def mlp_encoder(**overrides) -> Encoder:
    torch.manual_seed(0)
    config = EncoderConfig(backbone="mlp", embedding_dim=16, metric="euclidean", **overrides)
    return Encoder(config)


def test_mlp_encoder_saves_loads_and_fingerprints_like_the_others(tmp_path):
    encoder = mlp_encoder(hidden=(20, 10), dropout=0.2)
    linears = [m for m in encoder.net if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 20), (20, 10), (10, 16)]
    images = torch.rand(6, 1, 28, 28)
    vectors = encoder.encode_tensors(images)
    assert vectors.shape == (6, 16) and not np.allclose(np.linalg.norm(vectors, axis=1), 1.0)  # raw, not unit
    encoder.save(tmp_path / "mlp")
    config = json.loads((tmp_path / "mlp" / "config.json").read_text())
    assert (config["metric"], config["hidden"], config["dropout"]) == ("euclidean", [20, 10], 0.2)
    loaded = Encoder.load(tmp_path / "mlp")
    assert loaded.fingerprint == encoder.fingerprint
    np.testing.assert_array_equal(loaded.encode_tensors(images), vectors)
    assert mlp_encoder().fingerprint != encoder.fingerprint  # the sizes are part of the model
    # The reference layout by default: 784 -> 128 -> 64 -> 32 -> 16, dropout 0.1 twice; any input size flattens.
    default = Encoder(EncoderConfig(backbone="mlp", embedding_dim=16))
    assert [m.out_features for m in default.net if isinstance(m, torch.nn.Linear)] == [128, 64, 32, 16]
    assert [m.p for m in default.net if isinstance(m, torch.nn.Dropout)] == [0.1, 0.1]
    wide = Encoder(EncoderConfig(backbone="mlp", embedding_dim=16, preprocessing=Preprocessing(size=(20, 30))))
    assert wide.encode_tensors(torch.rand(2, 1, 20, 30)).shape == (2, 16)  # 600 inputs, flattened
    with pytest.raises(EncoderError, match="mlp backbone"):
        EncoderConfig(backbone="conv4", hidden=(10,))
    with pytest.raises(EncoderError, match="metric"):
        EncoderConfig(metric="manhattan")


def test_cosine_encoders_keep_their_fingerprints():
    if not (MODELS_DIR / "default").is_dir():
        pytest.skip("the shipped default encoder is not installed")
    encoder = Encoder.load("default")
    assert "metric" not in encoder.config.to_dict()  # the default metric is left out of the fingerprinted config
    assert encoder.fingerprint == "8bbd3064e906683e"


@pytest.fixture
def euclidean_index(tmp_path):
    encoder = mlp_encoder()
    vectors, labels = raw_vectors(30, d=16, seed=7), [f"c{i % 3}" for i in range(30)]
    db = SiameseDB.create(tmp_path / "l2", encoder=encoder, device="cpu")
    db.add_vectors(vectors, labels)
    yield db, vectors, labels
    db.close()


def test_euclidean_index_prototypes_are_plain_means(euclidean_index):
    db, vectors, labels = euclidean_index
    assert db.manifest["metric"] == "l2" and db.info()["metric"] == "l2"
    np.testing.assert_array_equal(db.store.vectors()[1], vectors)  # stored as given, not normalised
    means = {c: vectors[np.array(labels) == c].astype(np.float64).mean(axis=0) for c in ("c0", "c1", "c2")}
    names, prototypes = scoring.class_prototypes(vectors, labels, metric="euclidean")
    np.testing.assert_allclose(prototypes, np.stack([means[c] for c in names]), rtol=1e-6)
    prediction = db.classify_vectors(vectors[:1])[0]
    for label, score in prediction.ranking:
        assert score == pytest.approx(-np.linalg.norm(vectors[0] - means[label]), rel=1e-5)
    top = db.classify_vectors(vectors[:1], top=2)[0]  # the FAISS path over the prototypes agrees
    assert [label for label, _ in top.ranking] == [label for label, _ in prediction.ranking[:2]]
    hit = db.search_vectors(vectors[:1], k=1)[0][0]
    assert hit.id == 1 and hit.to_dict()["distance"] == pytest.approx(0.0, abs=1e-3) and hit.score <= 0
    calibration = db.calibrate()
    verdict = db.verify_vector(vectors[0], "c0")
    assert verdict.threshold == calibration["threshold"]
    assert verdict.score == pytest.approx(-np.linalg.norm(vectors[0] - means["c0"]), rel=1e-5)
    for factory in ("HNSW16", "auto"):  # a rebuild of another type (auto: chosen for the size) keeps L2
        db.reindex(factory)
        assert db.index.metric == "l2" and db.search_vectors(vectors[:1], k=1)[0][0].id == 1
    db.remove(ids=[2])
    assert db.index.metric == "l2" and 2 not in db.search_vectors(vectors[1:2], k=30).ids
    db.close()
    reopened = SiameseDB.open(db.path, device="cpu")
    assert reopened.index.metric == "l2" and reopened.search_vectors(vectors[:1], k=1)[0][0].id == 1
    reopened.close()


def test_a_metric_mismatch_is_refused_in_one_line(euclidean_index, tmp_path):
    db, vectors, labels = euclidean_index
    db.export_vectors(tmp_path / "l2.npy")
    torch.manual_seed(1)
    cosine = SiameseDB.create(tmp_path / "cos", encoder=Encoder(EncoderConfig(backbone="mlp", embedding_dim=16)),
                              device="cpu")
    with pytest.raises(EncoderMismatchError, match="cosine index cannot hold euclidean vectors") as refused:
        cosine.add_vectors(vectors, labels, metric="euclidean")
    assert "\n" not in str(refused.value)
    with pytest.raises(EncoderMismatchError, match="holds l2 vectors") as refused:
        cosine.import_vectors(tmp_path / "l2.npy", force=True)  # not even --force
    assert "\n" not in str(refused.value)
    cosine.add_vectors(vectors, labels)
    cosine.export_vectors(tmp_path / "cos.npy")
    with pytest.raises(EncoderMismatchError, match="holds inner_product vectors"):
        db.import_vectors(tmp_path / "cos.npy", force=True)
    with pytest.raises(EncoderMismatchError, match="euclidean index cannot hold cosine vectors"):
        db.add_vectors(vectors, labels, metric="cosine")
    assert len(cosine) == 30 and len(db) == 30
    cosine.close()


def test_losses_on_raw_embeddings_match_loops():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(8, 4, generator=g, dtype=torch.float64) * 2, torch.randn(8, 4, generator=g, dtype=torch.float64) * 2
    same = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0], dtype=torch.float64)
    # Half the impostors far beyond the margin (hinge zero), half inside it (hinge active: a loss without its
    # impostor term, or with the hinge unsquared, gives another value and gradient).
    b = b.clone()
    b[[3, 7]] = a[[3, 7]] + 0.3 * torch.randn(2, 4, generator=g, dtype=torch.float64)
    assert all(float(torch.dist(a[i], b[i])) < 2 for i in (3, 7)) and float(torch.dist(a[1], b[1])) > 2
    a, b = a.requires_grad_(), b.requires_grad_()
    expected = sum(((a[i] - b[i]) ** 2).sum() if same[i] else torch.clamp(2 - torch.dist(a[i], b[i]), min=0) ** 2
                   for i in range(8)) / 8 / 2
    loss = ContrastiveLoss(2.0)(a, b, same)
    assert float(loss) == pytest.approx(float(expected), rel=1e-9)  # margin 2, distance units
    for x in (a, b):
        assert torch.allclose(torch.autograd.grad(loss, x, retain_graph=True)[0],
                              torch.autograd.grad(expected, x, retain_graph=True)[0], atol=1e-9)
    a, b = a.detach(), b.detach()
    support, query_x = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    labels, answers = torch.tensor([0, 0, 1, 1, 2, 2]), torch.tensor([2, 0, 1])
    prototypes = [support[labels == c].mean(0) for c in range(3)]
    loss = 0.0
    for q, answer in zip(query_x, answers):
        logits = torch.stack([-((q - p) ** 2).sum() for p in prototypes])  # Snell et al.: -squared distance
        loss += float(-torch.log_softmax(logits, 0)[answer])
    assert float(PrototypicalLoss(scale=1.0)(support, labels, query_x, answers)) == pytest.approx(loss / 3, rel=1e-9)


def write_tiny_folder(root: Path, classes: int = 5, per_class: int = 8) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        base = rng.random((28, 28)) > 0.7
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            noisy = base ^ (rng.random((28, 28)) > 0.95)
            Image.fromarray((noisy * 255).astype(np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


def test_cli_flow_mlp_contrastive_margin_2_euclidean(tmp_path):
    folder = write_tiny_folder(tmp_path / "images")
    runner = CliRunner()

    def run(*args):
        result = runner.invoke(cli, [str(a) for a in args], catch_exceptions=False)
        assert result.exit_code == 0, result.output
        return result.stdout

    run("train", folder, "--out", tmp_path / "enc", "--backbone", "mlp", "--loss", "contrastive", "--margin", 2,
        "--metric", "euclidean", "--epochs", 1, "--steps-per-epoch", 3, "--batch-size", 8, "--val-fraction", 0.4,
        "-q", "--device", "cpu")
    config = json.loads((tmp_path / "enc" / "config.json").read_text())
    assert (config["backbone"], config["metric"], config["embedding_dim"]) == ("mlp", "euclidean", 16)
    index = tmp_path / "index"
    run("build", folder, "--index", index, "--encoder", tmp_path / "enc", "-q")
    image = folder / "c1" / "0.png"
    hits = json.loads(run("query", image, "--index", index, "-k", 3, "--json"))[0]["hits"]
    assert hits[0]["path"] == str(image) and hits[0]["distance"] == pytest.approx(0.0, abs=1e-3)
    assert all(h["score"] == pytest.approx(-h["distance"]) for h in hits)
    assert [h["score"] for h in hits] == sorted((h["score"] for h in hits), reverse=True)
    assert json.loads(run("classify", image, "--index", index, "--json"))[0]["ranking"][0]["score"] <= 0
    calibration = json.loads(run("calibrate", "--index", index, "--json"))
    verdict = json.loads(run("verify", image, "--index", index, "--label", "c1", "--json"))
    assert verdict["threshold"] == pytest.approx(calibration["threshold"]) and verdict["score"] <= 0
    pairs = json.loads(run("eval", "pairs", folder, "--encoder", tmp_path / "enc", "--test-groups", "c3,c4",
                           "--calibration-groups", "c0-c2", "--pairs", 100, "--json"))
    assert pairs["metric"] == "euclidean" and pairs["test_groups"] == ["c3", "c4"]
    # 100 test pairs, half genuine and half impostor: the rates are whole counts of 50, accuracy is what they leave,
    # and the ROC curve passes through (FAR, 1 - FRR), which bounds its area from both sides.
    far, frr, auc = pairs["far"], pairs["frr"], pairs["auc"]
    assert far * 50 == pytest.approx(round(far * 50)) and frr * 50 == pytest.approx(round(frr * 50))
    assert pairs["accuracy"] == pytest.approx(1 - (far + frr) / 2)
    assert (1 - far) * (1 - frr) - 1e-9 <= auc <= 1 - far * frr + 1e-9, pairs
    info = json.loads(run("info", "--index", index, "--json"))
    assert info["metric"] == "l2" and info["encoder"]["backbone"] == "mlp"
    assert "l2" in run("info", "--index", index)


def test_datasets_fetch_mnist_converts_a_tiny_idx_set(tmp_path, monkeypatch):
    """`datasets fetch mnist` on four tiny IDX files the test writes (registered as the official MD5s; no network)."""
    import gzip
    import hashlib
    import struct

    from siamesedb import datasets

    folder = tmp_path / "mnist"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 12), ("t10k", 5)):
        for kind, array in (("images-idx3", rng.integers(0, 256, (n, 28, 28))), ("labels-idx1", np.arange(n) % 10)):
            header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
            with gzip.open(folder / f"{prefix}-{kind}-ubyte.gz", "wb") as fh:
                fh.write(header + array.astype(np.uint8).tobytes())
    monkeypatch.setattr(datasets, "MNIST_MD5", {p.name: hashlib.md5(p.read_bytes()).hexdigest() for p in folder.iterdir()})
    monkeypatch.setattr(datasets, "MNIST_URL", "http://127.0.0.1:9/{name}")  # never used: the files are local
    result = CliRunner().invoke(cli, ["datasets", "fetch", "mnist", "--to", str(tmp_path / "out"), "--from",
                                      str(folder), "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    roots = json.loads(result.stdout)["roots"]
    digits = sorted(p.name for p in Path(roots["train"]).iterdir())
    assert digits == [str(d) for d in range(10)] and len(list(Path(roots["test"]).rglob("*.png"))) == 5
    monkeypatch.setitem(datasets.MNIST_MD5, "t10k-labels-idx1-ubyte.gz", "0" * 32)
    refused = CliRunner().invoke(cli, ["datasets", "fetch", "mnist", "--to", str(tmp_path / "again"), "--from",
                                       str(folder)])
    assert refused.exit_code == 1 and "MD5" in refused.output
