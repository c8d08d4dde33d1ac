"""BlindNet losses on hand-built tensors with known answers, and the vectorised samplers against slow references.

Tolerances: the losses compute in float32 on tensors of a few dozen values; each tolerance below is the float32
rounding of that computation (a few ulp, 1.2e-7 relative each) with a margin, and the measured error is the same with
the default kernels (AVX-512) and with ATEN_CPU_CAPABILITY=default ONEDNN_MAX_CPU_ISA=SSE41 unless a comment says
otherwise. Bare ``torch.testing.assert_close`` uses its float32 defaults, rtol 1.3e-6 and atol 1e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from blindnet.losses import (
    ProjectionHead,
    alignment_loss,
    covariance,
    covariance_matching_loss,
    cross_covariance_diagonal,
    cross_covariance_loss,
    cwcl_from_embeddings,
    cwcl_negative_mask,
    gather_pixels,
    info_nce,
    resize_labels,
    sample_cwcl,
    sample_sdcl,
    sdcl_from_embeddings,
)

IGNORE = 255

# Loss values against known answers: float32 kernels decide them, so CI reruns these with a restricted ISA.
pytestmark = [pytest.mark.numerics, pytest.mark.usefixtures("one_torch_thread")]


# ---------------------------------------------------------------------------------------------------------------------
# CML / CCL
# ---------------------------------------------------------------------------------------------------------------------


def test_covariance_matches_hand_computation() -> None:
    f = torch.tensor([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]]).view(1, 2, 1, 3)
    # F F^T = [[14, -1], [-1, 2]], HW - 1 = 2
    expected = torch.tensor([[7.0 + 1e-5, -0.5], [-0.5, 1.0 + 1e-5]])
    # Sums of products of small integers are exact in float32 and both sides add the same 1e-5: measured identical.
    torch.testing.assert_close(covariance(f)[0], expected)
    g = torch.tensor([[1.0, 0.0, 1.0], [2.0, 1.0, 0.0]]).view(1, 2, 1, 3)
    # diag(F_f F_g^T) = [1*1 + 0 + 3*1, 0*2 + 1*1 + 0] = [4, 1] -> / 2
    torch.testing.assert_close(cross_covariance_diagonal(f, g)[0], torch.tensor([2.0 + 1e-5, 0.5 + 1e-5]))
    cov_g = g.view(2, 3) @ g.view(2, 3).T / 2 + 1e-5 * torch.eye(2)
    cml = ((expected - cov_g) ** 2).mean()
    torch.testing.assert_close(covariance_matching_loss([f], [g]), cml)
    ccl = ((torch.tensor([2.0 + 1e-5, 0.5 + 1e-5]) - 1) ** 2).mean()
    torch.testing.assert_close(cross_covariance_loss([f], [g]), ccl)


def test_cml_is_zero_for_identical_views_and_positive_otherwise() -> None:
    torch.manual_seed(0)
    feats = [torch.randn(2, c, 6, 5) for c in (4, 8, 16)]
    assert covariance_matching_loss(feats, [f.clone() for f in feats]).item() == 0.0
    other = [f + 0.5 * torch.randn_like(f) for f in feats]
    assert covariance_matching_loss(feats, other).item() > 0


def test_ccl_is_zero_when_cross_covariance_diagonal_is_one() -> None:
    torch.manual_seed(1)
    feats = []
    for c in (3, 5):
        f = torch.randn(2, c, 4, 4)
        # Scale every channel so that sum_hw f^2 / (HW - 1) + 1e-5 = 1 exactly.
        energy = f.pow(2).sum((2, 3), keepdim=True)
        feats.append(f * ((1 - 1e-5) * 15 / energy).sqrt())
    diag = cross_covariance_diagonal(feats[0], feats[0])
    # The scaling, a 16-term sum and the division round: measured 1 ulp (1.2e-7) with AVX-512, 2 ulp with SSE4.1.
    torch.testing.assert_close(diag, torch.ones_like(diag))
    # The loss squares that deviation: (2.4e-7)^2 ~ 6e-14 at most (measured 1.4e-14 on both paths).
    assert cross_covariance_loss(feats, feats).item() == pytest.approx(0.0, abs=1e-10)
    # Off-diagonal entries are free: a channel permutation of identical maps changes the off-diagonals, not the diag.
    assert cross_covariance_loss(feats, [f * 0.5 for f in feats]).item() > 0.1


def test_covariance_losses_only_train_the_augmented_branch() -> None:
    torch.manual_seed(2)
    k = [torch.randn(2, 4, 5, 5, requires_grad=True) for _ in range(3)]
    q = [torch.randn(2, 4, 5, 5, requires_grad=True) for _ in range(3)]
    (covariance_matching_loss(k, q) + cross_covariance_loss(k, q)).backward()
    assert all(t.grad is None for t in k)
    assert all(t.grad is not None and t.grad.abs().sum() > 0 for t in q)


def test_covariance_losses_need_style_features() -> None:
    with pytest.raises(ValueError, match="instance_norm"):
        covariance_matching_loss((), ())


# ---------------------------------------------------------------------------------------------------------------------
# InfoNCE, CWCL and SDCL losses
# ---------------------------------------------------------------------------------------------------------------------


def test_info_nce_matches_hand_computation() -> None:
    pos = torch.tensor([0.5])
    neg = torch.tensor([[0.1, -0.2, 0.3]])
    mask = torch.tensor([[True, False, True]])
    t = 0.5
    expected = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(0.2) + math.exp(0.6)))
    # A float32 log-sum-exp of <= 4 terms of order 1 against float64 math: measured 1.1e-8 and 9.5e-8 relative.
    assert info_nce(pos, neg, mask, t).item() == pytest.approx(expected, rel=1e-6)
    expected_all = -math.log(math.exp(1.0) / (math.exp(1.0) + math.exp(0.2) + math.exp(-0.4) + math.exp(0.6)))
    assert info_nce(pos, neg, None, t).item() == pytest.approx(expected_all, rel=1e-6)
    # No negatives at all: the positive alone gives probability 1, loss 0 (a one-term log-sum-exp is the term itself:
    # measured exactly 0).
    assert info_nce(pos, neg, torch.zeros_like(mask), t).item() == pytest.approx(0.0, abs=1e-7)


def _unit(*angles: float) -> torch.Tensor:
    return torch.tensor([[math.cos(a), math.sin(a)] for a in angles])


def test_cwcl_loss_matches_hand_computation_for_both_negative_modes() -> None:
    q = _unit(0.0, 0.3, 2.0)[None]  # 1 x 3 x 2
    k = _unit(0.1, 0.2, 1.5)[None]
    label = torch.tensor([[0, 0, 1]])
    valid = torch.ones(1, 3, dtype=torch.bool)
    t = 0.5  # losses of order 1, so float32 rounding stays far below the tolerance
    sim = (q[0] @ k[0].T).tolist()

    def nce(i: int, negs: list[int]) -> float:
        num = math.exp(sim[i][i] / t)
        return -math.log(num / (num + sum(math.exp(sim[i][j] / t) for j in negs)))

    paper = (nce(0, [2]) + nce(1, [2]) + nce(2, [0, 1])) / 3
    original = sum(nce(i, [0, 1, 2]) for i in range(3)) / 3
    got_paper = cwcl_from_embeddings(q, k, label, valid, temperature=t, negatives="paper")
    got_orig = cwcl_from_embeddings(q, k, label, valid, temperature=t, negatives="original")
    # float32 unit-vector dot products and <= 3-term log-sum-exps: measured 1.9e-7 relative at most (~50x margin).
    assert got_paper.item() == pytest.approx(paper, rel=1e-5)
    assert got_orig.item() == pytest.approx(original, rel=1e-5)
    # The original's floor: with q == k every anchor also sees its own positive as a negative -> loss >= log 2. The
    # 1e-6 allows float32 rounding of the log (its ulp at 0.69 is 6e-8); the measured loss is 0.25 above the floor.
    same = cwcl_from_embeddings(k, k, label, valid, temperature=0.07, negatives="original")
    assert same.item() > math.log(2) - 1e-6
    # Gradient reaches the anchors (augmented view) and never the keys (original view).
    q_leaf, k_leaf = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    cwcl_from_embeddings(q_leaf, k_leaf, label, valid, temperature=t).backward()
    assert k_leaf.grad is None and q_leaf.grad is not None and q_leaf.grad.abs().sum() > 0


def test_paper_mask_has_no_same_class_negative_and_original_has() -> None:
    torch.manual_seed(3)
    label = torch.randint(0, 4, (2, 30))
    valid = torch.rand(2, 30) > 0.1
    paper = cwcl_negative_mask(label, valid, "paper")
    same_class = label[:, :, None] == label[:, None, :]
    assert not (paper & same_class).any()
    assert not (paper & ~valid[:, None, :]).any()
    original = cwcl_negative_mask(label, valid, "original")
    assert (original & same_class).any()
    assert original.diagonal(dim1=1, dim2=2)[valid].all()  # own positive included, as in the shipped code
    with pytest.raises(ValueError, match="paper"):
        cwcl_negative_mask(label, valid, "intended")  # type: ignore[arg-type]


def test_sdcl_loss_matches_hand_computation_and_detaches_the_positive() -> None:
    q = _unit(0.0, 1.0).requires_grad_(True)  # 2 anchors
    k = _unit(0.2, 0.9).requires_grad_(True)
    neg = torch.stack([_unit(1.0, 2.0), _unit(3.0, 0.5)]).requires_grad_(True)  # 2 x R=2 x 2
    valid = torch.tensor([True, False])
    t = 0.5
    pos0 = math.cos(0.2)
    negs0 = [math.cos(1.0), math.cos(2.0)]
    expected = -math.log(math.exp(pos0 / t) / (math.exp(pos0 / t) + sum(math.exp(s / t) for s in negs0)))
    loss = sdcl_from_embeddings(q, k, neg, valid, temperature=t)
    # As for CWCL above: measured 2.1e-7 relative.
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert k.grad is None
    assert q.grad is not None and q.grad[0].abs().sum() > 0 and q.grad[1].abs().sum() == 0
    assert neg.grad is not None and neg.grad[0].abs().sum() > 0  # negatives are augmented-view, not detached


def test_projection_head_vectors_equal_dense_forward() -> None:
    torch.manual_seed(4)
    head = ProjectionHead(6, 4)
    f = torch.randn(2, 6, 3, 5)
    dense = head(f)  # 2 x 4 x 3 x 5
    b = torch.tensor([0, 1, 1])
    p = torch.tensor([0, 7, 14])
    sparse = head.forward_vectors(gather_pixels(f, b, p))
    # A 1x1 convolution vs a matrix product on the gathered vectors (other kernels, other summation order): measured
    # 3.0e-8 absolute (AVX-512) and 6.0e-8 (SSE4.1), against the defaults' 1e-5 + 1.3e-6 relative.
    torch.testing.assert_close(sparse, dense.flatten(2)[b, :, p])
    # L2-normalised float32 vectors: norm 1 up to 1 ulp (measured 1.2e-7); atol 1e-5 leaves ~100x.
    torch.testing.assert_close(sparse.norm(dim=-1), torch.ones(3), atol=1e-5, rtol=0)
    # channels_last maps gather the same rows (a gather copies values: measured identical).
    torch.testing.assert_close(gather_pixels(f.to(memory_format=torch.channels_last), b, p), gather_pixels(f, b, p))


# ---------------------------------------------------------------------------------------------------------------------
# Samplers against slow references
# ---------------------------------------------------------------------------------------------------------------------


def reference_cwcl(labels, pred, scores, k, s, v, min_pixels, fill):
    """Loop-based CWCL sampling: the rule in words, one image and one class at a time."""
    n, p = labels.shape
    out = []
    for i in range(n):
        lab, pr = labels[i].tolist(), pred[i].tolist()
        u, u2 = scores[0, i].tolist(), scores[1, i].tolist()
        classes = [c for c in range(k) if lab.count(c) > min_pixels][:s]
        idx: list[int] = []
        for c in classes:
            hard = sorted((j for j in range(p) if lab[j] == c and pr[j] != c), key=lambda j: u[j])
            easy = sorted((j for j in range(p) if lab[j] == c and pr[j] == c), key=lambda j: u[j])
            if len(hard) >= v / 2 and len(easy) >= v / 2:
                n_hard = v // 2
            elif len(hard) >= v / 2:
                n_hard = v - len(easy)
            else:
                n_hard = len(hard)
            idx += hard[:n_hard] + easy[: v - n_hard]
        if fill:
            used = set(idx)
            pool = sorted((j for j in range(p) if 0 <= lab[j] < k and j not in used), key=lambda j: u2[j])
            idx += [pool[j % len(pool)] for j in range((s - len(classes)) * v)] if pool else []
        out.append(idx)
    return out


def _blocky_labels(gen: torch.Generator, n: int, h: int, w: int, k: int, block: int = 4) -> torch.Tensor:
    coarse = torch.randint(0, k, (n, h // block, w // block), generator=gen)
    labels = coarse.repeat_interleave(block, 1).repeat_interleave(block, 2)
    labels[torch.rand(labels.shape, generator=gen) < 0.15] = IGNORE
    return labels


@pytest.mark.parametrize("fill", [True, False])
def test_cwcl_sampler_agrees_with_reference(fill: bool) -> None:
    gen = torch.Generator().manual_seed(5)
    k, s, v, min_pixels = 6, 3, 8, 10
    labels = _blocky_labels(gen, 3, 24, 24, k).flatten(1)
    labels[1][labels[1] > 1] = IGNORE  # image 1: at most two classes -> filler slots
    labels[2][:] = 4  # image 2: one class, all easy/hard by pred
    pred = torch.where(torch.rand(labels.shape, generator=gen) < 0.3, torch.randint(0, k, labels.shape), labels)
    scores = torch.rand((2, *labels.shape), generator=gen)
    got = sample_cwcl(
        labels,
        pred,
        num_classes=k,
        max_classes=s,
        max_views=v,
        min_pixels=min_pixels,
        fill_empty_slots=fill,
        scores=scores,
    )
    ref = reference_cwcl(labels, pred, scores, k, s, v, min_pixels, fill)
    for i in range(labels.shape[0]):
        assert got.index[i][got.valid[i]].tolist() == ref[i]
    assert got.valid[0].all()  # image 0 has more than 3 eligible classes: three full class slots
    assert got.slot_class[0].tolist() == [c for c in range(k) if (labels[0] == c).sum() > min_pixels][:s]
    torch.testing.assert_close(got.label, torch.where(labels >= k, k, labels).gather(1, got.index))


def test_cwcl_sampler_with_defaults_agrees_with_reference_and_generator() -> None:
    gen = torch.Generator().manual_seed(6)
    labels = _blocky_labels(gen, 2, 64, 64, 19, block=8).flatten(1)
    pred = torch.where(torch.rand(labels.shape, generator=gen) < 0.5, torch.randint(0, 19, labels.shape), labels)
    scores = torch.rand((2, *labels.shape), generator=torch.Generator().manual_seed(7))
    got = sample_cwcl(labels, pred, num_classes=19, scores=scores)
    ref = reference_cwcl(labels, pred, scores, 19, 15, 50, 50, True)
    for i in range(2):
        assert got.index[i][got.valid[i]].tolist() == ref[i]
    # Drawing the scores from a generator is the same as passing them.
    again = sample_cwcl(labels, pred, num_classes=19, generator=torch.Generator().manual_seed(7))
    assert torch.equal(again.index, got.index)


def test_cwcl_level_without_an_eligible_class_contributes_zero() -> None:
    # No class of the batch has more than min_pixels pixels: the original returns no samples and the level adds 0.
    # One image with a single 11-pixel class and min_pixels 10 is eligible: then the others are filled as before.
    k, s, v, min_pixels = 4, 2, 4, 10
    labels = torch.full((2, 64), IGNORE, dtype=torch.long)
    labels[0, :10] = 1  # exactly min_pixels: not "more than"
    labels[1, 20:30] = 2
    pred = torch.zeros_like(labels)
    smp = sample_cwcl(
        labels,
        pred,
        num_classes=k,
        max_classes=s,
        max_views=v,
        min_pixels=min_pixels,
        generator=torch.Generator().manual_seed(0),
    )
    assert not smp.valid.any()
    q = torch.nn.functional.normalize(torch.randn(2, s * v, 8, requires_grad=True), dim=-1)
    k_emb = torch.nn.functional.normalize(torch.randn(2, s * v, 8), dim=-1)
    loss = cwcl_from_embeddings(q, k_emb, smp.label, smp.valid)
    assert loss.item() == 0.0 and loss.requires_grad  # 0, still part of the graph
    labels[1, 20:31] = 2  # now image 1 has an eligible class (11 > 10 pixels)
    smp = sample_cwcl(
        labels,
        pred,
        num_classes=k,
        max_classes=s,
        max_views=v,
        min_pixels=min_pixels,
        generator=torch.Generator().manual_seed(0),
    )
    assert smp.valid[1].all()  # its class slot plus a filler slot of its other labelled pixels
    assert smp.valid[0].all()  # image 0 has no eligible class: all its slots are filler from its 10 labelled pixels
    assert set(smp.index[0].tolist()) <= set(range(10))


def reference_sdcl(labels, pred_k, pred_q, scores, k, r, max_per_image):
    n, p = labels.shape
    neg: dict[tuple[int, int], list[int]] = {}
    for i in range(n):
        lab, u2 = labels[i].tolist(), scores[1, i].tolist()
        for c in range(k):
            pix = sorted((j for j in range(p) if lab[j] == c), key=lambda j: u2[j])
            if len(pix) >= r:
                neg[(i, c)] = pix[:r]
    anchors = []
    for i in range(n):
        for j in range(p):
            c, w = labels[i, j].item(), pred_q[i, j].item()
            if c < k and pred_k[i, j].item() == c and w != c and (i, w) in neg:
                anchors.append((scores[0, i, j].item(), i, j, w))
    anchors.sort(key=lambda a: -a[0])
    return [(i, j, w) for _, i, j, w in anchors[: n * max_per_image]], neg


@pytest.mark.parametrize("max_per_image", [1000, 7])
def test_sdcl_sampler_agrees_with_reference(max_per_image: int) -> None:
    gen = torch.Generator().manual_seed(8)
    k, r = 5, 6
    labels = _blocky_labels(gen, 2, 20, 20, k).flatten(1)
    pred_k = torch.where(torch.rand(labels.shape, generator=gen) < 0.8, labels, torch.randint(0, k, labels.shape))
    pred_k = pred_k.clamp(max=k - 1)
    pred_q = torch.where(torch.rand(labels.shape, generator=gen) < 0.5, pred_k, torch.randint(0, k, labels.shape))
    scores = torch.rand((2, *labels.shape), generator=gen)
    got = sample_sdcl(
        labels, pred_k, pred_q, num_classes=k, num_negatives=r, max_anchors_per_image=max_per_image, scores=scores
    )
    ref_anchors, ref_neg = reference_sdcl(labels, pred_k, pred_q, scores, k, r, max_per_image)
    v = got.valid
    assert list(zip(got.batch[v].tolist(), got.pixel[v].tolist(), got.wrong[v].tolist())) == ref_anchors
    assert len(ref_anchors) > 0
    if max_per_image == 7:
        assert v.sum().item() == 14  # capped at N * max_anchors_per_image
    for i in range(2):
        for c in range(k):
            assert got.neg_valid[i, c].item() == ((i, c) in ref_neg)
            if (i, c) in ref_neg:
                assert got.neg_index[i, c].tolist() == ref_neg[(i, c)]


def test_ignore_label_is_never_sampled() -> None:
    gen = torch.Generator().manual_seed(9)
    for _ in range(3):
        labels = _blocky_labels(gen, 2, 32, 32, 19, block=4).flatten(1)
        labels[:, ::3] = IGNORE
        pred = torch.randint(0, 19, labels.shape, generator=gen)
        cw = sample_cwcl(labels, pred, num_classes=19, max_views=10, min_pixels=10, generator=gen)
        assert (cw.label[cw.valid] != IGNORE).all()
        assert (labels.gather(1, cw.index)[cw.valid] != IGNORE).all()
        sd = sample_sdcl(labels, labels.clamp(max=18), pred, num_classes=19, num_negatives=5, generator=gen)
        assert (labels[sd.batch, sd.pixel][sd.valid] != IGNORE).all()
        neg_labels = labels.gather(1, sd.neg_index.flatten(1)).view_as(sd.neg_index)
        expected = torch.arange(19)[None, :, None].expand_as(neg_labels)
        assert torch.equal(neg_labels[sd.neg_valid], expected[sd.neg_valid])


def test_empty_batches_give_zero_losses_with_a_graph() -> None:
    labels = torch.full((2, 64), IGNORE)
    pred = torch.zeros(2, 64, dtype=torch.long)
    fq = torch.randn(2, 8, 8, 8, requires_grad=True)
    head = ProjectionHead(8, 4)
    cw = sample_cwcl(labels, pred, num_classes=19)
    assert not cw.valid.any()
    b = torch.arange(2)[:, None].expand_as(cw.index)
    q = head.forward_vectors(gather_pixels(fq, b, cw.index))
    loss = cwcl_from_embeddings(q, q.detach(), cw.label, cw.valid)
    assert loss.item() == 0.0 and loss.requires_grad
    sd = sample_sdcl(labels, pred, pred, num_classes=19)
    assert not sd.valid.any()
    qa = head.forward_vectors(gather_pixels(fq, sd.batch, sd.pixel))
    nb = torch.arange(2)[:, None, None].expand_as(sd.neg_index)
    q_neg = head.forward_vectors(gather_pixels(fq, nb, sd.neg_index))[sd.batch, sd.wrong]
    loss2 = sdcl_from_embeddings(qa, qa.detach(), q_neg, sd.valid)
    assert loss2.item() == 0.0 and loss2.requires_grad
    (loss + loss2).backward()
    assert torch.isfinite(fq.grad).all()


def test_hard_easy_split() -> None:
    labels = torch.zeros(1, 200, dtype=torch.long)
    labels[0, 100:] = IGNORE
    pred = torch.zeros(1, 200, dtype=torch.long)
    pred[0, :10] = 3  # 10 hard pixels, 90 easy
    smp = sample_cwcl(labels, pred, num_classes=4, max_classes=1, max_views=50, generator=torch.Generator())
    hard = pred.gather(1, smp.index) != labels.gather(1, smp.index)
    assert hard.sum().item() == 10 and smp.valid.all()
    pred[0, :60] = 3  # 60 hard, 40 easy -> 25 / 25
    smp = sample_cwcl(labels, pred, num_classes=4, max_classes=1, max_views=50, generator=torch.Generator())
    assert (pred.gather(1, smp.index) != 0).sum().item() == 25
    assert len(set(smp.index[0].tolist())) == 50  # no pixel twice


def test_resize_labels_is_nearest() -> None:
    labels = torch.tensor([[[1, 2], [3, IGNORE]]])
    up = resize_labels(labels, (4, 4))
    assert set(up.unique().tolist()) == {1, 2, 3, IGNORE}
    assert resize_labels(up, (2, 2)).tolist() == labels.tolist()


# ---------------------------------------------------------------------------------------------------------------------
# Alignment losses
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["l2", "cosine", "mmd"])
def test_alignment_losses_zero_for_identical_and_positive_for_different(kind: str) -> None:
    torch.manual_seed(10)
    f = torch.randn(2, 8, 6, 6, requires_grad=True)
    same = alignment_loss(kind, f, f.detach().clone())
    # l2 is sqrt(0 + 1e-12) = 1e-6 by construction (its gradient guard); cosine rounds to ~3e-9, mmd is exactly 0
    # (measured on both paths): 1e-4 is 100x the largest.
    assert abs(same.item()) < 1e-4
    same.backward()
    assert torch.isfinite(f.grad).all()
    other = torch.randn(2, 8, 6, 6) * 2 + 1
    assert alignment_loss(kind, f, other).item() > 0.05


def test_alignment_unknown_kind() -> None:
    with pytest.raises(KeyError, match="choose one of"):
        alignment_loss("kl", torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1))  # type: ignore[arg-type]
