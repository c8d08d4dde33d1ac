"""Pixel contrastive losses of BlindNet: class-wise (CWCL) and semantic-disentanglement (SDCL), vectorised.

Originals: ``Class_PixelNCELoss`` / ``ProjectionHead`` in ``network/cwcl.py`` and ``Disentangle_Contrast`` in
``network/sdcl.py``. The original samples pixels with Python loops over images, classes and wrong classes and calls
``.item()``/``nonzero`` throughout; here every sampler is a fixed-shape tensor program (sorts, scatters, top-k) that
never reads a value back to the host, so it can run on a GPU stream without synchronisation.

Conventions: ``N`` images, ``P = h * w`` pixels of one feature level, ``K`` classes, ``D`` embedding width (256).
Labels are train ids in ``[0, K)``; anything else (255 in practice) is ignored and is never sampled.

Every sampler draws its randomness from explicit uniform scores in ``[0, 1)`` (or from a ``torch.Generator`` that
makes them), and its choices are a deterministic function of those scores: "the pixels of a group with the smallest
scores". That makes the samplers testable against a slow loop-based reference under the same scores.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from blindnet.models.deeplabv3plus import init_weights

#: Stability term in the L2 normalisation of the projection heads (the original's ``+ 1e-7``).
NORM_EPS = 1e-7


# ---------------------------------------------------------------------------------------------------------------------
# Projection head and small helpers
# ---------------------------------------------------------------------------------------------------------------------


class ProjectionHead(nn.Module):
    """``Conv1x1(C->C, bias) -> ReLU -> Conv1x1(C->D, bias) -> L2-normalise`` (original ``ProjectionHead`` in cwcl.py).

    The head is pixel-wise, so :meth:`forward_vectors` applies it to gathered pixel features only: the losses need a
    few thousand sampled pixels, not the whole ``/4`` map, which saves most of the head's compute and memory.
    """

    def __init__(self, in_channels: int, out_channels: int = 256) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, in_channels, kernel_size=1, bias=True)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
        init_weights(self.conv1, self.conv2)  # the original's initialize_weights

    @staticmethod
    def _normalise(x: torch.Tensor, dim: int) -> torch.Tensor:
        # float32: the embeddings feed exp(dot / 0.07); bf16 rounding there is amplified ~14x.
        x = x.float()
        return x / (x.norm(dim=dim, keepdim=True) + NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``N x C x H x W`` -> ``N x D x H x W`` unit vectors along channels (float32)."""
        return self._normalise(self.conv2(F.relu(self.conv1(x))), dim=1)

    def forward_vectors(self, v: torch.Tensor) -> torch.Tensor:
        """``... x C`` pixel features -> ``... x D`` unit vectors (float32); same maths as :meth:`forward`."""
        h = F.relu(F.linear(v, self.conv1.weight.flatten(1), self.conv1.bias))
        return self._normalise(F.linear(h, self.conv2.weight.flatten(1), self.conv2.bias), dim=-1)


def resize_labels(labels: torch.Tensor, size: tuple[int, int] | torch.Size) -> torch.Tensor:
    """Nearest-neighbour resize of ``N x H x W`` integer labels to ``N x h x w`` (as the original's ``F.interpolate``)."""
    if labels.dim() != 3:
        raise ValueError(f"labels must be N x H x W, got shape {tuple(labels.shape)}")
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    # Values <= 255 are exact in float32.
    return F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest")[:, 0].long()


def gather_pixels(feat: torch.Tensor, batch: torch.Tensor, pixel: torch.Tensor) -> torch.Tensor:
    """Rows of a feature map at (image, pixel) pairs.

    Args:
        feat: ``N x C x h x w`` (NCHW or channels_last; no copy of the map is made).
        batch, pixel: equal-shaped long tensors, ``pixel`` indexes the flattened ``h * w`` grid.

    Returns:
        ``batch.shape + (C,)``.
    """
    flat = feat.flatten(2)  # N x C x P, a view for both memory formats
    return flat[batch, :, pixel]


