# Copyright 2026 The SkinCLIP-VL Authors. Licensed under the Apache License, Version 2.0.
"""`CFATrainer`: a `transformers.Trainer` that optimises the Consistency-aware Focal Alignment loss."""

import os
from collections import defaultdict

import torch
import torch.distributed as dist
from transformers import Trainer
from transformers.trainer import TRAINING_ARGS_NAME

from .losses import CFA_TERMS, CFALoss


def _unwrap_peft(model):
    return model.base_model.model if hasattr(model, "peft_config") and hasattr(model, "base_model") else model


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward returns this rank's slice of the gradient (the CLIP recipe)."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.rank, ctx.batch = dist.get_rank(), tensor.shape[0]
        gathered = [torch.zeros_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered, dim=0)

    @staticmethod
    def backward(ctx, grad):
        return grad[ctx.rank * ctx.batch : (ctx.rank + 1) * ctx.batch]


def gather_for_alignment(image_embeds, text_embeds, align_text_ids):
    """Gather alignment embeddings from every process (gradients flow back to the local slice only)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return image_embeds, text_embeds, align_text_ids
    sizes = [torch.zeros(1, dtype=torch.long, device=image_embeds.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([image_embeds.shape[0]], device=image_embeds.device))
    if len({int(s) for s in sizes}) != 1:  # uneven last batch: contrast locally rather than pad
        return image_embeds, text_embeds, align_text_ids
    return (
        _GatherWithGrad.apply(image_embeds),
        _GatherWithGrad.apply(text_embeds.detach()),
        _GatherWithGrad.apply(align_text_ids) if align_text_ids is not None else None,
    )


class CFATrainer(Trainer):
    r"""
    Trainer for SkinCLIP-VL with the CFA loss (`L_focal + lambda_align L_align + lambda_calibration L_cal +
    lambda_gen L_gen`), computed and weighted by [`CFALoss`] alone.

    - Each term is logged separately (train and `eval_` prefixed), averaged over the logging window.
    - The optimised loss equals the loss of one large batch whatever the gradient accumulation and the number of
      processes: the trainer counts the labelled samples of the whole accumulated, all-process batch and passes that
      count and the world size to [`CFALoss`], which normalises the per-sample terms by it (see its docstring); the
      rationale LM loss is summed over tokens and divided by the global token count (`num_items_in_batch`) by the
      model. The Trainer is told the loss is already scaled (`loss_is_scaled_for_ga`).
    - `prediction_step` returns class logits only (never the B x L x V LM logits), with `(class_labels, group_ids)`
      (lesion/patient groups, for the bootstrap) as labels.
    - Checkpoints use the adapter layout of DESIGN.md (`adapter/` + config + remote code + processor), and resuming
      reads it back.

    Args:
        cfa_loss (`CFALoss`): the loss module (focal class weights and gamma, term weights).
        text_bank (`tuple[list[str], torch.Tensor]`, *optional*): all distinct alignment texts and their frozen
            embeddings; when given, each image is contrasted against the whole bank.
        gather_align_embeddings (`bool`, *optional*, defaults to `True`): gather alignment embeddings across processes.
        eval_data_collator (*optional*): collator for evaluation batches (e.g. one indexed into the validation split's
            cached features, or without augmentation); defaults to `data_collator`.
    """

    def __init__(
        self,
        *args,
        cfa_loss: CFALoss,
        text_bank=None,
        gather_align_embeddings: bool = True,
        eval_data_collator=None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.eval_data_collator = eval_data_collator
        self.cfa_loss = cfa_loss.to(self.args.device)
        self.gather_align_embeddings = gather_align_embeddings
        self.loss_is_scaled_for_ga = True
        self._num_samples_in_batch = None
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
        self.text_bank = None
        if text_bank is not None:
            from .collator import stable_id

            texts, embeds = text_bank
            self.text_bank = {
                "ids": torch.tensor([stable_id(t) for t in texts], dtype=torch.long),
                "embeds": embeds.float(),
            }

    # ------------------------------------------------------------------ loss
    def _get_num_items_in_batch(self, batch_samples, device):
        num_tokens = super()._get_num_items_in_batch(batch_samples, device)
        samples = sum(int((batch["class_labels"] != -100).sum()) for batch in batch_samples if "class_labels" in batch)
        samples = torch.tensor(samples, device=device)
        if self.args.world_size > 1:
            samples = self.accelerator.gather(samples).sum()
        self._num_samples_in_batch = samples
        return num_tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        class_labels = inputs.pop("class_labels")
        align_text_ids = inputs.pop("align_text_ids", None)
        inputs.pop("group_ids", None)
        if num_items_in_batch is not None:
            inputs["num_items_in_batch"] = num_items_in_batch
        outputs = model(**inputs)

        image_embeds, text_embeds = outputs.image_embeds, outputs.text_embeds
        aligning = self.cfa_loss.lambda_align > 0
        use_bank = self.text_bank is not None and aligning and image_embeds is not None
        bank_embeds = bank_targets = None
        if use_bank:
            bank_ids = self.text_bank["ids"].to(align_text_ids.device)
            bank_targets = (align_text_ids[:, None] == bank_ids[None, :]).float().argmax(dim=1)
            bank_embeds = self.text_bank["embeds"].to(image_embeds.device)
        elif self.gather_align_embeddings and text_embeds is not None and aligning:
            image_embeds, text_embeds, align_text_ids = gather_for_alignment(image_embeds, text_embeds, align_text_ids)
        # training under gradient accumulation / several processes: normalise by the global labelled count
        global_norm = model.training and num_items_in_batch is not None and self._num_samples_in_batch is not None
        terms = self.cfa_loss(
            outputs.class_logits,
            class_labels,
            image_embeds=image_embeds,
            text_embeds=None if use_bank else text_embeds,
            logit_scale=outputs.logit_scale,
            lm_loss=outputs.loss,
            align_text_ids=align_text_ids,
            bank_embeds=bank_embeds,
            bank_targets=bank_targets,
            num_labelled_in_batch=self._num_samples_in_batch if global_norm else None,
            world_size=self.args.world_size,
        )
        mode = "train" if model.training else "eval"
        for name in CFA_TERMS:
            value = terms[name]
            self._metrics[mode][name].append(float(value.detach()) if torch.is_tensor(value) else float(value))
        loss = terms["loss"]
        return (loss, outputs) if return_outputs else loss

    def pop_loss_terms(self, mode: str = "train") -> dict[str, float]:
        """Mean of each CFA term (`CFA_TERMS`) over the `compute_loss` calls since the last pop, for `mode` (`"train"`
        or `"eval"`), and starts a new window. `log` adds these to every log entry (`eval_` prefixed in evaluation)."""
        averaged = {name: sum(values) / len(values) for name, values in self._metrics[mode].items() if values}
        self._metrics[mode].clear()
        return averaged

    def log(self, logs: dict, start_time: float | None = None) -> None:
        mode = "eval" if any(key.startswith("eval_") for key in logs) else "train"
        averaged = self.pop_loss_terms(mode)
        if mode == "eval":
            averaged = {f"eval_{name}": value for name, value in averaged.items()}
        logs = {**logs, **averaged}
        super().log(logs, start_time)

    # ------------------------------------------------------------------ evaluation
    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_data_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = train_collator

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        labels = (inputs["class_labels"], inputs["group_ids"])
        with torch.no_grad():
            loss, outputs = self.compute_loss(model, inputs, return_outputs=True)
        class_logits = outputs.class_logits.detach()
        del outputs
        if prediction_loss_only:
            return loss.detach(), None, None
        return loss.detach(), class_logits, labels

    # ------------------------------------------------------------------ checkpoints in the adapter layout
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        model = _unwrap_peft(self.accelerator.unwrap_model(self.model))
        model.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_adapter_weights(self, checkpoint_dir: str) -> bool:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        path = os.path.join(checkpoint_dir, "adapter", "adapter_model.safetensors")
        model = self.accelerator.unwrap_model(self.model)
        if not os.path.isfile(path) or not hasattr(model, "peft_config"):
            return False
        result = set_peft_model_state_dict(model, load_file(path))
        if result.unexpected_keys:
            raise ValueError(f"Checkpoint {path} has keys this model lacks: {result.unexpected_keys[:5]}")
        return True

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if not self._load_adapter_weights(resume_from_checkpoint):
            super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        if not self._load_adapter_weights(self.state.best_model_checkpoint):
            super()._load_best_model()


__all__ = ["CFATrainer", "CFA_TERMS", "gather_for_alignment"]
