"""Workarounds for upstream behaviour, walled off here, each with the version it was checked against."""

from __future__ import annotations

import functools
import inspect
from typing import Any

from transformers import Trainer
from trl import DPOTrainer, SFTTrainer


class LeanSFTTrainer(SFTTrainer):
    """SFTTrainer whose training step is Trainer's loss, computed where the labels are trained.

    TRL 1.16's `SFTTrainer.compute_loss` also computes per-token entropy and top-1 accuracy over
    the full logits on every step, for its logs; on a CPU that costs about a quarter of the step
    time (measured in bench/sft.py). tunekit builds its own labels (tunekit.data.masking), so the
    model's own loss is the SFT loss, averaged over the trained tokens of the whole batch.

    A training step takes that same loss from `tunekit.lean_loss` (the LM head only on trained
    positions, in chunks: no [batch, length, vocabulary] logits) whenever `lean_step` allows it, and
    so does an evaluation that wants the loss alone (`prediction_loss_only`: tunekit's held-out loss;
    its float32 logits of a batch of 8 rows of 256 tokens are 400 MB, and as much again for their
    log-softmax: the peak of a LoRA run of SmolLM2 on Alpaca rows). An evaluation that returns
    logits, and every other case, take transformers 5.24's `Trainer.compute_loss`, whose reduction
    (num_items_in_batch, the scaling across processes) the lean step repeats.
    """

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        # Padding-free packed rows are kept apart (block-diagonal attention from position_ids) only
        # when the model builds no KV cache; TRL sets the same flag in its own compute_loss.
        inputs["use_cache"] = False
        parts = self.lean_step(model, inputs, return_outputs)
        if parts is None:
            return Trainer.compute_loss(self, model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        from tunekit.lean_loss import lean_causal_lm_loss

        # The model divides by num_items_in_batch only when the Trainer passes it (model_accepts_loss_kwargs).
        # Mixed precision: accelerate puts autocast on the prepared model's forward, which this step
        # does not call (it runs the body and the head itself), so it enters autocast here.
        with self.accelerator.autocast():
            loss = lean_causal_lm_loss(parts, inputs, num_items_in_batch if self.model_accepts_loss_kwargs else None)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as Trainer.compute_loss does
        return loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], prediction_loss_only: bool,
                        ignore_keys: list[str] | None = None) -> tuple[Any, Any, Any]:
        """An evaluation batch's (loss, None, None) through compute_loss without outputs, so that the
        lean step can take it, when only the loss is wanted, the model is not sharded (FSDP, DeepSpeed:
        an evaluation gets the bare model, whose shards only the model's own forward gathers) and no
        parallelism config splits the inputs; else Trainer's own prediction_step. The loss is the one
        Trainer's would be: the same num_items_in_batch, under the same loss context."""
        import torch

        if (not prediction_loss_only or "labels" not in inputs or self.is_fsdp_enabled or self.is_deepspeed_enabled
                or getattr(self.accelerator, "parallelism_config", None)):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        num_items_in_batch = self._get_num_items_in_batch([inputs], self.args.device)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        return loss.detach().mean(), None, None

    def lean_step(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        """(body, head) for tunekit.lean_loss when this step can take its loss from there: the loss
        alone (no outputs) on plain labels, no loss option of the Trainer's (label smoothing,
        compute_loss_func, sequence parallelism), the model not wrapped (DDP, FSDP, DeepSpeed: their
        hooks live in the wrapper's forward) and its forward a plain body -> head -> cross-entropy
        (lean_parts)."""
        from tunekit.lean_loss import lean_parts

        parallel = getattr(self.accelerator, "parallelism_config", None)
        if (return_outputs or "labels" not in inputs
                or "shift_labels" in inputs or self.label_smoother is not None or self.compute_loss_func is not None
                or (parallel is not None and parallel.sp_enabled) or self.accelerator.unwrap_model(model) is not model):
            return None
        return lean_parts(model)


def completion_logps(model: Any, inputs: dict[str, Any]) -> Any:
    """Summed log-probability of the completion tokens of each row of a DPO batch (input_ids,
    attention_mask, completion_mask), from the model's plain logits."""
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], use_cache=False).logits
    targets = inputs["input_ids"][:, 1:]
    logps = logits[:, :-1].float().log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logps * inputs["completion_mask"][:, 1:]).sum(-1)