def uniform_scores(shape: tuple[int, ...], device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
    """Uniform ``[0, 1)`` scores; the generator must live on ``device`` (CPU generator for CPU tensors)."""
    return torch.rand(shape, device=device, generator=generator)


def _class_ids(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Map labels outside ``[0, K)`` (255, or any other ignore value) to the sentinel ``K``."""
    ok = (labels >= 0) & (labels < num_classes)
    return torch.where(ok, labels, torch.full_like(labels, num_classes))


def _group_ranks(group: torch.Tensor, scores: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, ...]:
    """Order every image's pixels by (group, score) and give each its rank inside its group.

    Args:
        group: ``N x P`` long group id in ``[0, num_groups)``.
        scores: ``N x P`` float, the random order inside a group (ascending).

    Returns:
        ``(sorted_pixel, sorted_group, rank, counts)``: ``N x P`` pixel indices in (group, score) order, their
        groups, their 0-based rank inside the group, and ``N x num_groups`` group sizes.
    """
    # Two stable sorts instead of one sort on (group + score): no float-precision ties, exact lexicographic order.
    perm = torch.sort(scores, dim=1, stable=True).indices
    g_perm = group.gather(1, perm)
    g_sorted, order = torch.sort(g_perm, dim=1, stable=True)
    sorted_pixel = perm.gather(1, order)
    counts = torch.zeros(group.shape[0], num_groups, dtype=torch.long, device=group.device)
    counts.scatter_add_(1, group, torch.ones_like(group))
    starts = counts.cumsum(1) - counts
    position = torch.arange(group.shape[1], device=group.device).expand_as(group)
    rank = position - starts.gather(1, g_sorted)
    return sorted_pixel, g_sorted, rank, counts


def info_nce(pos: torch.Tensor, neg: torch.Tensor, neg_mask: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """Per-anchor InfoNCE, ``-log(exp(pos/T) / (exp(pos/T) + sum_j exp(neg_j/T)))``.

    Equals the original's ``CrossEntropyLoss(reduction='none')`` with target 0 over ``[pos, negs] / T``.

    Args:
        pos: ``...`` positive similarities.
        neg: ``... x J`` negative similarities.
        neg_mask: ``... x J`` bool, True where a negative counts (None: all count).
        temperature: ``T`` (0.07 in BlindNet).

    Returns:
        ``...`` float32 losses (0 for an anchor without negatives).
    """
    pos = pos.float() / temperature
    neg = neg.float() / temperature
    if neg_mask is not None:
        neg = neg.masked_fill(~neg_mask, float("-inf"))
    logits = torch.cat([pos.unsqueeze(-1), neg], dim=-1)
    return torch.logsumexp(logits, dim=-1) - pos


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``values`` where ``mask``; 0 (still attached to the graph) when nothing is selected, never NaN."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


# ---------------------------------------------------------------------------------------------------------------------
# CWCL
# ---------------------------------------------------------------------------------------------------------------------


class CWCLSample(NamedTuple):
    """Pixels chosen for CWCL in every image: ``S`` class slots of ``V`` views each, flattened to ``A = S * V``.

    Attributes:
        index: ``N x A`` long pixel index (into ``h * w``); slot ``s`` holds entries ``s*V .. s*V+V-1``.
        label: ``N x A`` long ground-truth class of each sampled pixel.
        valid: ``N x A`` bool; False only where an image had too few labelled pixels to fill the entry.
        slot_class: ``N x S`` long class of each slot, -1 for a filler slot of random labelled pixels.
    """

    index: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.index: read by name
    label: torch.Tensor
    valid: torch.Tensor
    slot_class: torch.Tensor


def _class_slots(cls: torch.Tensor, k: int, s: int, min_pixels: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which classes get one of the ``s`` slots per image: the first ``s`` (ascending id) with more than
    ``min_pixels`` pixels. ``cls`` is ``N x P`` class ids (``k`` = ignore).

    Returns ``selected`` (``N x k`` bool), ``class_to_slot`` (``N x (k + 1)``, -1 = no slot; the last column is the
    ignore id) and ``slot_class`` (``N x s``, -1 = empty slot).
    """
    n, dev = cls.shape[0], cls.device
    counts = torch.zeros(n, k + 1, dtype=torch.long, device=dev).scatter_add_(1, cls, torch.ones_like(cls))
    eligible = counts[:, :k] > min_pixels
    rank = eligible.cumsum(1) - 1
    selected = eligible & (rank < s)
    class_to_slot = torch.where(selected, rank, torch.full_like(rank, -1))
    class_to_slot = torch.cat([class_to_slot, class_to_slot.new_full((n, 1), -1)], dim=1)  # ignore -> no slot
    slot_class = torch.full((n, s + 1), -1, dtype=torch.long, device=dev)
    class_range = torch.arange(k, device=dev).expand(n, k)
    slot_class.scatter_(1, torch.where(selected, rank, torch.full_like(rank, s)), class_range)
    return selected, class_to_slot, slot_class[:, :s].contiguous()  # column s collected the non-selected classes


def _fill_empty_slots(
    index: torch.Tensor,
    valid: torch.Tensor,
    cls: torch.Tensor,
    selected: torch.Tensor,
    scores: torch.Tensor,
    k: int,
    v: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Filler slots (those after the last class slot) take labelled pixels not chosen yet, in ``scores`` order.

    When the pool runs short the order wraps around (repeats), and an image with no pool at all stays invalid.
    ``index``/``valid`` are ``N x A``; returns them updated.
    """
    (n, a), p, dev = index.shape, cls.shape[1], index.device
    # Unfilled entries point at a dump column p, so they cannot clear a real pixel's flag.
    chosen_at = torch.where(valid, index, torch.full_like(index, p))
    chosen = torch.zeros(n, p + 1, dtype=torch.bool, device=dev).scatter_(1, chosen_at, True)[:, :p]
    pool = (cls < k) & ~chosen
    n_pool = pool.sum(1, keepdim=True)
    order = torch.sort(torch.where(pool, scores, torch.full_like(scores, 2.0)), dim=1, stable=True).indices
    n_sel = selected.sum(1, keepdim=True)
    slot_of = torch.arange(a, device=dev).expand(n, a) // v
    filler = slot_of >= n_sel
    j = (torch.arange(a, device=dev).expand(n, a) - n_sel * v).clamp(min=0) % n_pool.clamp(min=1)
    index = torch.where(filler, order.gather(1, j), index)
    valid = torch.where(filler, (n_pool > 0).expand(n, a), valid)
    return index, valid


def sample_cwcl(
    labels: torch.Tensor,
    pred: torch.Tensor,
    *,
    num_classes: int,
    max_classes: int = 15,
    max_views: int = 50,
    min_pixels: int = 50,
    fill_empty_slots: bool = True,
    scores: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> CWCLSample:
    """CWCL anchor sampling (original ``Class_PixelNCELoss._hard_anchor_sampling`` in cwcl.py), vectorised.

    Per image: classes with **more than** ``min_pixels`` pixels, the first ``max_classes`` in ascending id order
    (the original's ``torch.unique`` order). Per class ``max_views`` pixels split hard (``pred != label``) / easy,
    half and half when both pools allow, otherwise the short pool is taken whole and the other fills up; inside a
    pool the pixels with the smallest scores are taken. Unused class slots are filled with random labelled pixels
    not chosen yet (the original's intent; its uint8 ``~`` bug drew them from all pixels, 255 included). When no
    image of the batch has an eligible class, every entry is invalid, so the level's CWCL is 0 (as the original).

    Args:
        labels: ``N x P`` ground truth at the level's resolution (255 = ignore).
        pred: ``N x P`` predicted class of the original view (hard/easy split).
        scores: ``2 x N x P`` uniform scores: ``[0]`` orders pixels inside a class pool, ``[1]`` orders the filler
            pool. Drawn from ``generator`` when None.

    Returns:
        :class:`CWCLSample` with ``A = max_classes * max_views``.
    """
    if labels.shape != pred.shape or labels.dim() != 2:
        raise ValueError(f"labels and pred must both be N x P, got {tuple(labels.shape)} and {tuple(pred.shape)}")
    n, p = labels.shape
    k, s, v = num_classes, max_classes, max_views
    dev = labels.device
    if scores is None:
        scores = uniform_scores((2, n, p), dev, generator)
    cls = _class_ids(labels.long(), k)

    selected, class_to_slot, slot_class = _class_slots(cls, k, s, min_pixels)

    # --- groups: (slot, hard) = 2*slot, (slot, easy) = 2*slot + 1, everything else = 2*S ----------------------------
    pix_slot = class_to_slot.gather(1, cls)
    easy = (pred.long() == cls).long()
    group = torch.where(pix_slot >= 0, 2 * pix_slot + easy, torch.full_like(pix_slot, 2 * s))
    sorted_pixel, g_sorted, rank_in_group, gcounts = _group_ranks(group, scores[0], 2 * s + 1)

    n_hard, n_easy = gcounts[:, 0 : 2 * s : 2], gcounts[:, 1 : 2 * s : 2]  # N x S
    half = v // 2
    # The original's rule (2*n >= V compares like its n >= V / 2 in floats).
    hard_ok, easy_ok = 2 * n_hard >= v, 2 * n_easy >= v
    hard_keep = torch.where(hard_ok & easy_ok, torch.full_like(n_hard, half), torch.where(hard_ok, v - n_easy, n_hard))
    hard_keep = hard_keep.clamp(min=0).minimum(n_hard)
    easy_keep = (v - hard_keep).minimum(n_easy)  # short only if a class has < V pixels (min_pixels < V)
    keep = torch.stack([hard_keep, easy_keep], dim=2).flatten(1)  # N x 2S, interleaved like the groups
    keep = torch.cat([keep, keep.new_zeros(n, 1)], dim=1)
    offset = torch.stack([torch.zeros_like(hard_keep), hard_keep], dim=2).flatten(1)
    offset = torch.cat([offset, offset.new_zeros(n, 1)], dim=1)

    take = rank_in_group < keep.gather(1, g_sorted)
    dest = (g_sorted // 2) * v + offset.gather(1, g_sorted) + rank_in_group
    a = s * v
    dest = torch.where(take, dest, torch.full_like(dest, a))  # column A is a dump for pixels not taken
    index = torch.zeros(n, a + 1, dtype=torch.long, device=dev).scatter_(1, dest, sorted_pixel)[:, :a]
    valid = torch.zeros(n, a + 1, dtype=torch.bool, device=dev).scatter_(1, dest, take)[:, :a]

    if fill_empty_slots:
        index, valid = _fill_empty_slots(index, valid, cls, selected, scores[1], k, v)

    # The original gives up on the whole level when no image of the batch has an eligible class (its sampler returns
    # nothing and the level adds 0); filler pixels alone would only contrast random pixels with each other.
    valid = valid & selected.any()
    label = cls.gather(1, index)
    return CWCLSample(index, label, valid, slot_class)


def cwcl_from_embeddings(
    q: torch.Tensor,
    k: torch.Tensor,
    label: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float = 0.07,
    negatives: Literal["paper", "original"] = "paper",
) -> torch.Tensor:
    """CWCL on sampled embeddings (original ``Class_PixelNCELoss._contrastive`` in cwcl.py).

    Anchor ``i`` of image ``n`` = ``q[n, i]`` (augmented view); positive = ``k[n, i]`` (original view, same pixel,
    detached here); negatives = keys ``k[n, j]`` of the same image:

    * ``"paper"``: keys of a *different* ground-truth class (what the paper describes and the code intended);
    * ``"original"``: *all* sampled keys of the image, the anchor's own positive and its class included -- what the
      shipped code computes, because its uint8 exclusion mask is inverted with ``~`` (a bitwise NOT).

    Args:
        q: ``N x A x D`` unit anchor embeddings. k: ``N x A x D`` unit key embeddings.
        label: ``N x A`` class of each sample. valid: ``N x A`` bool.

    Returns:
        scalar float32: mean over valid anchors (0 with a graph if none).
    """
    k = k.detach()
    sim = torch.einsum("nad,nbd->nab", q.float(), k.float())  # N x A x A
    pos = sim.diagonal(dim1=1, dim2=2)
    loss = info_nce(pos, sim, cwcl_negative_mask(label, valid, negatives), temperature)
    return masked_mean(loss, valid)


def cwcl_negative_mask(
    label: torch.Tensor, valid: torch.Tensor, negatives: Literal["paper", "original"] = "paper"
) -> torch.Tensor:
    """Which keys are negatives of which anchor in CWCL.

    Args:
        label: ``N x A`` class of each sample. valid: ``N x A`` bool.
        negatives: ``"paper"`` (keys of another class) or ``"original"`` (every valid key of the image).

    Returns:
        ``N x A x A`` bool, ``[n, i, j]`` = key ``j`` is a negative of anchor ``i``.
    """
    if negatives not in ("paper", "original"):
        raise ValueError(f"negatives must be 'paper' or 'original', got {negatives!r}")
    mask = valid[:, None, :].expand(-1, label.shape[1], -1)
    if negatives == "paper":
        mask = mask & (label[:, :, None] != label[:, None, :])
    return mask


# ---------------------------------------------------------------------------------------------------------------------
# SDCL
# ---------------------------------------------------------------------------------------------------------------------


class SDCLSample(NamedTuple):
    """SDCL anchors (fixed count ``M = N * max_anchors_per_image``, padded) and per-(image, class) negatives.

    Attributes:
        batch, pixel: ``M`` long image and pixel index of each anchor.
        wrong: ``M`` long class the augmented view predicts there (the negatives' class).
        valid: ``M`` bool, False for padding.
        neg_index: ``N x K x R`` long pixel indices of the ``R`` negatives of each (image, class).
        neg_valid: ``N x K`` bool, True where the class has at least ``R`` ground-truth pixels in the image.
    """

    batch: torch.Tensor
    pixel: torch.Tensor
    wrong: torch.Tensor
    valid: torch.Tensor
    neg_index: torch.Tensor
    neg_valid: torch.Tensor


def sample_sdcl(
    labels: torch.Tensor,
    pred_k: torch.Tensor,
    pred_q: torch.Tensor,
    *,
    num_classes: int,
    num_negatives: int = 20,
    max_anchors_per_image: int = 1000,
    scores: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> SDCLSample:
    """SDCL sampling (original ``Disentangle_Contrast`` in sdcl.py), vectorised.

    Anchors: pixels the original view predicts right and the augmented view predicts differently
    (``pred_k == label != 255`` and ``pred_q != pred_k``) whose wrong class ``w = pred_q`` has at least
    ``num_negatives`` ground-truth pixels in the image (the original skips the others). At most
    ``N * max_anchors_per_image`` anchors over the batch: the ones with the largest scores (a uniform random subset).
    Negatives: per (image, class), the ``num_negatives`` pixels of that class with the smallest scores, drawn once
    and shared by all anchors of that wrong class, as the original does.

    Args:
        labels: ``N x P`` ground truth at the level's resolution. pred_k / pred_q: ``N x P`` predictions of the
            original / augmented view.
        scores: ``2 x N x P`` uniform scores: ``[0]`` picks anchors, ``[1]`` picks negatives. Drawn from
            ``generator`` when None.
    """
    if not (labels.shape == pred_k.shape == pred_q.shape) or labels.dim() != 2:
        raise ValueError(
            f"labels, pred_k, pred_q must all be N x P, got {tuple(labels.shape)}, {tuple(pred_k.shape)}, "
            f"{tuple(pred_q.shape)}"
        )
    n, p = labels.shape
    k, r = num_classes, num_negatives
    dev = labels.device
    if scores is None:
        scores = uniform_scores((2, n, p), dev, generator)
    cls = _class_ids(labels.long(), k)
    pred_k, pred_q = pred_k.long(), pred_q.long()

    # --- negatives: first R pixels of every class in score order ----------------------------------------------------
    sorted_pixel, g_sorted, rank, counts = _group_ranks(cls, scores[1], k + 1)
    take = (rank < r) & (g_sorted < k)
    dest = torch.where(take, g_sorted * r + rank, torch.full_like(rank, k * r))
    neg_index = torch.zeros(n, k * r + 1, dtype=torch.long, device=dev).scatter_(1, dest, sorted_pixel)
    neg_index = neg_index[:, : k * r].view(n, k, r)
    neg_valid = counts[:, :k] >= r

    # --- anchors --------------------------------------------------------------------------------------------------
    wrong = pred_q.clamp(0, k - 1)
    anchor = (cls < k) & (pred_k == cls) & (pred_q != pred_k) & neg_valid.gather(1, wrong)
    m = min(n * max_anchors_per_image, n * p)
    # top-k of random keys = a uniform random subset, with a fixed output size (no host sync to count anchors).
    key = torch.where(anchor, scores[0], torch.full_like(scores[0], -1.0)).flatten()
    top = key.topk(m, sorted=True).indices
    valid = key[top] >= 0
    batch, pixel = top // p, top % p
    return SDCLSample(batch, pixel, wrong.flatten()[top], valid, neg_index, neg_valid)


def sdcl_from_embeddings(
    q_anchor: torch.Tensor,
    k_pos: torch.Tensor,
    q_neg: torch.Tensor,
    valid: torch.Tensor,
    *,
    temperature: float = 0.07,
) -> torch.Tensor:
    """SDCL on gathered embeddings (original ``Disentangle_Contrast._contrastive``).

    Args:
        q_anchor: ``M x D`` augmented-view anchors. k_pos: ``M x D`` original-view positives (detached here).
        q_neg: ``M x R x D`` augmented-view negatives (not detached, as in the original).
        valid: ``M`` bool.

    Returns:
        scalar float32: mean over valid anchors (0 with a graph if none).
    """
    pos = (q_anchor.float() * k_pos.detach().float()).sum(-1)
    neg = torch.einsum("md,mrd->mr", q_anchor.float(), q_neg.float())
    return masked_mean(info_nce(pos, neg, None, temperature), valid)
