"""BlindNetTask: loss assembly, ablation configs, head/state split, parameter counts, benchmark smoke run.

Tolerances: every number quoted next to one was measured with AVX-512 and with ATEN_CPU_CAPABILITY=default
ONEDNN_MAX_CPU_ISA=SSE41; the float32 losses agree to a few ulp (1.2e-7 relative each) or exactly, and the reference
forward of the original code runs the same torch ops as the model, so that comparison is exact.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

import blindnet.task as task_module
from blindnet.models import DeepLabV3Plus, ModelConfig, build_model, count_parameters
from blindnet.task import ABLATIONS, LOSS_KEYS, BlindNetTask, LossConfig, ablation
from tests.original_reference import original_forward

NUM_CLASSES = 19


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_model() -> DeepLabV3Plus:
    torch.manual_seed(0)
    return build_model(ModelConfig(backbone="mobilenetv2", num_classes=NUM_CLASSES))


def _batch(seed: int = 0, n: int = 2, size: int = 64) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=gen)
    x_a = 1.5 * x + 0.3 * torch.randn(n, 3, size, size, generator=gen)
    coarse = torch.randint(0, NUM_CLASSES, (n, 4, 4), generator=gen)
    target = coarse.repeat_interleave(size // 4, 1).repeat_interleave(size // 4, 2)
    target[:, :4] = 255
    return x, x_a, target


def _train_step(task: BlindNetTask, seed: int = 0) -> dict[str, torch.Tensor]:
    opt = torch.optim.SGD(task.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    task.train()
    out = task(*_batch(seed))
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    return out


def test_parameter_counts_match_the_paper() -> None:
    # Meta tensors: the count needs shapes only, not a 45M-parameter initialisation.
    with torch.device("meta"):
        blind = build_model(ModelConfig())
        base = build_model(ModelConfig(instance_norm=False))
        t_blind = BlindNetTask(blind, LossConfig())
        t_base = BlindNetTask(base, ablation("baseline"))
    assert t_blind.dsn is not None and t_base.dsn is not None
    assert count_parameters(blind) + count_parameters(t_blind.dsn) == 45_081_414
    assert count_parameters(base) + count_parameters(t_base.dsn) == 45_081_542
    # Projection heads (layer4 2048, dec0 304, dec1 256 -> 256) are not in the paper's count.
    assert t_blind.projection is not None
    assert count_parameters(t_blind.projection) == 4_720_896 + 170_800 + 131_584


@pytest.mark.numerics
@pytest.mark.parametrize("name", list(ABLATIONS))
def test_every_ablation_runs_a_training_step(tiny_model: DeepLabV3Plus, name: str, monkeypatch) -> None:
    calls: dict[str, int] = {}

    def spy(fn_name: str):
        real = getattr(task_module, fn_name)

        def wrapper(*args, **kwargs):
            calls[fn_name] = calls.get(fn_name, 0) + 1
            return real(*args, **kwargs)

        monkeypatch.setattr(task_module, fn_name, wrapper)

    for fn in ("covariance_matching_loss", "cross_covariance_loss", "cwcl_from_embeddings", "sdcl_from_embeddings"):
        spy(fn)
    cfg = ablation(name)
    task = BlindNetTask(copy.deepcopy(tiny_model), cfg)
    torch.manual_seed(1)
    before = {k: v.clone() for k, v in task.model.state_dict().items()}
    out = _train_step(task)
    assert set(out) == set(LOSS_KEYS)
    assert all(math.isfinite(v.item()) for v in out.values())
    assert out["ce"].item() > 0 and out["aux"].item() > 0
    assert out["loss"].requires_grad and not out["ce"].requires_grad
    weights = {"cml": cfg.cml, "ccl": cfg.ccl, "cwcl": cfg.cwcl, "sdcl": cfg.sdcl}
    counted = {
        "cml": calls.get("covariance_matching_loss", 0),
        "ccl": calls.get("cross_covariance_loss", 0),
        "cwcl": calls.get("cwcl_from_embeddings", 0),
        "sdcl": calls.get("sdcl_from_embeddings", 0),
    }
    for term, w in weights.items():
        if w == 0:
            assert out[term].item() == 0.0 and not out[term].requires_grad
            assert counted[term] == 0, f"{term} has weight 0 but was computed"
        else:
            assert counted[term] == (3 if term in ("cwcl", "sdcl") else 1)  # once per level / once over 3 layers
    expected = out["ce"] + 0.4 * out["aux"] + sum(w * out[t] for t, w in weights.items())
    # The same float32 terms summed (measured equal); rel 1e-5 allows another order of <= 7 additions, a few ulp.
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    # The SGD step moved the network.
    after = task.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if after[k].is_floating_point())
    assert (task.projection is None) == (cfg.cwcl == 0 and cfg.sdcl == 0)


def test_full_blindnet_losses_are_active_and_reach_every_head(tiny_model: DeepLabV3Plus) -> None:
    # Tiny maps: with the default 50-pixel minimum no class would be eligible and CWCL would (rightly) be 0.
    task = BlindNetTask(copy.deepcopy(tiny_model), LossConfig(cwcl_min_pixels=0, cwcl_max_views=2))
    torch.manual_seed(2)
    task.train()
    out = task(*_batch(3))
    out["loss"].backward()
    for term in ("cml", "ccl", "cwcl"):
        assert out[term].item() > 0
    assert task.projection is not None and task.dsn is not None
    for level, head in task.projection.items():
        grads = [p.grad for p in head.parameters()]
        assert all(g is not None and g.abs().sum() > 0 for g in grads), f"no gradient in projection head {level}"
    assert all(p.grad is not None for p in task.dsn.parameters())


def test_sdcl_sees_anchors_when_views_disagree(tiny_model: DeepLabV3Plus) -> None:
    # Train the two views apart on purpose: x right, x_a wrong, so SDCL has anchors and a positive loss.
    cfg = ablation("sdcl")
    cfg.sdcl_num_negatives = 5
    task = BlindNetTask(copy.deepcopy(tiny_model), cfg).eval()
    x, x_a, target = _batch(4)
    with torch.no_grad():
        f = task.model.forward_features(x)
    low = f.logits_low.argmax(1)
    # Relabel so the original view is right everywhere; the augmented view (other input) disagrees somewhere.
    target = torch.nn.functional.interpolate(low[:, None].float(), size=target.shape[-2:], mode="nearest")[:, 0].long()
    out = task(x, x_a, target)
    assert out["sdcl"].item() > 0


@pytest.mark.numerics
def test_dense_and_sparse_projection_agree(tiny_model: DeepLabV3Plus) -> None:
    results = {}
    for mode in ("dense", "sparse"):
        torch.manual_seed(12)  # same projection-head initialisation in both tasks
        # Small minimum so that CWCL has eligible classes on the tiny maps.
        task = BlindNetTask(copy.deepcopy(tiny_model), LossConfig(cwcl_min_pixels=1, cwcl_max_views=4)).eval()
        task.projection_mode = mode
        task.generator = torch.Generator().manual_seed(11)
        x, x_a, _ = _batch(7)
        with torch.no_grad():  # label = the original view's prediction, so SDCL finds anchors
            low = task.model.forward_features(x).logits_low.argmax(1)
        target = torch.nn.functional.interpolate(low[:, None].float(), size=(64, 64), mode="nearest")[:, 0].long()
        task.loss_config.sdcl_num_negatives = 5
        results[mode] = task(x, x_a, target)
    assert results["dense"]["cwcl"].item() > 0 and results["dense"]["sdcl"].item() > 0
    # Projecting every pixel then gathering vs gathering then projecting: other matmul shapes, other summation order.
    # Measured 6.8e-7 relative at most (both paths); rel 1e-4 is ~150x that, abs 1e-6 covers a term near zero.
    for key in ("cwcl", "sdcl", "loss"):
        assert results["dense"][key].item() == pytest.approx(results["sparse"][key].item(), rel=1e-4, abs=1e-6)


def test_empty_target_gives_finite_zero_terms(tiny_model: DeepLabV3Plus) -> None:
    task = BlindNetTask(copy.deepcopy(tiny_model), LossConfig()).train()
    x, x_a, _ = _batch(5)
    target = torch.full((2, 64, 64), 255)
    out = task(x, x_a, target)
    assert out["ce"].item() == 0 and out["aux"].item() == 0 and out["cwcl"].item() == 0 and out["sdcl"].item() == 0
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in task.parameters() if p.grad is not None)


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["l2", "cosine", "mmd"])
def test_alignment_configs_run(tiny_model: DeepLabV3Plus, kind: str) -> None:
    cfg = LossConfig(cml=0, ccl=0, cwcl=0, sdcl=0, align=0.5, align_kind=kind, align_levels=("style2", "layer4"))
    task = BlindNetTask(copy.deepcopy(tiny_model), cfg)
    out = _train_step(task)
    assert "align" in out and math.isfinite(out["align"].item()) and out["align"].item() > 0
    # A float32 sum of three terms (measured equal); rel 1e-5 allows a few ulp of another order.
    assert out["loss"].item() == pytest.approx((out["ce"] + 0.4 * out["aux"] + 0.5 * out["align"]).item(), rel=1e-5)


def test_forward_has_no_data_dependent_host_sync() -> None:
    """Under FakeTensorMode any ``.item()``, ``bool(tensor)``, ``nonzero`` or boolean-mask indexing raises, because
    fake tensors have no data. A full forward + backward passing here means the sampling hot path never reads values
    back to the host (on a GPU: no stream synchronisation) and has static shapes (compile-friendly)."""
    from torch._subclasses.fake_tensor import FakeTensorMode  # private, but the precise tool for this check

    with FakeTensorMode():
        model = build_model(ModelConfig(backbone="mobilenetv2"))
        cfg = LossConfig(align=0.1, align_kind="mmd", align_levels=("style0", "dec1"))
        task = BlindNetTask(model, cfg).train()
        x, x_a = torch.randn(2, 3, 64, 64), torch.randn(2, 3, 64, 64)
        out = task(x, x_a, torch.randint(0, 255, (2, 64, 64)))
        out["loss"].backward()
        assert set(out) == {*LOSS_KEYS, "align"}


@pytest.mark.numerics
def test_bf16_autocast_step_is_finite(tiny_model: DeepLabV3Plus) -> None:
    task = BlindNetTask(copy.deepcopy(tiny_model), LossConfig(cwcl_min_pixels=0, cwcl_max_views=2)).train()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = task(*_batch(6))
    out["loss"].backward()
    assert all(v.dtype == torch.float32 and math.isfinite(v.item()) for v in out.values())
    assert out["cwcl"].item() > 0


def test_eval_model_and_state_split(tiny_model: DeepLabV3Plus) -> None:
    task = BlindNetTask(copy.deepcopy(tiny_model), LossConfig())
    assert task.get_eval_model() is task.model
    assert type(task.get_eval_model()) is DeepLabV3Plus
    model_keys = set(task.get_eval_model().state_dict())
    extra = task.get_task_state()
    assert extra and all(k.startswith(("dsn.", "projection.")) for k in extra)
    assert not any(k.startswith(("dsn", "projection", "model.")) for k in model_keys)
    assert {f"model.{k}" for k in model_keys} | set(extra) == set(task.state_dict())
    # Round trip into a fresh task; a mismatching state is refused.
    other = BlindNetTask(copy.deepcopy(tiny_model), LossConfig())
    other.load_task_state(extra)
    for k, v in other.get_task_state().items():
        assert torch.equal(v, extra[k])
    with pytest.raises(KeyError, match="missing"):
        BlindNetTask(copy.deepcopy(tiny_model), ablation("baseline")).load_task_state(extra)


def test_config_errors(tiny_model: DeepLabV3Plus) -> None:
    base = build_model(ModelConfig(backbone="mobilenetv2", instance_norm=False))
    with pytest.raises(ValueError, match="instance_norm"):
        BlindNetTask(base, LossConfig())
    BlindNetTask(base, ablation("cwcl+sdcl"))  # contrastive losses do not need the IN layers
    with pytest.raises(ValueError, match="unknown config key.*for LossConfig"):
        LossConfig.from_dict({"cmll": 0.1})
    with pytest.raises(ValueError, match="align_kind"):
        LossConfig(align=1.0).validate()
    with pytest.raises(KeyError, match="choose one of"):
        ablation("full")
    cfg = LossConfig.from_dict({"cwcl_negatives": "original", "align_levels": ["dec1"]})
    assert cfg.align_levels == ("dec1",) and LossConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="target"):
        BlindNetTask(copy.deepcopy(tiny_model), LossConfig())(*_batch(0)[:2], torch.zeros(2, 32, 32, dtype=torch.long))


@pytest.mark.numerics
def test_one_view_baseline_is_cross_entropy_on_x_alone(tiny_model: DeepLabV3Plus) -> None:
    base = build_model(ModelConfig(backbone="mobilenetv2", instance_norm=False))
    task = BlindNetTask(base, LossConfig(cml=0, ccl=0, cwcl=0, sdcl=0, views=1)).train()
    x, x_a, target = _batch(7)
    torch.manual_seed(0)  # the aux head's dropout draws the same mask in both calls
    out = task(x, x_a, target)
    logits = task.model(x)  # same weights, train mode: the same batch statistics as the task's forward
    expected = torch.nn.functional.cross_entropy(logits, target, ignore_index=255)
    # The same forward and the same cross-entropy kernel (measured equal, like the sum below); rel 1e-5 is a few ulp.
    assert out["ce"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert out["loss"].item() == pytest.approx((out["ce"] + 0.4 * out["aux"]).item(), rel=1e-5)
    # x_a plays no part: any other x_a gives the same loss (the same computation: measured equal)
    torch.manual_seed(0)
    assert task(x, torch.zeros_like(x_a), target)["loss"].item() == pytest.approx(out["loss"].item(), rel=1e-6)
    two_view = BlindNetTask(base, LossConfig(cml=0, ccl=0, cwcl=0, sdcl=0)).train()
    # Two views change the batch statistics: the CE moves by 9% (measured), far outside rel 1e-3.
    assert two_view(x, torch.zeros_like(x_a), target)["ce"].item() != pytest.approx(out["ce"].item(), rel=1e-3)


@pytest.mark.parametrize("views", [0, 3])
def test_views_must_be_one_or_two(views: int) -> None:
    with pytest.raises(ValueError, match="views must be 1 or 2"):
        LossConfig.from_dict({"views": views})


def test_one_view_refuses_losses_that_compare_the_views() -> None:
    with pytest.raises(ValueError, match=r"views=1 .*\['cml', 'ccl', 'cwcl', 'sdcl'\]"):
        LossConfig.from_dict({"views": 1})
    with pytest.raises(ValueError, match=r"\['align'\]"):
        LossConfig.from_dict({"views": 1, "cml": 0, "ccl": 0, "cwcl": 0, "sdcl": 0, "align": 1, "align_kind": "l2"})


def test_ablation_copies_are_private() -> None:
    a = ablation("blindnet")
    a.cml = 0.0
    assert ABLATIONS["blindnet"].cml == 0.2
    assert list(ABLATIONS) == ["baseline", "cml", "ccl", "cml+ccl", "cwcl", "sdcl", "cwcl+sdcl", "blindnet"]


def test_train_step_benchmark_cpu_smoke(tmp_path) -> None:
    from blindnet.benchmarks.train_step import main

    row = main(
        [
            "--device",
            "cpu",
            "--size",
            "64",
            "--batch",
            "2",
            "--steps",
            "2",
            "--warmup",
            "0",
            "--backbone",
            "mobilenetv2",
            "--precision",
            "float32",
            "--out",
            str(tmp_path),
        ]
    )
    assert row["full_median_ms"] > 0 and row["ce_only_median_ms"] > 0 and row["full_peak_gib"] is None
    lines = (tmp_path / row["path"].split("/")[-1]).read_text().splitlines()
    assert json.loads(lines[-1])["benchmark"] == "train_step"


def test_train_step_benchmark_refuses_missing_cuda() -> None:
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    from blindnet.benchmarks.train_step import main

    with pytest.raises(SystemExit, match="CUDA is not available"):
        main(["--device", "cuda"])


@pytest.mark.slow
@pytest.mark.parametrize("backbone", ["resnet50", "shufflenetv2"])
def test_other_backbones_run_a_bf16_step(backbone: str) -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(backbone=backbone))
    cfg = LossConfig(align=0.1, align_kind="cosine", align_levels=("style1", "layer4"))
    task = BlindNetTask(model, cfg).train()
    x, x_a, target = _batch(8, size=128)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        out = task(x, x_a, target)
    out["loss"].backward()
    assert all(math.isfinite(v.item()) for v in out.values())
    assert all(out[k].item() > 0 for k in ("cml", "ccl", "cwcl", "align"))


# ---------------------------------------------------------------------------------------------------------------------
# Which style features CML/CCL read (ShuffleNetV2's stem: post-ReLU in the original)
# ---------------------------------------------------------------------------------------------------------------------


def _official_keys(model: DeepLabV3Plus) -> dict[str, torch.Tensor]:
    """The model's weights under the original's key names (its trunk sits at the top level, not under encoder.)."""
    return {k.removeprefix("encoder."): v for k, v in model.state_dict().items()}


def _reference_ccl(style_k: list[torch.Tensor], style_q: list[torch.Tensor]) -> float:
    """The original's CCL written out: diag of F_k F_q^T / (HW - 1) + 1e-5 pushed to 1, mean over layers."""
    total = 0.0
    for fk, fq in zip(style_k, style_q):
        n, c, h, w = fk.shape
        diag = (fk.reshape(n, c, -1) * fq.reshape(n, c, -1)).sum(-1) / (h * w - 1) + 1e-5
        total += ((diag - 1) ** 2).mean(1).sum().item() / n
    return total / len(style_k)


