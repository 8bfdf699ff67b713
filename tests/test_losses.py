"""Each loss against a slow, explicit Python loop."""

from __future__ import annotations

import itertools

import pytest
import torch

from siamesedb.losses import ContrastiveLoss, PairwiseBCELoss, PrototypicalLoss, TripletLoss


def emb(n=12, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


LABELS = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 3, 3, 1, 0])


def dist(x, y):
    return float(torch.sqrt(((x - y) ** 2).sum()))


def test_contrastive_matches_loop_values_and_gradients():
    a = emb(8, seed=1).requires_grad_()
    b = emb(8, seed=2).requires_grad_()
    same = torch.tensor([1, 0, 1, 0, 0, 1, 1, 0], dtype=torch.float64)
    margin = 0.9
    loss = ContrastiveLoss(margin)(a, b, same)
    total = 0.0
    for i in range(8):
        d = torch.sqrt(((a[i] - b[i]) ** 2).sum())
        total = total + (d**2 if same[i] else torch.clamp(margin - d, min=0) ** 2)
    explicit = total / 8 / 2
    assert loss.item() == pytest.approx(explicit.item(), rel=1e-9)
    grad_loss = torch.autograd.grad(loss, a, retain_graph=True)[0]
    grad_explicit = torch.autograd.grad(explicit, a)[0]
    assert torch.allclose(grad_loss, grad_explicit, atol=1e-9)


def contrastive_loop(a, b, same, margin):
    """Hadsell et al.'s loss written out pair by pair: d^2 for a genuine pair, max(0, margin - d)^2 for an
    impostor, mean over pairs, halved."""
    total = 0.0
    for i in range(len(same)):
        d = torch.sqrt(((a[i] - b[i]) ** 2).sum())
        total = total + (d**2 if same[i] else torch.clamp(margin - d, min=0) ** 2)
    return total / len(same) / 2


def near_pairs(a, spread, seed):
    """Partners of `a` at small, varied distances (so impostor pairs fall inside the margin)."""
    g = torch.Generator().manual_seed(seed)
    return a.detach() + spread * torch.randn(a.shape, generator=g, dtype=a.dtype)


