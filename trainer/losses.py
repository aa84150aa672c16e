# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""The Consistency-aware Focal Alignment (CFA) loss (paper section III-B) and its terms.

`L = L_focal + lambda_align * L_align + lambda_calibration * L_cal + lambda_gen * L_gen`

Each term is a plain function on tensors (testable alone on seeded CPU tensors); [`CFALoss`] combines them in the
open_clip style and returns a dict of named `*_loss` terms plus their weighted sum `loss`. Every term is computed in
fp32 whatever the input dtype (bf16/fp16 logits under autocast are upcast first), so it is numerically stable.
"""

from collections.abc import Hashable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

_REDUCTIONS = ("mean", "sum", "none")
IGNORE_INDEX = -100
# the unweighted terms of the CFA loss, as returned by `CFALoss` and logged by `CFATrainer` (train and `eval_`)
CFA_TERMS = ("focal_loss", "align_loss", "calibration_loss", "gen_loss")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"`reduction` must be one of {_REDUCTIONS}, got {reduction!r}.")


def _reduce(per_sample: torch.Tensor, keep: torch.Tensor, reduction: str) -> torch.Tensor:
    """Reduces a per-sample loss over the rows where `keep` is True (mean over kept rows, sum, or none)."""
    if reduction == "none":
        return per_sample
    kept = per_sample[keep]
    if reduction == "sum":
        return kept.sum()
    # a batch with no labelled row gives 0 (not NaN), and keeps the graph
    return kept.sum() / keep.sum().clamp(min=1)


def _log_probs_and_labels(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int):
    if logits.dim() != 2:
        raise ValueError(f"`logits` must be (batch, num_classes), got shape {tuple(logits.shape)}.")
    if labels.shape != logits.shape[:1]:
        raise ValueError(f"`labels` must be (batch,): logits rows: {logits.shape[0]}, labels: {tuple(labels.shape)}.")
    log_probs = logits.float().log_softmax(dim=-1)
    keep = labels != ignore_index
    safe_labels = torch.where(keep, labels, torch.zeros_like(labels)).long()
    return log_probs, safe_labels, keep


def focal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    alpha: torch.Tensor | None = None,
    gamma: float = 2.0,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """
    Alpha-balanced focal loss `-alpha[y] * (1 - p_y) ** gamma * log p_y` (Lin et al., 2017).

    With `gamma=0` and `alpha=None` it equals `F.cross_entropy(logits, labels)`. Note that with `alpha` the `"mean"`
    reduction divides by the number of samples, not by the sum of their weights (unlike the `weight` argument of
    `F.cross_entropy`), as in the paper.

    Args:
        logits (`torch.Tensor` of shape `(batch_size, num_classes)`):
            Unnormalised class scores. Computed in fp32 through `log_softmax`.
        labels (`torch.LongTensor` of shape `(batch_size,)`):
            Class indices; rows equal to `ignore_index` are left out.
        alpha (`torch.Tensor` of shape `(num_classes,)`, *optional*):
            Per-class weights (see [`class_balanced_alpha`]). `None` means all ones.
        gamma (`float`, *optional*, defaults to 2.0):
            Focusing parameter, `>= 0`.
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` over the labelled samples, `"sum"` over them, or `"none"` (per sample, ignored rows are 0).
        ignore_index (`int`, *optional*, defaults to -100):
            Label value of rows without a class.

    Returns:
        `torch.Tensor`: fp32 scalar, or `(batch_size,)` with `reduction="none"`.
    """
    _check_reduction(reduction)
    if gamma < 0:
        raise ValueError(f"`gamma` must be >= 0, got {gamma}.")
    log_probs, safe_labels, keep = _log_probs_and_labels(logits, labels, ignore_index)
    log_pt = log_probs.gather(1, safe_labels[:, None]).squeeze(1)
    per_sample = -log_pt
    if gamma != 0:
        # clamp: 1 - exp(log_pt) can round to a tiny negative number
        per_sample = (1.0 - log_pt.exp()).clamp(min=0.0).pow(gamma) * per_sample
    if alpha is not None:
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=logits.device)
        if alpha.shape != logits.shape[1:]:
            raise ValueError(
                f"`alpha` must have one weight per class: classes: {logits.shape[1]}, alpha: {tuple(alpha.shape)}."
            )
        per_sample = alpha[safe_labels] * per_sample
    per_sample = per_sample * keep
    return _reduce(per_sample, keep, reduction)


def calibration_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    reduction: str = "mean",
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """
    The calibration term `L_cal`: the multi-class Brier score `sum_k (softmax(logits)_k - onehot(labels)_k) ** 2` of
    each labelled sample (the evaluation metric `brier` is the same quantity on probabilities).

    Args:
        logits (`torch.Tensor` of shape `(batch_size, num_classes)`):
            Unnormalised class scores. Computed in fp32.
        labels (`torch.LongTensor` of shape `(batch_size,)`):
            Class indices; rows equal to `ignore_index` are left out.
        reduction (`str`, *optional*, defaults to `"mean"`):
            `"mean"` over the labelled samples, `"sum"` over them, or `"none"` (per sample, ignored rows are 0).
        ignore_index (`int`, *optional*, defaults to -100):
            Label value of rows without a class.

    Returns:
        `torch.Tensor`: fp32 scalar, or `(batch_size,)` with `reduction="none"`.
    """
    _check_reduction(reduction)
    log_probs, safe_labels, keep = _log_probs_and_labels(logits, labels, ignore_index)
    one_hot = F.one_hot(safe_labels, num_classes=logits.shape[1]).float()
    per_sample = (log_probs.exp() - one_hot).pow(2).sum(dim=1) * keep
    return _reduce(per_sample, keep, reduction)


def _as_id_tensor(align_text_ids: torch.Tensor | Sequence[Hashable], batch_size: int, device) -> torch.Tensor:
    """Turns a LongTensor or a list of hashables (strings, ints, tuples) into a LongTensor of group indices."""
    if isinstance(align_text_ids, torch.Tensor):
        groups = align_text_ids.to(device=device).reshape(-1)
    else:
        index = {}
        groups = torch.tensor([index.setdefault(g, len(index)) for g in align_text_ids], dtype=torch.long, device=device)
    if groups.numel() != batch_size:
        raise ValueError(
            f"`align_text_ids` must have one id per sample: samples: {batch_size}, ids: {groups.numel()}."
        )
    return groups


def _scaled_cosine_logits(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale) -> torch.Tensor:
    image_embeds = F.normalize(image_embeds.float(), dim=-1)
    text_embeds = F.normalize(text_embeds.float(), dim=-1)
    scale = torch.as_tensor(logit_scale, device=image_embeds.device).float()
    return scale * image_embeds @ text_embeds.t()


def info_nce_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    align_text_ids: torch.Tensor | Sequence[Hashable] | None = None,
) -> torch.Tensor:
    """
    Symmetric InfoNCE between paired image and text embeddings (the alignment term `L_align`).

    `logits = logit_scale * normalize(image_embeds) @ normalize(text_embeds).T`;
    `loss = (CE(logits, targets) + CE(logits.T, targets.T)) / 2`. Without `align_text_ids` the targets are the diagonal
    (exactly the CLIP loss). With `align_text_ids`, samples sharing an id are positives of each other (label-derived
    alignment texts repeat within a batch): row `i`'s target spreads evenly, `1 / |group(i)|`, over the samples of its
    group, itself included. With all ids distinct this is again the CLIP loss.

    This is a batch-level term: it is not a sum of per-sample terms, so it is returned as a mean whatever the
    reduction used elsewhere. For a multi-process batch, gather the embeddings (and text ids) before calling it.

    Args:
        image_embeds (`torch.Tensor` of shape `(batch_size, dim)`):
            Image-side embeddings (`v_global`); need not be normalised.
        text_embeds (`torch.Tensor` of shape `(batch_size, dim)`):
            Text-side embeddings (`t_global`) of the same samples, same order.
        logit_scale (`torch.Tensor` or `float`):
            The multiplier, already exponentiated (as `CLIPModel.logit_scale.exp()`); may require grad.
        align_text_ids (`torch.LongTensor` of shape `(batch_size,)` or a list of hashables, *optional*):
            Alignment-text ids: samples with equal ids (the same text) are positives of each other.

    Returns:
        `torch.Tensor`: fp32 scalar.
    """
    if image_embeds.shape != text_embeds.shape:
        raise ValueError(
            f"`image_embeds` and `text_embeds` must have the same shape: {tuple(image_embeds.shape)} vs "
            f"{tuple(text_embeds.shape)}."
        )
    logits = _scaled_cosine_logits(image_embeds, text_embeds, logit_scale)
    batch_size = logits.shape[0]
    if align_text_ids is None:
        targets = torch.arange(batch_size, device=logits.device)
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2
    groups = _as_id_tensor(align_text_ids, batch_size, logits.device)
    positives = (groups[:, None] == groups[None, :]).float()
    # symmetric mask: row i of `targets` and of its transpose both normalise over the group of i
    targets = positives / positives.sum(dim=1, keepdim=True)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets.t())) / 2


def info_nce_loss_against_bank(
    image_embeds: torch.Tensor,
    bank_embeds: torch.Tensor,
    logit_scale: torch.Tensor | float,
    targets: torch.Tensor,
) -> torch.Tensor:
    """
    InfoNCE of each image against a bank of all distinct alignment texts (image -> text direction only).

    With label-template alignment texts a batch holds few distinct texts; contrasting against every distinct text
    (frozen, cached embeddings, one row per text) gives each image all the negatives. Only the image -> text
    cross-entropy is used: the bank's texts have no image of their own in the batch, so the text -> image direction is
    undefined for most rows. Each bank row is distinct, so each image has exactly one positive.

    Args:
        image_embeds (`torch.Tensor` of shape `(batch_size, dim)`):
            Image-side embeddings; need not be normalised.
        bank_embeds (`torch.Tensor` of shape `(num_texts, dim)`):
            Embeddings of the distinct alignment texts; need not be normalised.
        logit_scale (`torch.Tensor` or `float`):
            The multiplier, already exponentiated; may require grad.
        targets (`torch.LongTensor` of shape `(batch_size,)`):
            Index into `bank_embeds` of each image's text.

    Returns:
        `torch.Tensor`: fp32 scalar, `CE(logit_scale * cos(image, bank), targets)` averaged over the batch.
    """
    if image_embeds.shape[-1] != bank_embeds.shape[-1]:
        raise ValueError(f"embedding sizes differ: images: {image_embeds.shape[-1]}, bank: {bank_embeds.shape[-1]}.")
    logits = _scaled_cosine_logits(image_embeds, bank_embeds, logit_scale)
    return F.cross_entropy(logits, targets.to(logits.device).long())


def class_balanced_alpha(label_counts, mode: str = "inverse", beta: float = 0.999) -> torch.Tensor:
    """
    Per-class focal weights from training-split class frequencies, normalised to mean 1 over the classes.

    - `"inverse"`: `w_c = 1 / n_c`.
    - `"effective"`: `w_c = (1 - beta) / (1 - beta ** n_c)` (Cui et al., 2019, "effective number of samples").

    A class with zero training samples gets the largest weight of the present classes (no inf/NaN; it never
    contributes to the loss during training anyway, but keeps a sensible weight for evaluation losses). If no class
    has samples, all weights are 1. Rarer classes always get larger weights.

    Args:
        label_counts (sequence of `int`, `np.ndarray` or `torch.Tensor` of shape `(num_classes,)`):
            Number of training samples of each class, indexed by class id.
        mode (`str`, *optional*, defaults to `"inverse"`):
            `"inverse"` or `"effective"`.
        beta (`float`, *optional*, defaults to 0.999):
            Effective-number hyperparameter in `[0, 1)`; only used by `"effective"`.

    Returns:
        `torch.FloatTensor` of shape `(num_classes,)`, mean 1.
    """
    if mode not in ("inverse", "effective"):
        raise ValueError(f"`mode` must be 'inverse' or 'effective', got {mode!r}.")
    counts = torch.as_tensor(label_counts, dtype=torch.float64).reshape(-1)
    if counts.numel() == 0:
        raise ValueError("`label_counts` is empty.")
    if (counts < 0).any():
        raise ValueError(f"`label_counts` must be non-negative, got {counts.tolist()}.")
    present = counts > 0
    if not present.any():
        return torch.ones(counts.numel(), dtype=torch.float32)
    weights = torch.zeros_like(counts)
    if mode == "inverse":
        weights[present] = 1.0 / counts[present]
    else:
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"`beta` must be in [0, 1), got {beta}.")
        weights[present] = (1.0 - beta) / (1.0 - beta ** counts[present])
    weights[~present] = weights[present].max()
    return (weights / weights.mean()).float()


class CFALoss(nn.Module):
    """
    The Consistency-aware Focal Alignment loss, the one place its terms are computed and weighted:
    `loss = focal_loss + lambda_align * align_loss + lambda_calibration * calibration_loss + lambda_gen * gen_loss`.

    A term whose weight is 0, or whose inputs are not given, is a 0 tensor and is not computed. This gives the paper's
    ablations (Table II): CE only (`use_focal=False, lambda_align=0, lambda_calibration=0`), +focal, +focal+align,
    +focal+calibration, full; `lambda_gen` stays the same in every row.

    Under gradient accumulation and data parallelism, pass `num_labelled_in_batch` (labelled samples of the whole
    accumulated, all-process batch) and `world_size`: the per-sample terms are then summed over this micro-batch and
    divided by that global count, the alignment term (a batch-level loss) is weighted by its batch's share of the
    samples, and the result is multiplied by `world_size` (DDP averages gradients), so the summed micro-batch losses
    equal the loss of one large batch. `gen_loss` is the model's LM loss as given (the model already normalises it by
    the global token count in that mode).

    Args:
        focal_loss_alpha (`torch.Tensor` of shape `(num_classes,)`, *optional*):
            Per-class focal weights (see [`class_balanced_alpha`]); `None` means all ones. Stored as a non-persistent
            buffer, so it follows `.to()` and stays out of `state_dict`.
        focal_loss_gamma (`float`, *optional*, defaults to 2.0):
            Focal focusing parameter.
        lambda_align (`float`, *optional*, defaults to 1.0):
            Weight of the alignment term (symmetric InfoNCE [`info_nce_loss`], or [`info_nce_loss_against_bank`]).
        lambda_calibration (`float`, *optional*, defaults to 1.0):
            Weight of the calibration term [`calibration_loss`] (the multi-class Brier score).
        lambda_gen (`float`, *optional*, defaults to 0.5):
            Weight of the rationale LM loss (computed by the model, passed as `lm_loss`).
        use_focal (`bool`, *optional*, defaults to `True`):
            `False` replaces the focal term by plain, unweighted cross-entropy (`focal_loss_alpha` and
            `focal_loss_gamma` unused): the "CE only" ablation. The key stays `focal_loss`.
    """

    def __init__(
        self,
        focal_loss_alpha: torch.Tensor | None = None,
        focal_loss_gamma: float = 2.0,
        lambda_align: float = 1.0,
        lambda_calibration: float = 1.0,
        lambda_gen: float = 0.5,
        use_focal: bool = True,
    ):
        super().__init__()
        if focal_loss_gamma < 0:
            raise ValueError(f"`focal_loss_gamma` must be >= 0, got {focal_loss_gamma}.")
        weights = (("lambda_align", lambda_align), ("lambda_calibration", lambda_calibration), ("lambda_gen", lambda_gen))
        for name, value in weights:
            if value < 0:
                raise ValueError(f"`{name}` must be >= 0, got {value}.")
        self.focal_loss_gamma = float(focal_loss_gamma)
        self.lambda_align = float(lambda_align)
        self.lambda_calibration = float(lambda_calibration)
        self.lambda_gen = float(lambda_gen)
        self.use_focal = bool(use_focal)
        alpha = None if focal_loss_alpha is None else torch.as_tensor(focal_loss_alpha, dtype=torch.float32).reshape(-1)
        self.register_buffer("focal_loss_alpha", alpha, persistent=False)

    def extra_repr(self) -> str:
        return (
            f"focal_loss_gamma={self.focal_loss_gamma}, lambda_align={self.lambda_align}, "
            f"lambda_calibration={self.lambda_calibration}, lambda_gen={self.lambda_gen}, use_focal={self.use_focal}, "
            f"focal_loss_alpha={'set' if self.focal_loss_alpha is not None else None}"
        )

    def forward(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        image_embeds: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
        logit_scale: torch.Tensor | float | None = None,
        lm_loss: torch.Tensor | float | None = None,
        align_text_ids: torch.Tensor | Sequence[Hashable] | None = None,
        bank_embeds: torch.Tensor | None = None,
        bank_targets: torch.Tensor | None = None,
        num_labelled_in_batch: torch.Tensor | int | None = None,
        world_size: int = 1,
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            logits (`torch.Tensor` of shape `(batch_size, num_classes)`):
                Class logits of the discriminative head.
            labels (`torch.LongTensor` of shape `(batch_size,)`):
                Class indices; -100 rows are left out of the focal and calibration terms.
            image_embeds (`torch.Tensor` of shape `(batch_size, dim)`, *optional*):
                `v_global`; with `text_embeds` (or `bank_embeds`) and `logit_scale` enables the alignment term.
            text_embeds (`torch.Tensor` of shape `(batch_size, dim)`, *optional*):
                `t_global`, paired with `image_embeds`.
            logit_scale (`torch.Tensor` or `float`, *optional*):
                Exponentiated contrastive temperature multiplier.
            lm_loss (`torch.Tensor` or `float`, *optional*):
                Rationale LM loss from the model; `gen_loss` is this value as is.
            align_text_ids (`torch.LongTensor` or list of hashables, *optional*):
                Alignment-text ids: samples with the same text are positives of each other in the alignment term.
            bank_embeds (`torch.Tensor` of shape `(num_texts, dim)`, *optional*):
                Embeddings of all distinct alignment texts: the alignment term is then
                [`info_nce_loss_against_bank`] (`text_embeds` unused).
            bank_targets (`torch.LongTensor` of shape `(batch_size,)`, *optional*):
                Row of `bank_embeds` of each image's text; required with `bank_embeds`.
            num_labelled_in_batch (`torch.Tensor` or `int`, *optional*):
                Labelled samples in the whole accumulated, all-process batch (see the class docstring). `None`: the
                per-sample terms are means over this batch's labelled samples.
            world_size (`int`, *optional*, defaults to 1):
                Number of processes; only used with `num_labelled_in_batch`.

        Returns:
            `dict[str, torch.Tensor]` of fp32 scalars: `loss` (the weighted sum to optimise) and the unweighted terms
            `focal_loss`, `align_loss`, `calibration_loss`, `gen_loss` as this batch's means, for logging (skipped
            ones are 0 without a graph).
        """
        zero = logits.new_zeros((), dtype=torch.float32)
        global_norm = num_labelled_in_batch is not None
        reduction = "sum" if global_norm else "mean"

        if self.use_focal:
            focal = focal_loss(
                logits, labels, alpha=self.focal_loss_alpha, gamma=self.focal_loss_gamma, reduction=reduction
            )
        else:
            focal = focal_loss(logits, labels, alpha=None, gamma=0.0, reduction=reduction)

        align = zero
        align_batch = 0
        if self.lambda_align > 0 and image_embeds is not None and logit_scale is not None:
            if bank_embeds is not None:
                if bank_targets is None:
                    raise ValueError("`bank_embeds` needs `bank_targets` (each image's row in the bank).")
                align = info_nce_loss_against_bank(image_embeds, bank_embeds, logit_scale, bank_targets)
                align_batch = image_embeds.shape[0]
            elif text_embeds is not None:
                align = info_nce_loss(image_embeds, text_embeds, logit_scale, align_text_ids=align_text_ids)
                align_batch = image_embeds.shape[0]

        calibration = zero
        if self.lambda_calibration > 0:
            calibration = calibration_loss(logits, labels, reduction=reduction)

        gen = zero
        if self.lambda_gen > 0 and lm_loss is not None:
            gen = torch.as_tensor(lm_loss, device=logits.device).float()

        if not global_norm:
            loss = focal + self.lambda_align * align + self.lambda_calibration * calibration + self.lambda_gen * gen
            terms = {"focal_loss": focal, "align_loss": align, "calibration_loss": calibration, "gen_loss": gen}
            return {"loss": loss, **terms}

        n_local = (labels != IGNORE_INDEX).sum().clamp(min=1)
        n_total = torch.as_tensor(num_labelled_in_batch, device=logits.device).clamp(min=1).float()
        per_sample = focal + self.lambda_calibration * calibration
        align_share = align_batch / n_total if align_batch else 0.0
        loss = per_sample / n_total + self.lambda_align * align * align_share
        loss = loss + self.lambda_gen * gen
        loss = loss * world_size
        return {
            "loss": loss,
            "focal_loss": focal / n_local,
            "align_loss": align,
            "calibration_loss": calibration / n_local,
            "gen_loss": gen * (n_total / n_local) / world_size,
        }


__all__ = [
    "CFALoss",
    "CFA_TERMS",
    "calibration_loss",
    "class_balanced_alpha",
    "focal_loss",
    "info_nce_loss",
    "info_nce_loss_against_bank",
]
