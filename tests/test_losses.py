"""Tests of the CFA loss terms against hand computations on small seeded tensors (CPU, fast)."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.losses import (
    CFALoss,
    calibration_loss,
    class_balanced_alpha,
    focal_loss,
    info_nce_loss,
    info_nce_loss_against_bank,
)


def _seeded(batch=6, num_classes=4, dim=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, num_classes, generator=gen) * 2
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    image = torch.randn(batch, dim, generator=gen)
    text = torch.randn(batch, dim, generator=gen)
    return logits, labels, image, text


def _softmax_np(row):
    row = np.asarray(row, dtype=np.float64)
    e = np.exp(row - row.max())
    return e / e.sum()


# ------------------------------------------------------------------------------------------------------------------
# focal / calibration
# ------------------------------------------------------------------------------------------------------------------


def test_focal_matches_explicit_loop():
    logits, labels, _, _ = _seeded()
    alpha = torch.tensor([0.5, 1.0, 1.5, 1.0])
    gamma = 2.0
    expected = []
    for row, y in zip(logits.tolist(), labels.tolist()):
        p_y = _softmax_np(row)[y]
        expected.append(-alpha[y].item() * (1 - p_y) ** gamma * math.log(p_y))
    got = focal_loss(logits, labels, alpha=alpha, gamma=gamma)
    assert got.item() == pytest.approx(np.mean(expected), rel=1e-5)
    assert focal_loss(logits, labels, alpha=alpha, gamma=gamma, reduction="sum").item() == pytest.approx(
        np.sum(expected), rel=1e-5
    )
    per_sample = focal_loss(logits, labels, alpha=alpha, gamma=gamma, reduction="none")
    np.testing.assert_allclose(per_sample.numpy(), expected, rtol=1e-5)


def test_focal_gamma_zero_is_cross_entropy():
    logits, labels, _, _ = _seeded(batch=16, num_classes=8, seed=1)
    torch.testing.assert_close(focal_loss(logits, labels, gamma=0.0), F.cross_entropy(logits, labels))


def test_focal_is_fp32_and_stable_for_half_and_extreme_logits():
    logits = torch.tensor([[100.0, -100.0, 0.0], [-50.0, 50.0, 0.0]]).to(torch.bfloat16)
    labels = torch.tensor([0, 0])
    out = focal_loss(logits, labels)
    assert out.dtype == torch.float32
    assert torch.isfinite(out)
    # first row is certain and right (0), second certain and wrong (~100 nats / 2 with gamma factor ~1)
    assert out.item() == pytest.approx(100.0 / 2, rel=1e-2)


def test_focal_ignore_index_and_bad_args():
    logits, labels, _, _ = _seeded()
    masked = labels.clone()
    masked[0] = -100
    torch.testing.assert_close(focal_loss(logits, masked), focal_loss(logits[1:], labels[1:]))
    assert focal_loss(logits, torch.full_like(labels, -100)).item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        focal_loss(logits, labels, reduction="avg")
    with pytest.raises(ValueError, match="alpha"):
        focal_loss(logits, labels, alpha=torch.ones(3))


def test_calibration_loss_is_the_brier_score_by_hand():
    logits, labels, _, _ = _seeded(seed=2)
    expected = []
    for row, y in zip(logits.tolist(), labels.tolist()):
        p = _softmax_np(row)
        expected.append(sum((p[k] - (1.0 if k == y else 0.0)) ** 2 for k in range(len(p))))
    assert calibration_loss(logits, labels).item() == pytest.approx(np.mean(expected), rel=1e-5)
    assert calibration_loss(logits, labels, reduction="sum").item() == pytest.approx(np.sum(expected), rel=1e-5)
    # a uniform prediction over C classes: (1 - 1/C)^2 + (C - 1) / C^2 = 1 - 1/C
    assert calibration_loss(torch.zeros(1, 4), torch.tensor([2])).item() == pytest.approx(0.75)


# ------------------------------------------------------------------------------------------------------------------
# InfoNCE
# ------------------------------------------------------------------------------------------------------------------


def _clip_loss_by_hand(image, text, scale):
    image = image.double().numpy()
    text = text.double().numpy()
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    sim = scale * image @ text.T
    n = len(sim)
    i2t = -np.mean([np.log(_softmax_np(sim[i])[i]) for i in range(n)])
    t2i = -np.mean([np.log(_softmax_np(sim[:, i])[i]) for i in range(n)])
    return (i2t + t2i) / 2


def test_info_nce_equals_clip_loss():
    _, _, image, text = _seeded()
    got = info_nce_loss(image, text, logit_scale=torch.tensor(10.0))
    assert got.item() == pytest.approx(_clip_loss_by_hand(image, text, 10.0), rel=1e-5)
    # all-distinct groups give the same loss as no groups
    torch.testing.assert_close(info_nce_loss(image, text, 10.0, align_text_ids=torch.arange(6) * 3), got)
    torch.testing.assert_close(info_nce_loss(image, text, 10.0, align_text_ids=list("abcdef")), got)


def test_info_nce_multi_positive_targets():
    _, _, image, text = _seeded(batch=4)
    scale = 7.0
    groups = ["nevus", "melanoma", "nevus", "bcc"]  # samples 0 and 2 share their text
    got = info_nce_loss(image, text, scale, align_text_ids=groups)

    img = F.normalize(image.double(), dim=-1).numpy()
    txt = F.normalize(text.double(), dim=-1).numpy()
    sim = scale * img @ txt.T
    targets = np.array(
        [[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]], dtype=np.float64
    )  # each row spread 0.5 / 0.5 over the two positives
    i2t = np.mean([-(targets[i] * np.log(_softmax_np(sim[i]))).sum() for i in range(4)])
    t2i = np.mean([-(targets[:, i] * np.log(_softmax_np(sim[:, i]))).sum() for i in range(4)])
    assert got.item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    # and it differs from the diagonal loss, which treats sample 2's text as a negative of sample 0
    assert abs(got.item() - info_nce_loss(image, text, scale).item()) > 1e-4
    # integer ids give the same as hashable ids
    torch.testing.assert_close(info_nce_loss(image, text, scale, align_text_ids=torch.tensor([3, 1, 3, 2])), got)


def test_info_nce_gradient_flows_to_logit_scale_and_embeddings():
    _, _, image, text = _seeded()
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    image.requires_grad_(True)
    loss = info_nce_loss(image, text, log_scale.exp(), align_text_ids=[0, 0, 1, 2, 3, 3])
    loss.backward()
    assert log_scale.grad is not None and log_scale.grad.abs().item() > 0
    assert image.grad is not None and image.grad.abs().sum().item() > 0


def test_info_nce_against_bank_by_hand():
    _, _, image, _ = _seeded(batch=5)
    bank = torch.randn(3, 5, generator=torch.Generator().manual_seed(9))
    targets = torch.tensor([0, 2, 2, 1, 0])
    got = info_nce_loss_against_bank(image, bank, 5.0, targets)
    img = F.normalize(image.double(), dim=-1).numpy()
    bnk = F.normalize(bank.double(), dim=-1).numpy()
    sim = 5.0 * img @ bnk.T
    expected = -np.mean([np.log(_softmax_np(sim[i])[t]) for i, t in enumerate(targets.tolist())])
    assert got.item() == pytest.approx(expected, rel=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# class_balanced_alpha
# ------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["inverse", "effective"])
def test_class_balanced_alpha_mean_one_and_ordering(mode):
    counts = [1000, 10, 100, 1]
    alpha = class_balanced_alpha(counts, mode=mode)
    assert alpha.dtype == torch.float32 and alpha.shape == (4,)
    assert alpha.mean().item() == pytest.approx(1.0, abs=1e-6)
    order = np.argsort(counts)  # rarest first
    assert all(alpha[order[i]] > alpha[order[i + 1]] for i in range(3))


def test_class_balanced_alpha_values_and_edge_cases():
    inverse = class_balanced_alpha([1, 3])
    torch.testing.assert_close(inverse, torch.tensor([1.5, 0.5]))  # (1, 1/3) / mean(2/3)
    beta = 0.9
    raw = np.array([(1 - beta) / (1 - beta**n) for n in (2, 5)])
    torch.testing.assert_close(
        class_balanced_alpha(np.array([2, 5]), mode="effective", beta=beta), torch.tensor(raw / raw.mean()).float()
    )
    with_zero = class_balanced_alpha(torch.tensor([4, 0, 2]))
    assert torch.isfinite(with_zero).all()
    assert with_zero[1] == with_zero[2] == with_zero.max()  # a zero-count class gets the max present weight
    assert with_zero.mean().item() == pytest.approx(1.0)
    torch.testing.assert_close(class_balanced_alpha([0, 0]), torch.ones(2))
    with pytest.raises(ValueError, match="'sqrt'"):
        class_balanced_alpha([1, 2], mode="sqrt")
    with pytest.raises(ValueError, match="non-negative"):
        class_balanced_alpha([1, -2])


# ------------------------------------------------------------------------------------------------------------------
# CFALoss
# ------------------------------------------------------------------------------------------------------------------


def test_cfa_loss_weighted_sum_of_terms():
    logits, labels, image, text = _seeded()
    alpha = class_balanced_alpha([5, 1, 2, 3])
    lm_loss = torch.tensor(2.5)
    module = CFALoss(focal_loss_alpha=alpha, focal_loss_gamma=2.0, lambda_align=1.0, lambda_calibration=0.7, lambda_gen=0.5)
    out = module(logits, labels, image, text, logit_scale=10.0, lm_loss=lm_loss, align_text_ids=[0, 1, 0, 2, 3, 3])
    assert set(out) == {"loss", "focal_loss", "align_loss", "calibration_loss", "gen_loss"}
    torch.testing.assert_close(out["focal_loss"], focal_loss(logits, labels, alpha=alpha, gamma=2.0))
    torch.testing.assert_close(out["align_loss"], info_nce_loss(image, text, 10.0, align_text_ids=[0, 1, 0, 2, 3, 3]))
    torch.testing.assert_close(out["calibration_loss"], calibration_loss(logits, labels))
    torch.testing.assert_close(out["gen_loss"], lm_loss)
    expected = out["focal_loss"] + 1.0 * out["align_loss"] + 0.7 * out["calibration_loss"] + 0.5 * lm_loss
    torch.testing.assert_close(out["loss"], expected)


def test_cfa_loss_ce_only_ablation_and_skipped_terms(monkeypatch):
    logits, labels, image, text = _seeded()
    module = CFALoss(
        focal_loss_alpha=torch.tensor([4.0, 0.1, 0.1, 0.1]), use_focal=False, lambda_align=0.0, lambda_calibration=0.0
    )

    # skipped terms are not computed at all
    import trainer.losses as losses_module

    def _boom(*args, **kwargs):
        raise AssertionError("a skipped term was computed")

    monkeypatch.setattr(losses_module, "info_nce_loss", _boom)
    monkeypatch.setattr(losses_module, "calibration_loss", _boom)
    out = module(logits, labels, image, text, logit_scale=10.0, lm_loss=None)
    # use_focal=False: plain, unweighted cross-entropy
    torch.testing.assert_close(out["focal_loss"], F.cross_entropy(logits, labels))
    for key in ("align_loss", "calibration_loss", "gen_loss"):
        assert out[key].item() == 0.0 and not out[key].requires_grad
    torch.testing.assert_close(out["loss"], out["focal_loss"])

    # absent inputs skip a weighted term too
    module = CFALoss(lambda_align=1.0, lambda_calibration=0.0, lambda_gen=0.0)
    out = module(logits, labels, image_embeds=image, text_embeds=None, lm_loss=torch.tensor(3.0))
    assert out["align_loss"].item() == 0.0 and out["gen_loss"].item() == 0.0


def test_cfa_loss_global_normalisation_for_gradient_accumulation():
    logits, labels, image, text = _seeded(batch=8)
    labels[2] = -100  # an unlabelled row: 7 labelled samples in the large batch
    lm_loss = torch.tensor(1.5)
    module = CFALoss(focal_loss_alpha=class_balanced_alpha([3, 1, 1, 2]), lambda_calibration=0.7, lambda_gen=0.5)
    full = module(logits, labels, lm_loss=lm_loss)
    halves = [
        module(logits[s], labels[s], lm_loss=lm_loss / 2, num_labelled_in_batch=torch.tensor(7))
        for s in (slice(0, 4), slice(4, 8))
    ]
    # per-sample terms divided by the global labelled count: the micro-batch losses add up to the large batch's
    torch.testing.assert_close(halves[0]["loss"] + halves[1]["loss"], full["loss"])
    # logged terms are this micro-batch's means
    torch.testing.assert_close(halves[1]["focal_loss"], module(logits[4:], labels[4:])["focal_loss"])
    # the alignment term is weighted by its batch's share of the samples, and DDP's averaging is undone
    with_align = module(logits, labels, image, text, logit_scale=5.0, num_labelled_in_batch=14, world_size=2)
    align = info_nce_loss(image, text, 5.0)
    torch.testing.assert_close(with_align["align_loss"], align)
    no_align = module(logits, labels, num_labelled_in_batch=14, world_size=2)
    torch.testing.assert_close(with_align["loss"] - no_align["loss"], 2 * align * 8 / 14)


def test_cfa_loss_against_text_bank():
    logits, labels, image, _ = _seeded()
    bank = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([0, 2, 1, 1, 0, 2])
    module = CFALoss(lambda_align=0.5, lambda_calibration=0.0, lambda_gen=0.0)
    out = module(logits, labels, image, logit_scale=10.0, bank_embeds=bank, bank_targets=targets)
    torch.testing.assert_close(out["align_loss"], info_nce_loss_against_bank(image, bank, 10.0, targets))
    torch.testing.assert_close(out["loss"], out["focal_loss"] + 0.5 * out["align_loss"])
    with pytest.raises(ValueError, match="bank_targets"):
        module(logits, labels, image, logit_scale=10.0, bank_embeds=bank)


def test_cfa_loss_gradients_reach_logit_scale_and_logits():
    logits, labels, image, text = _seeded()
    logits.requires_grad_(True)
    log_scale = torch.tensor(2.0, requires_grad=True)
    out = CFALoss()(logits, labels, image, text, logit_scale=log_scale.exp(), lm_loss=torch.tensor(1.0))
    out["loss"].backward()
    assert log_scale.grad is not None and log_scale.grad.abs().item() > 0
    assert logits.grad is not None and logits.grad.abs().sum().item() > 0


def test_cfa_loss_alpha_is_a_buffer_and_args_are_validated():
    module = CFALoss(focal_loss_alpha=[1.0, 2.0])
    assert "focal_loss_alpha" in dict(module.named_buffers())
    assert "focal_loss_alpha" not in module.state_dict()
    assert module.to(torch.float64).focal_loss_alpha is not None
    assert CFALoss().focal_loss_alpha is None
    with pytest.raises(ValueError, match="lambda_calibration"):
        CFALoss(lambda_calibration=-1.0)
    with pytest.raises(ValueError, match="focal_loss_gamma"):
        CFALoss(focal_loss_gamma=-0.5)
