"""A causal LM's SFT loss with the LM head run only where a label is trained, in chunks.

Completion-only SFT trains a fraction of the positions of a batch (about a quarter on the
arithmetic rows: the prompt, padding and each packed sequence's first token carry label -100), yet
the model's own forward runs the LM head on every position and holds float32 logits of
[batch, length, vocabulary] (at SmolLM2's 49,152 words, batch 8 of 256 tokens: 1.6 GB, and as much
again for their gradient). Here the decoder body runs as usual, the hidden states at the trained
positions are picked out, and the head and the cross-entropy run on those rows, a chunk at a time
(`CHUNK_ELEMENTS` logits each). Each chunk's gradient with respect to its logits (softmax minus the
one-hot target) is turned into the gradients of the hidden rows and of the head at once and the
chunk's logits are freed, so neither the forward nor the backward ever holds more than one chunk of
logits, and nothing is recomputed.

The loss is the one transformers 5.24's `ForCausalLMLoss` gives: the sum over trained tokens
divided by `num_items_in_batch` when the Trainer passes it (gradient accumulation: the trained
tokens of all micro-batches), else the mean over the batch's trained tokens. `lean_parts` says
whether a model's forward is that simple; any other model keeps its own loss.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

# Logits per chunk (128 MB in float32): 682 rows at a 49,152-word vocabulary, 4,096 at 8,192.
CHUNK_ELEMENTS = 2**25
# Config fields of models whose logits are not the plain head output (softcapping, scaling).
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                    "lm_head_multiplier")


def lean_parts(model: Any) -> tuple[Any, Any] | None:
    """(decoder body, LM head) of a causal LM (or of the model under a PEFT adapter) whose logits are
    the plain head output of the body's last hidden state and whose loss is ForCausalLMLoss; None for
    any other model (prompt-learning adapters, logit softcapping or scaling, MoE router losses, a head
    that is not a plain Linear layer, such as a quantised or adapted one)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    if hasattr(model, "get_base_model"):  # PEFT: LoRA-style adapters sit inside the base model's layers
        config = getattr(model, "active_peft_config", None)
        if config is None or config.is_prompt_learning:
            return None
        model = model.get_base_model()
    body = getattr(model, "base_model", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    if body is None or body is model or type(head) is not torch.nn.Linear or config is None:
        return None
    text = config.get_text_config()
    if any(getattr(text, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    if getattr(text, "output_router_logits", False) or getattr(model, "loss_function", None) is not ForCausalLMLoss:
        return None
    return body, head


def lean_causal_lm_loss(parts: tuple[Any, Any], inputs: dict[str, Any], num_items_in_batch: Any = None) -> Any:
    """The model's causal-LM loss on `inputs` (input_ids, labels, and attention_mask and/or
    position_ids), computed on the trained positions only."""
    body, head = parts
    features = {k: v for k, v in inputs.items() if k not in ("labels", "num_items_in_batch", "use_cache")}
    hidden = body(**features, use_cache=False).last_hidden_state
    targets = inputs["labels"][:, 1:].to(hidden.device)
    trained = targets != -100
    rows = hidden[:, :-1][trained]  # row i predicts the label one position on
    if torch.is_grad_enabled():
        total = ChunkedCrossEntropy.apply(rows, head.weight, head.bias, targets[trained])
    else:  # an evaluation: the loss alone (the Function would compute gradients for a trainable head,
        # and with the head detached its logsumexp moves the loss by ~3e-6; this is the model's own, bit for bit)
        total = -token_logprobs(rows, head.weight, head.bias, targets[trained], 1.0)[0].sum()
    if num_items_in_batch is None:
        return total / trained.sum()  # the mean over trained tokens (0/0 when there is none, as before)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def compute_dtype(device_type: str, weight_dtype: Any) -> Any:
    """The dtype a linear layer's products run in: autocast's when it is on, else the weight's."""
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else weight_dtype


def chunk_rows(vocabulary: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocabulary)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `targets` under logits `rows @ weight.T + bias` (upcast to float32,
    as transformers does), chunk by chunk; the gradients are computed in the forward pass, one
    chunk of logits at a time, and only scaled in the backward."""

    @staticmethod
    def forward(ctx: Any, rows: Any, weight: Any, bias: Any, targets: Any) -> Any:
        want_rows, want_weight, want_bias = ctx.needs_input_grad[:3]
        grad_rows = torch.empty_like(rows) if want_rows else None
        grad_weight = torch.zeros_like(weight) if want_weight else None
        grad_bias = torch.zeros_like(bias) if want_bias else None
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        # Under autocast the head's products run in its dtype, as autograd's linear would run them; the
        # weight is cast once here, not again by each chunk's products (an H200 profile found the
        # weight gradient's product in float32 SIMT kernels: a quarter of the device time of a step).
        dtype = compute_dtype(rows.device.type, weight.dtype)
        head = weight.to(dtype)
        step = chunk_rows(weight.shape[0])
        for start in range(0, rows.shape[0], step):
            part, target = rows[start : start + step].to(dtype), targets[start : start + step]
            logits = F.linear(part, head, bias).float()
            norm = torch.logsumexp(logits, dim=-1)
            picked = torch.arange(target.shape[0], device=target.device)
            total += (norm - logits[picked, target]).sum()
            if not (want_rows or want_weight or want_bias):
                continue
            grad = logits.sub_(norm.unsqueeze(-1)).exp_()  # softmax, in the logits' memory
            grad[picked, target] -= 1.0
            grad = grad.to(dtype)
            if want_rows:
                grad_rows[start : start + step] = grad @ head
            if want_weight and dtype == weight.dtype:
                grad_weight.addmm_(grad.t(), part)
            elif want_weight:  # the product in the autocast dtype, summed in the weight's
                grad_weight += grad.t() @ part
            if want_bias:
                grad_bias += grad.sum(0)
            del logits, grad
        ctx.save_for_backward(*(g for g in (grad_rows, grad_weight, grad_bias) if g is not None))
        ctx.present = (want_rows, want_weight, want_bias)
        return total

    @staticmethod
    def backward(ctx: Any, grad_total: Any) -> tuple[Any, ...]:
        saved = iter(ctx.saved_tensors)
        grads = []
        for want in ctx.present:
            grads.append(None)
            if want:
                grad = next(saved)
                grads[-1] = grad * grad_total.to(grad.dtype)
        return (*grads, None)


def token_logprobs(rows: Any, weight: Any, bias: Any, targets: Any, temperature: float, with_entropy: bool = False
                   ) -> tuple[Any, Any]:
    """log softmax((rows @ weight.T + bias) / temperature) at each row's target, in float32, and (with
    `with_entropy`) the entropy of each row's distribution; (log-probs, entropies or None).

    The head runs `chunk_rows` rows at a time, so no more than one chunk of logits is ever held
    (RL scores whole rollout batches: 32 responses of 64 tokens at a 49,152-word vocabulary are 400 MB
    of float32 logits, and each step of a log-softmax or an entropy another copy). With gradients and
    more than one chunk, each chunk is checkpointed: its logits are made again in the backward pass
    instead of kept, which costs one more head product per chunk; a batch that fits one chunk (682
    rows at a 49,152-word vocabulary: a PPO minibatch of 8 responses of 64 tokens) is computed once."""
    from torch.utils.checkpoint import checkpoint

    def chunk(part: Any, target: Any) -> tuple[Any, Any]:
        return tempered_logprobs(F.linear(part, weight, bias), target, temperature, with_entropy)

    step = chunk_rows(weight.shape[0])
    if rows.shape[0] <= step:
        return chunk(rows, targets)
    remake = torch.is_grad_enabled() and (rows.requires_grad or weight.requires_grad)
    parts = [checkpoint(chunk, rows[start : start + step], targets[start : start + step], use_reentrant=False)
             if remake else chunk(rows[start : start + step], targets[start : start + step])
             for start in range(0, rows.shape[0], step)]
    picked = torch.cat([p for p, _ in parts])
    return picked, torch.cat([e for _, e in parts]) if with_entropy else None


def tempered_logprobs(logits: Any, targets: Any, temperature: float, with_entropy: bool = False) -> tuple[Any, Any]:
    """log softmax(logits / temperature) at `targets` (one per row of the last dimension), in float32,
    and (with `with_entropy`) the entropy of each row's distribution; (log-probs, entropies or None)."""
    logprobs = (logits.float() / max(temperature, 1e-6)).log_softmax(-1)
    picked = logprobs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return picked, -(logprobs.exp() * logprobs).sum(-1) if with_entropy else None