def _reference_cml(style_k: list[torch.Tensor], style_q: list[torch.Tensor]) -> float:
    total = 0.0
    for fk, fq in zip(style_k, style_q):
        n, c, h, w = fk.shape
        eye = 1e-5 * torch.eye(c)
        cov_k = fk.reshape(n, c, -1) @ fk.reshape(n, c, -1).transpose(1, 2) / (h * w - 1) + eye
        cov_q = fq.reshape(n, c, -1) @ fq.reshape(n, c, -1).transpose(1, 2) / (h * w - 1) + eye
        total += ((cov_k - cov_q) ** 2).mean().item()
    return total / len(style_k)


@pytest.mark.numerics
def test_shufflenet_style_features_follow_the_original_in_place_relu() -> None:
    torch.manual_seed(3)
    model = build_model(ModelConfig(backbone="shufflenetv2", num_classes=NUM_CLASSES)).eval()
    x, x_a, target = _batch(4, size=64)
    state = _official_keys(model)
    with torch.no_grad():
        ref_logits, ref_k = original_forward(state, x, backbone="shufflenetv2", blindnet=True)
        _, ref_q = original_forward(state, x_a, backbone="shufflenetv2", blindnet=True)
    assert (ref_k[0] >= 0).all()  # the reference's stem feature was overwritten by the in-place ReLU

    results = {}
    for mode in ("original", "pre_activation"):
        cfg = LossConfig(cwcl=0, sdcl=0, aux=0, style_features=mode)
        task = BlindNetTask(model, cfg).eval()
        with torch.no_grad():
            feats = model.forward_features(x)
            style = task.style_features(feats)
            out = task(x, x_a, target)
        # Exact: the reference runs the same torch ops in the same order (measured bitwise equal on both paths).
        assert torch.equal(feats.logits, ref_logits)
        results[mode] = (style, out)
    style, out = results["original"]  # the default
    assert LossConfig().style_features == "original"
    for ours, ref in zip(style, ref_k):
        assert torch.equal(ours, ref)  # the same ops again: measured bitwise equal
    # The references sum products elementwise where the losses use matrix products: measured 4.5e-8 (CCL) and 4.7e-8
    # (CML) relative; rel 1e-4 is ~2000x. abs 1e-9 would matter only for a CML near 0 (it is 6e-4 here).
    assert out["ccl"].item() == pytest.approx(_reference_ccl(ref_k, ref_q), rel=1e-4)
    assert out["cml"].item() == pytest.approx(_reference_cml(ref_k, ref_q), rel=1e-4, abs=1e-9)
    # The option: the stem feature before the ReLU (it has negative values); the deeper two are unchanged.
    pre, out_pre = results["pre_activation"]
    assert (pre[0] < 0).any()
    assert torch.equal(pre[0].clamp(min=0), ref_k[0])  # clamp and the in-place ReLU are both exact: measured equal
    for i in (1, 2):
        assert torch.equal(pre[i], style[i])  # the very same tensors
    assert out_pre["ccl"].item() != pytest.approx(out["ccl"].item(), rel=1e-3)  # measured 20% apart


def test_style_feature_option_changes_nothing_for_mobilenet(tiny_model: DeepLabV3Plus) -> None:
    x, _, _ = _batch(5)
    with torch.no_grad():
        feats = tiny_model.eval().forward_features(x)
    a = BlindNetTask(tiny_model, LossConfig(style_features="original")).style_features(feats)
    b = BlindNetTask(tiny_model, LossConfig(style_features="pre_activation")).style_features(feats)
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and len(a) == 3
    with pytest.raises(ValueError, match="style_features"):
        LossConfig.from_dict({"style_features": "post_relu"})
    with pytest.raises(ValueError, match="unknown config key"):
        LossConfig.from_dict({"style_feature": "original"})