class LeanDPOTrainer(DPOTrainer):
    """DPOTrainer whose plain DPO step (sigmoid loss) takes log-probabilities from the model's logits.

    TRL 1.16 runs every forward through its fused LM head, which also computes entropy, mean logits
    and top-1 agreement for its logs; on a CPU a step of the tiny GPT (16 sequences of 256 tokens,
    LoRA) took 27 s that way against 16 s from the plain logits (measured on this 2-core machine,
    same batch, same loss to 1e-6). Any other loss type, or a TRL option that changes the loss,
    takes TRL's own step. Logged: rewards/{chosen,rejected,accuracies,margins}, logps/{chosen,rejected}.

    TRL 1.16 also copies the adapter of a PeftModel into a frozen "ref" adapter and uses that as the
    reference. tunekit's adapters are new (LoRA B = 0), so the copy is the base model, which is
    what tunekit's reference is: the base with the adapter switched off. The copy is dropped (it
    would also be saved beside the run's adapter), so TRL's step and this one agree.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        unwrapped = self.accelerator.unwrap_model(self.model)
        if self.ref_model is None and "ref" in getattr(unwrapped, "peft_config", {}):
            unwrapped.delete_adapter("ref")

    def _compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool) -> Any:
        import torch
        import torch.nn.functional as F

        plain = (self.loss_types == ["sigmoid"] and self.f_divergence_type == "reverse_kl" and not self.label_smoothing
                 and self.ld_alpha is None and not self.use_weighting and not self.aux_loss_enabled
                 and not self.precompute_ref_logps and not return_outputs)
        if not plain:
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        logps = completion_logps(model, inputs)
        with torch.no_grad():
            if self.ref_model is None:  # an adapter: the reference is the same network with it switched off
                with self.accelerator.unwrap_model(self.model).disable_adapter():
                    ref_logps = completion_logps(model, inputs)
            else:
                ref_logps = completion_logps(self.ref_model, inputs)
        rewards = self.beta * (logps - ref_logps)
        chosen, rejected = rewards.chunk(2)
        loss = -F.logsigmoid(chosen - rejected).mean()
        gather = self.accelerator.gather_for_metrics
        margins = (chosen - rejected).detach()
        for key, value in (("rewards/chosen", chosen), ("rewards/rejected", rejected), ("rewards/margins", margins),
                           ("rewards/accuracies", (margins > 0).float()), ("logps/chosen", logps.chunk(2)[0]),
                           ("logps/rejected", logps.chunk(2)[1])):
            self._metrics[mode][key].append(gather(value.detach()).mean().item())
        return loss


def allow_cpu_4bit_shapes(model: Any) -> Any:
    """Keep bitsandbytes 0.50.2's 4-bit layers on their generic CPU path.

    On a CPU with AVX512-BF16, the first forward pass without gradients (an evaluation) repacks each
    4-bit weight in place for a faster kernel. Two things then go wrong: the repacking asserts that
    out_features is a multiple of 32 and in_features of the quantisation block (a 688-wide MLP
    crashes), and layers repacked once stay repacked, so training after an evaluation (SFT's
    before-training loss) computes with the repacked weights: measured here, the logits in train
    mode moved by 0.02 and QLoRA's loss rose instead of falling. The generic path is exact."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def fsdp_on_cpu() -> None:
    """Let accelerate's FSDP engine run on CPU processes (gloo), as PyTorch's FSDP2 does.

    accelerate 1.15's `AcceleratorState.__init__` honours an FSDP plugin (from an FSDP config:
    ACCELERATE_USE_FSDP) only when the processes are GPU-like (MULTI_GPU, MULTI_XPU, ...). With
    processes on CPU it stays MULTI_CPU and trains with DDP, silently. PyTorch's `fully_shard`
    (FSDP2) itself trains on CPU with gloo (checked with torch 2.13), so after accelerate's own
    set-up the state is switched to FSDP with the plugin it was given, and the plugin gets the
    mixed-precision policy accelerate gives it on GPUs (checked with accelerate 1.15.0,
    torch 2.13.0, transformers 5.24.0). Does nothing where accelerate already chose FSDP (GPUs, or a
    later accelerate that fixes this)."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__
    if getattr(original, "tunekit_fsdp_on_cpu", False) or "fsdp_plugin" not in inspect.signature(original).parameters:
        return  # already switched, or an accelerate whose set-up differs (tunekit.distributed.check_started then says so)

    def init(self: Any, *args: Any, fsdp_plugin: Any = None, **kwargs: Any) -> None:
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            if self._mixed_precision != "no":  # as accelerate does for GPUs: bf16 gathers and computes in bf16
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    init.tunekit_fsdp_on_cpu = True  # type: ignore[attr-defined]
    AcceleratorState.__init__ = init


def keep_embeddings_out_of_fsdp_blocks(trainer: Any) -> None:
    """Under FSDP2, auto-wrap only the model's block classes that do not hold its input embedding.

    accelerate 1.15's `fsdp2_prepare_model` shards each class of the model's `_no_split_modules`
    (TRANSFORMER_BASED_WRAP), then shards the input embedding as a unit of its own. BERT-family
    models list `BertEmbeddings`, which holds the input embedding, so the embedding is sharded twice
    and `fully_shard` fails ("Invariant encountered: value was None"). Leaving that class out keeps
    accelerate's own embedding unit. A class list the user set in the accelerate config is kept."""
    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
    if plugin is None or plugin.fsdp_version != 2 or plugin.transformer_cls_names_to_wrap is not None:
        return
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    if plugin.auto_wrap_policy is not transformer_auto_wrap_policy:
        return
    model = trainer.model
    embedding = model.get_input_embeddings()
    holders = {type(m).__name__ for m in model.modules() if m is not embedding and any(s is embedding for s in m.modules())}
    blocks = list(getattr(model, "_no_split_modules", None) or [])
    plugin.transformer_cls_names_to_wrap = [name for name in blocks if name not in holders]