@pytest.mark.parametrize("unit", [True, False], ids=["unit-cosine", "raw-euclidean"])
def test_contrastive_with_impostors_inside_the_margin_matches_loop(unit):
    """Impostors closer than the margin, so the hinge is active: dropping the impostor term, or not squaring the
    hinge, changes both the value and the gradient (the pairs above are all beyond the margin)."""
    a = emb(10, seed=7) if unit else torch.randn(10, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 3
    b = near_pairs(a, 0.15 if unit else 0.6, seed=8)
    if unit:
        b = torch.nn.functional.normalize(b, dim=1)
    margin = 0.9 if unit else 2.5
    a, b = a.detach().requires_grad_(), b.detach().requires_grad_()
    same = torch.tensor([1, 0, 0, 1, 0, 0, 1, 0, 0, 0], dtype=torch.float64)
    d = torch.linalg.norm(a - b, dim=1).detach()
    impostor = same == 0
    assert bool((d[impostor] < margin).all()) and bool((d[impostor] > 0.05).all()), d  # every hinge active
    loss = ContrastiveLoss(margin)(a, b, same)
    explicit = contrastive_loop(a, b, same, margin)
    assert loss.item() == pytest.approx(explicit.item(), rel=1e-9)
    impostor_part = sum(float((margin - d[i]) ** 2) for i in range(10) if not same[i]) / 10 / 2
    assert impostor_part > 0.1 * loss.item()  # the impostor term carries a real share of the value
    for x in (a, b):
        grad_loss = torch.autograd.grad(loss, x, retain_graph=True)[0]
        grad_explicit = torch.autograd.grad(explicit, x, retain_graph=True)[0]
        assert torch.allclose(grad_loss, grad_explicit, atol=1e-9)
        # impostor rows are pushed apart: the gradient on a points from b towards a, scaled by (margin - d) / d
        rows = impostor.nonzero().flatten()
        sign = 1.0 if x is b else -1.0
        expected = sign * ((margin - d[rows]) / d[rows] / 10).unsqueeze(1) * (a - b).detach()[rows]
        assert torch.allclose(grad_loss[rows], expected, atol=1e-9)


def all_triplets(labels):
    n = len(labels)
    for a, p, ng in itertools.product(range(n), repeat=3):
        if a != p and labels[a] == labels[p] and labels[a] != labels[ng]:
            yield a, p, ng


def test_triplet_all_matches_loop():
    x, margin = emb(), 0.3
    losses = [dist(x[a], x[p]) - dist(x[a], x[n]) + margin for a, p, n in all_triplets(LABELS)]
    positive = [v for v in losses if v > 0]
    expected = sum(positive) / len(positive)
    assert float(TripletLoss(margin, "all")(x, LABELS)) == pytest.approx(expected, rel=1e-6)


def test_triplet_batch_hard_matches_loop():
    x, margin = emb(), 0.3
    values = []
    for a in range(len(LABELS)):
        pos = [dist(x[a], x[p]) for p in range(len(LABELS)) if p != a and LABELS[p] == LABELS[a]]
        neg = [dist(x[a], x[n]) for n in range(len(LABELS)) if LABELS[n] != LABELS[a]]
        if pos and neg:
            values.append(max(0.0, max(pos) - min(neg) + margin))
    assert float(TripletLoss(margin, "batch_hard")(x, LABELS)) == pytest.approx(sum(values) / len(values), rel=1e-6)


def test_triplet_semi_hard_matches_loop():
    x, margin = emb(), 0.3
    values = []
    n = len(LABELS)
    for a, p in itertools.product(range(n), repeat=2):
        if a == p or LABELS[a] != LABELS[p]:
            continue
        d_ap = dist(x[a], x[p])
        negatives = [dist(x[a], x[k]) for k in range(n) if LABELS[k] != LABELS[a]]
        farther = [d for d in negatives if d > d_ap]
        d_an = min(farther) if farther else max(negatives)
        values.append(max(0.0, d_ap - d_an + margin))
    assert float(TripletLoss(margin, "semi_hard")(x, LABELS)) == pytest.approx(sum(values) / len(values), rel=1e-6)


def test_triplet_without_negatives_is_zero_not_nan():
    x = emb(4)
    loss = TripletLoss(0.2, "batch_hard")(x, torch.zeros(4, dtype=torch.long))
    assert float(loss) == 0.0


def test_pairwise_bce_matches_loop():
    torch.manual_seed(0)
    module = PairwiseBCELoss(5).double()
    a, b = emb(6, seed=3), emb(6, seed=4)
    same = torch.tensor([1, 0, 1, 1, 0, 0], dtype=torch.float64)
    w, bias = module.head.weight[0], module.head.bias[0]
    total = 0.0
    for i in range(6):
        p = torch.sigmoid((w * (a[i] - b[i]).abs()).sum() + bias)
        total += -(same[i] * torch.log(p) + (1 - same[i]) * torch.log(1 - p))
    assert module(a, b, same).item() == pytest.approx((total / 6).item(), rel=1e-9)


def test_prototypical_matches_loop():
    support, query = emb(9, seed=5), emb(6, seed=6)
    support_labels = torch.tensor([4, 4, 4, 7, 7, 7, 9, 9, 9])
    query_labels = torch.tensor([7, 4, 9, 9, 4, 7])
    scale = 10.0
    classes = [4, 7, 9]
    protos = {c: support[support_labels == c].mean(dim=0) for c in classes}
    total = 0.0
    for q, label in zip(query, query_labels):
        logits = torch.stack([-scale * ((q - protos[c]) ** 2).sum() for c in classes])
        total += -torch.log_softmax(logits, dim=0)[classes.index(int(label))]
    loss = PrototypicalLoss(scale)(support, support_labels, query, query_labels)
    assert float(loss) == pytest.approx(float(total / 6), rel=1e-9)
    with pytest.raises(ValueError):
        PrototypicalLoss()(support, support_labels, query, torch.tensor([1, 4, 9, 9, 4, 7]))
