"""The BlindNet training task: the deployable network plus everything only training needs.

``BlindNetTask(model, LossConfig())`` holds the :class:`~blindnet.models.DeepLabV3Plus`, the auxiliary head ``dsn``
on layer3 and the three projection heads, and turns ``(x, x_a, target)`` into the weighted sum of

* cross-entropy on both views, averaged (full-resolution logits, ignore 255),
* ``0.4 *`` auxiliary cross-entropy on the original view's layer3 (``dsn``, target nearest-downsampled),
* ``0.2 * CML + 0.2 * CCL`` on the three InstanceNorm outputs,
* ``0.3 * CWCL + 0.3 * SDCL`` on encoder layer4, the 304-channel decoder concat and the 256-channel decoder feature,
* optionally an L2 / MMD / cosine alignment between the two views' features (pixel-aligned appearances).

This is the original ``DeepV3Plus.forward`` training branch (``network/deepv3.py``) plus ``train.py``'s loss sum.
As in the original, each view is forwarded separately, so BatchNorm statistics are per view.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from blindnet.config import from_dict
from blindnet.losses.alignment import ALIGNMENT_LOSSES, AlignKind, alignment_loss
from blindnet.losses.contrastive import (
    ProjectionHead,
    cwcl_from_embeddings,
    gather_pixels,
    resize_labels,
    sample_cwcl,
    sample_sdcl,
    sdcl_from_embeddings,
)
from blindnet.losses.covariance import covariance_matching_loss, cross_covariance_loss
from blindnet.models.deeplabv3plus import DeepLabV3Plus, SegFeatures, init_weights

#: Contrastive levels (``SegFeatures`` field names), in the original's order ``ProjectionHead_cls_0/1/2``.
CONTRASTIVE_LEVELS: tuple[str, ...] = ("layer4", "dec0", "dec1")
#: Feature names an alignment loss may use; ``styleI`` is the I-th InstanceNorm output (BlindNet models only).
ALIGN_LEVELS: tuple[str, ...] = ("style0", "style1", "style2", "layer3", "layer4", "dec0", "dec1")
#: BlindNet's four training-only losses, in the paper's order (encoder CML, CCL; decoder CWCL, SDCL).
BLINDNET_LOSSES: tuple[str, ...] = ("cml", "ccl", "cwcl", "sdcl")
#: Keys of the dict returned by :meth:`BlindNetTask.forward` (plus ``"align"`` when an alignment loss is on).
LOSS_KEYS: tuple[str, ...] = ("loss", "ce", "aux", *BLINDNET_LOSSES)


@dataclass
class LossConfig:
    """Loss weights and the losses' hyper-parameters (defaults = the paper / original scripts).

    Attributes:
        cml, ccl, cwcl, sdcl: weights of the four BlindNet losses (0.2, 0.2, 0.3, 0.3). A weight of 0 switches the
            term off completely: it is not computed and its head is not built.
        aux: weight of the auxiliary layer3 cross-entropy (0.4); 0 drops the ``dsn`` head.
        temperature: InfoNCE temperature of CWCL and SDCL (the original's ``nce_T`` = 0.07).
        proj_dim: projection-head output width (256).
        cwcl_max_classes: class slots per image (15). cwcl_max_views: pixels per slot (50).
        cwcl_min_pixels: a class needs **more than** this many pixels at the level's resolution (50).
        cwcl_negatives: ``"paper"`` (keys of other classes only) or ``"original"`` (all keys of the image, same
            class and the anchor's own positive included: the shipped code's uint8 ``~`` bug).
        cwcl_fill_slots: fill unused class slots with random labelled pixels, as the original does.
        sdcl_num_negatives: negatives per (image, wrong class) (20); classes with fewer GT pixels are skipped.
        sdcl_max_anchors_per_image: SDCL keeps at most ``N * this`` anchors per level (1000).
        align: weight of the feature-alignment loss (0 = off). align_kind: ``none``, ``l2``, ``mmd``, ``cosine``.
        align_levels: features to align (names in :data:`ALIGN_LEVELS`), averaged.
        align_detach_original: stop the alignment gradient through the original view (default symmetric).
        align_mmd_samples: pixels per image for MMD.
        ignore_index: label ignored everywhere (255).
        views: ``2`` (the paper): cross-entropy on x and x_a, averaged. ``1``: cross-entropy on x only and x_a is not
            forwarded, the common single-view baseline; every term that compares the two views must then be 0.
        style_features: what CML/CCL (and ``style*`` alignment levels) read. ``"original"`` (default): each
            InstanceNorm output as the original's losses saw it, which for ShuffleNetV2's stem is the feature *after*
            the following ReLU (the original's in-place ReLU overwrote it; the published numbers come from that).
            ``"pre_activation"``: every InstanceNorm output before any activation. ResNet-50 and MobileNetV2 give
            the same features either way.
    """

    cml: float = 0.2
    ccl: float = 0.2
    cwcl: float = 0.3
    sdcl: float = 0.3
    aux: float = 0.4
    temperature: float = 0.07
    proj_dim: int = 256
    cwcl_max_classes: int = 15
    cwcl_max_views: int = 50
    cwcl_min_pixels: int = 50
    cwcl_negatives: Literal["paper", "original"] = "paper"
    cwcl_fill_slots: bool = True
    sdcl_num_negatives: int = 20
    sdcl_max_anchors_per_image: int = 1000
    align: float = 0.0
    align_kind: AlignKind = "none"
    align_levels: tuple[str, ...] = field(default=("layer3", "layer4"))
    align_detach_original: bool = False
    align_mmd_samples: int = 256
    ignore_index: int = 255
    style_features: Literal["original", "pre_activation"] = "original"
    views: int = 2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["align_levels"] = list(self.align_levels)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LossConfig:
        """Build from a dict; unknown keys are an error (a typo must not silently change the objective)."""
        cfg = from_dict(cls, data)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        for name in (*BLINDNET_LOSSES, "aux", "align"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.style_features not in ("original", "pre_activation"):
            raise ValueError(f"style_features must be 'original' or 'pre_activation', got {self.style_features!r}")
        if self.cwcl_negatives not in ("paper", "original"):
            raise ValueError(f"cwcl_negatives must be 'paper' or 'original', got {self.cwcl_negatives!r}")
        for name in (
            "proj_dim",
            "cwcl_max_classes",
            "cwcl_max_views",
            "sdcl_num_negatives",
            "sdcl_max_anchors_per_image",
            "align_mmd_samples",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.align_kind != "none" and self.align_kind not in ALIGNMENT_LOSSES:
            raise ValueError(f"align_kind must be 'none' or one of {sorted(ALIGNMENT_LOSSES)}, got {self.align_kind!r}")
        if self.align > 0 and self.align_kind == "none":
            raise ValueError("align > 0 needs align_kind 'l2', 'mmd' or 'cosine' (got 'none')")
        bad = [lv for lv in self.align_levels if lv not in ALIGN_LEVELS]
        if bad:
            raise ValueError(f"unknown align level(s) {bad}; choose from {list(ALIGN_LEVELS)}")
        if self.align > 0 and not self.align_levels:
            raise ValueError("align > 0 needs at least one align level")
        if self.views not in (1, 2):
            raise ValueError(f"views must be 1 or 2, got {self.views}")
        two_view = [name for name in (*BLINDNET_LOSSES, "align") if getattr(self, name) > 0]
        if self.views == 1 and two_view:
            raise ValueError(f"views=1 forwards x only, but {two_view} compare x with x_a: set them to 0 or views=2")

    @property
    def uses_alignment(self) -> bool:
        return self.align > 0 and self.align_kind != "none"


def _blindnet_only(**weights: float) -> LossConfig:
    base: dict[str, Any] = {"cml": 0.0, "ccl": 0.0, "cwcl": 0.0, "sdcl": 0.0}  # LossConfig keyword arguments
    base.update(weights)
    return LossConfig(**base)


#: One loss configuration per row of the paper's Table 4 (loss ablation). Every row keeps the two-view
#: cross-entropy and the 0.4 auxiliary head (part of the training recipe, not of BlindNet's contribution).
#: Use :func:`ablation` to get a private copy.
ABLATIONS: dict[str, LossConfig] = {
    "baseline": _blindnet_only(),  # CE on both views (+ aux) only
    "cml": _blindnet_only(cml=0.2),
    "ccl": _blindnet_only(ccl=0.2),
    "cml+ccl": _blindnet_only(cml=0.2, ccl=0.2),
    "cwcl": _blindnet_only(cwcl=0.3),
    "sdcl": _blindnet_only(sdcl=0.3),
    "cwcl+sdcl": _blindnet_only(cwcl=0.3, sdcl=0.3),
    "blindnet": LossConfig(),  # all four losses: full BlindNet
}


def ablation(name: str) -> LossConfig:
    """A fresh copy of the :data:`ABLATIONS` entry ``name``."""
    try:
        return replace(ABLATIONS[name])
    except KeyError:
        raise KeyError(f"unknown ablation {name!r}; choose one of {list(ABLATIONS)}") from None


def build_aux_head(in_channels: int, num_classes: int) -> nn.Sequential:
    """The original ``dsn``: 3x3 conv in->512 (bias), BN, ReLU, Dropout2d(0.1), 1x1 conv 512->classes (bias)."""
    head = nn.Sequential(
        nn.Conv2d(in_channels, 512, kernel_size=3, padding=1, bias=True),
        nn.BatchNorm2d(512),
        nn.ReLU(inplace=True),
        nn.Dropout2d(0.1),
        nn.Conv2d(512, num_classes, kernel_size=1, bias=True),
    )
    init_weights(head)
    return head


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Mean CE over labelled pixels; 0 (with a graph) for an all-ignored batch instead of NaN."""
    total = F.cross_entropy(logits.float(), target, ignore_index=ignore_index, reduction="sum")
    count = (target != ignore_index).sum().clamp(min=1)
    return total / count


class BlindNetTask(nn.Module):
    """Model + training-only heads + losses. ``task(x, x_a, target)`` -> dict of losses.

    Attributes:
        model: the deployable :class:`DeepLabV3Plus` (what :meth:`get_eval_model` returns).
        dsn: auxiliary layer3 head (None when ``loss.aux == 0``).
        projection: ``ModuleDict`` ``{"layer4", "dec0", "dec1"}`` of :class:`ProjectionHead` (None when CWCL and SDCL
            are both off).
        loss_config: the :class:`LossConfig`.
        generator: optional ``torch.Generator`` (on the model's device) for the samplers; default: global RNG.
        projection_mode: ``auto`` (default), ``dense`` or ``sparse``: how the projection heads are applied.
    """

    def __init__(self, model: DeepLabV3Plus, loss: LossConfig | None = None) -> None:
        super().__init__()
        loss = loss if loss is not None else LossConfig()
        loss.validate()
        self.model = model
        self.loss_config = loss
        self.generator: torch.Generator | None = None
        # "auto" picks dense or sparse projection per level by cost; both give the same numbers (tested).
        self.projection_mode: Literal["auto", "dense", "sparse"] = "auto"
        encoder = model.encoder
        has_style = len(getattr(encoder, "style_channels", ())) > 0
        if (loss.cml > 0 or loss.ccl > 0) and not has_style:
            raise ValueError(
                "CML/CCL need the InstanceNorm layers: build the model with ModelConfig(instance_norm=True), or set "
                "cml=ccl=0 for the plain DeepLabV3+ baseline"
            )
        if loss.uses_alignment and not has_style and any(lv.startswith("style") for lv in loss.align_levels):
            raise ValueError("style* alignment levels need a model with InstanceNorm layers (instance_norm=True)")
        n_style = len(getattr(encoder, "style_channels", ()))
        for lv in loss.align_levels if loss.uses_alignment else ():
            if lv.startswith("style") and int(lv[5:]) >= n_style:
                raise ValueError(f"align level {lv!r}: the model has only {n_style} style features")

        self.dsn = build_aux_head(encoder.layer3_channels, model.config.num_classes) if loss.aux > 0 else None
        self.projection: nn.ModuleDict | None
        if loss.cwcl > 0 or loss.sdcl > 0:
            widths = {"layer4": encoder.out_channels, "dec0": model.dec0_channels, "dec1": model.dec1_channels}
            self.projection = nn.ModuleDict(
                {lv: ProjectionHead(widths[lv], loss.proj_dim) for lv in CONTRASTIVE_LEVELS}
            )
        else:
            self.projection = None

    # ---- the parts that are not the deployable model ------------------------------------------------------------

    def _extras(self) -> nn.ModuleDict:
        extras = nn.ModuleDict()
        if self.dsn is not None:
            extras["dsn"] = self.dsn
        if self.projection is not None:
            extras["projection"] = self.projection
        return extras

    def get_eval_model(self) -> DeepLabV3Plus:
        """The bare deployable network (the same object, sharing weights; call ``.eval()`` before inference)."""
        return self.model

    def get_task_state(self) -> dict[str, torch.Tensor]:
        """State of the training-only heads (``dsn.*``, ``projection.*``), without any ``model.*`` key."""
        return self._extras().state_dict()

    def load_task_state(self, state: dict[str, torch.Tensor]) -> None:
        """Load what :meth:`get_task_state` returned (strict: missing or unexpected keys are an error)."""
        result = self._extras().load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise KeyError(
                f"task state does not match this task's heads: missing {result.missing_keys}, "
                f"unexpected {result.unexpected_keys}"
            )

    # ---- forward --------------------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, x_a: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """One training forward pass.

        Args:
            x: ``N x 3 x H x W`` original view. x_a: ``N x 3 x H x W`` augmented view (same geometry).
            target: ``N x H x W`` long train ids (255 = ignore).

        Returns:
            ``{"loss", "ce", "aux", "cml", "ccl", "cwcl", "sdcl"}`` (+ ``"align"`` when on): scalar float32 tensors.
            ``"loss"`` carries the graph; the others are detached for logging (0 for a switched-off term).
        """
        if x.shape != x_a.shape or x.dim() != 4:
            raise ValueError(f"x and x_a must be N x 3 x H x W of one shape, got {tuple(x.shape)}, {tuple(x_a.shape)}")
        if target.shape != (x.shape[0], *x.shape[2:]):
            raise ValueError(f"target must be N x H x W = {(x.shape[0], *x.shape[2:])}, got {tuple(target.shape)}")
        cfg = self.loss_config
        target = target.long()
        # Two views: two separate forwards, as the original (BN normalises each view with its own batch statistics).
        f = self.model.forward_features(x)
        ce = _cross_entropy(f.logits, target, cfg.ignore_index)
        fa = self.model.forward_features(x_a) if cfg.views == 2 else None
        if fa is not None:
            ce = 0.5 * (ce + _cross_entropy(fa.logits, target, cfg.ignore_index))
        total = ce
        zero = torch.zeros((), device=ce.device, dtype=torch.float32)
        terms: dict[str, torch.Tensor] = {"ce": ce}

        if self.dsn is not None:
            aux_target = resize_labels(target, f.layer3.shape[-2:])
            terms["aux"] = _cross_entropy(self.dsn(f.layer3), aux_target, cfg.ignore_index)
            total = total + cfg.aux * terms["aux"]
        if fa is not None:
            total = self._two_view_terms(f, fa, target, total, terms)
        out = {"loss": total}
        for key in LOSS_KEYS[1:]:
            out[key] = terms[key].detach() if key in terms else zero
        if "align" in terms:
            out["align"] = terms["align"].detach()
        return out

    def _two_view_terms(
        self, f: SegFeatures, fa: SegFeatures, target: torch.Tensor, total: torch.Tensor, terms: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """Add the switched-on terms comparing the views (CML, CCL, CWCL, SDCL, alignment) to ``total`` and ``terms``."""
        cfg = self.loss_config
        style, style_a = self.style_features(f), self.style_features(fa)
        if cfg.cml > 0:
            terms["cml"] = covariance_matching_loss(style, style_a)
            total = total + cfg.cml * terms["cml"]
        if cfg.ccl > 0:
            terms["ccl"] = cross_covariance_loss(style, style_a)
            total = total + cfg.ccl * terms["ccl"]
        if self.projection is not None:
            cwcl, sdcl = self._contrastive(f, fa, target)
            if cwcl is not None:
                terms["cwcl"] = cwcl
                total = total + cfg.cwcl * cwcl
            if sdcl is not None:
                terms["sdcl"] = sdcl
                total = total + cfg.sdcl * sdcl
        if cfg.uses_alignment:
            terms["align"] = self._alignment(f, fa, style, style_a)
            total = total + cfg.align * terms["align"]
        return total

    def style_features(self, feats: SegFeatures) -> tuple[torch.Tensor, ...]:
        """The style features CML/CCL read, per :attr:`LossConfig.style_features` (shapes as ``feats.style``).

        ``"original"`` applies a ReLU where the original's in-place ReLU overwrote the InstanceNorm output (the
        encoder's ``style_after_relu_in_original``); the gradient then flows through that ReLU, as in the original.
        """
        if self.loss_config.style_features == "pre_activation":
            return feats.style
        flags = getattr(self.model.encoder, "style_after_relu_in_original", ())
        return tuple(F.relu(s) if i < len(flags) and flags[i] else s for i, s in enumerate(feats.style))

    def _contrastive(
        self, f: SegFeatures, fa: SegFeatures, target: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """CWCL and SDCL, each averaged over the three levels (a level without samples adds 0 and still counts)."""
        cfg = self.loss_config
        assert self.projection is not None
        num_classes = self.model.config.num_classes
        # Sampling uses the decoder-resolution predictions (argmax of logits_low), as the original's argmax(dec2).
        with torch.no_grad():
            pred_k_low = f.logits_low.argmax(1)
            pred_q_low = fa.logits_low.argmax(1)
        cwcl_sum: torch.Tensor | None = None
        sdcl_sum: torch.Tensor | None = None
        for level in CONTRASTIVE_LEVELS:
            head: ProjectionHead = self.projection[level]  # type: ignore[assignment]
            fk: torch.Tensor = getattr(f, level).detach()  # the key view never gets gradient from these losses
            fq: torch.Tensor = getattr(fa, level)
            n = fq.shape[0]
            size = fq.shape[-2:]
            labels = resize_labels(target, size).flatten(1)
            pred_k = resize_labels(pred_k_low, size).flatten(1)
            embed_q, embed_k = self._embedders(head, fq, fk, num_classes)
            if cfg.cwcl > 0:
                smp = sample_cwcl(
                    labels,
                    pred_k,
                    num_classes=num_classes,
                    max_classes=cfg.cwcl_max_classes,
                    max_views=cfg.cwcl_max_views,
                    min_pixels=cfg.cwcl_min_pixels,
                    fill_empty_slots=cfg.cwcl_fill_slots,
                    generator=self.generator,
                )
                b = torch.arange(n, device=fq.device)[:, None].expand_as(smp.index)
                q = embed_q(b, smp.index)  # N x A x D
                k = embed_k(b, smp.index)
                loss = cwcl_from_embeddings(
                    q, k, smp.label, smp.valid, temperature=cfg.temperature, negatives=cfg.cwcl_negatives
                )
                cwcl_sum = loss if cwcl_sum is None else cwcl_sum + loss
            if cfg.sdcl > 0:
                pred_q = resize_labels(pred_q_low, size).flatten(1)
                smp_s = sample_sdcl(
                    labels,
                    pred_k,
                    pred_q,
                    num_classes=num_classes,
                    num_negatives=cfg.sdcl_num_negatives,
                    max_anchors_per_image=cfg.sdcl_max_anchors_per_image,
                    generator=self.generator,
                )
                q_anchor = embed_q(smp_s.batch, smp_s.pixel)  # M x D
                k_pos = embed_k(smp_s.batch, smp_s.pixel)
                nb = torch.arange(n, device=fq.device)[:, None, None].expand_as(smp_s.neg_index)
                neg_table = embed_q(nb, smp_s.neg_index)  # N x K x R x D
                q_neg = neg_table[smp_s.batch, smp_s.wrong]  # M x R x D
                loss = sdcl_from_embeddings(q_anchor, k_pos, q_neg, smp_s.valid, temperature=cfg.temperature)
                sdcl_sum = loss if sdcl_sum is None else sdcl_sum + loss
        n_levels = len(CONTRASTIVE_LEVELS)
        return (
            None if cwcl_sum is None else cwcl_sum / n_levels,
            None if sdcl_sum is None else sdcl_sum / n_levels,
        )

    def _embedders(
        self, head: ProjectionHead, fq: torch.Tensor, fk: torch.Tensor, num_classes: int
    ) -> tuple[
        Callable[[torch.Tensor, torch.Tensor], torch.Tensor], Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ]:
        """Functions ``(batch, pixel) -> ... x D`` embedding the augmented (query) and original (key, no grad) view.

        The head is pixel-wise, so projecting only the sampled pixels equals projecting the map and sampling it. Which
        one is cheaper depends on the map size (static shapes, decided without looking at data): dense wins on small
        maps (layer4 at /16, tiny test crops), sparse on the large ``/4`` decoder maps (768^2: ~31k sampled vectors
        instead of ~590k pixels of both views).
        """
        cfg = self.loss_config
        n, p = fq.shape[0], fq.shape[-2] * fq.shape[-1]
        n_sparse = 0
        if cfg.cwcl > 0:
            n_sparse += 2 * n * cfg.cwcl_max_classes * cfg.cwcl_max_views
        if cfg.sdcl > 0:
            n_sparse += 2 * min(n * cfg.sdcl_max_anchors_per_image, n * p) + n * num_classes * cfg.sdcl_num_negatives
        dense = 2 * n * p <= n_sparse if self.projection_mode == "auto" else self.projection_mode == "dense"
        if dense:
            q_map = head(fq)
            with torch.no_grad():
                k_map = head(fk)
            return (lambda b, i: gather_pixels(q_map, b, i)), (lambda b, i: gather_pixels(k_map, b, i))

        def embed_k(b: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return head.forward_vectors(gather_pixels(fk, b, i))

        return (lambda b, i: head.forward_vectors(gather_pixels(fq, b, i))), embed_k

    def _alignment(
        self,
        f: SegFeatures,
        fa: SegFeatures,
        style: tuple[torch.Tensor, ...],
        style_a: tuple[torch.Tensor, ...],
    ) -> torch.Tensor:
        cfg = self.loss_config
        total: torch.Tensor | None = None
        for level in cfg.align_levels:
            if level.startswith("style"):
                fk, fq = style[int(level[5:])], style_a[int(level[5:])]
            else:
                fk, fq = getattr(f, level), getattr(fa, level)
            if cfg.align_detach_original:
                fk = fk.detach()
            kwargs: dict[str, Any] = {}
            if cfg.align_kind == "mmd":
                kwargs = {"num_samples": cfg.align_mmd_samples, "generator": self.generator}
            loss = alignment_loss(cfg.align_kind, fq, fk, **kwargs)
            total = loss if total is None else total + loss
        assert total is not None
        return total / len(cfg.align_levels)