def keep_mean_losses_unscaled(trainer: Any) -> None:
    """Let the Trainer scale a mean loss for gradient accumulation and several processes itself.

    transformers 5.24's Trainer takes any model whose forward has `**kwargs` for one that divides
    its loss by the `num_items_in_batch` it passes (as causal LMs' `loss_function` does), and then
    neither divides the loss by gradient_accumulation_steps nor keeps it from being multiplied by
    the number of processes. BERT-family classification and masked-LM heads take `**kwargs` but
    return a plain batch mean (`CrossEntropyLoss()`), so their loss and gradients grew with both
    (a 2-class run at 2 accumulation steps logged 2 ln 2 from a random head). Only causal LMs
    normalise by the item count; every other model is told that it does not."""
    from transformers.trainer_utils import unwrap_peft_model

    model = unwrap_peft_model(trainer.accelerator.unwrap_model(trainer.model))
    if not type(model).__name__.endswith("ForCausalLM"):
        trainer.model_accepts_loss_kwargs = False


def forward_with_cache(model: Any, cache: Any, **inputs: Any) -> tuple[Any, Any]:
    """One decoding forward pass: (logits, the KV cache to pass next time).

    transformers 5.24 names the KV cache `cache` (argument and output); `past_key_values`, the name
    before it, still works there but warns that it goes in 5.40. Which one a model takes is read
    from its forward signature (the base model's, under a PEFT adapter)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = cache_argument(type(base))
    out = model(**inputs, **{name: cache})
    return out.logits, out[name]


@functools.cache
def cache_argument(model_class: type) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


def can_join(cache: Any) -> bool:
    """Whether `join_caches` can add rows to this KV cache: only when every layer is a plain
    `DynamicLayer` (transformers 5.24), whose state is its key and value tensors alone; sliding-window
    and other layer kinds keep offsets that left padding would break."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and layer.is_initialized for layer in layers)


def join_caches(first: Any, second: Any) -> None:
    """Append the rows of `second` to `first` (both `can_join`), padding the shorter on the left
    with zeros along the sequence; the caller's attention mask hides the padding."""
    import torch

    def padded(tensor: Any, length: int) -> Any:
        missing = length - tensor.shape[-2]
        if not missing:
            return tensor
        return torch.cat([tensor.new_zeros((*tensor.shape[:-2], missing, tensor.shape[-1])), tensor], dim=-2)

    for a, b in zip(first.layers, second.layers):
        length = max(a.keys.shape[-2], b.keys.shape[-2])
        a.keys = torch.cat([padded(a.keys, length), padded(b.keys, length)], dim=0)
        a.values = torch.cat([padded(a.values, length), padded(b.values, length)], dim=0)


def trim_cache_left(cache: Any, columns: int) -> None:
    """Drop the first `columns` positions of every layer of a `can_join` KV cache (transformers
    5.24 `DynamicLayer`: its key and value tensors are its whole state). The caller drops the same
    columns of its attention mask: they are padding in every row."""
    for layer in cache.layers:
        layer.keys = layer.keys[..., columns:, :]
        layer.values = layer.values[..., columns:, :]
