"""The lean SFT loss (tunekit.lean_loss: LM head on trained positions only, in chunks) equals the
model's own loss, and so do its gradients, for every parameter: Llama with a tied and an untied head,
GPT-2, padded and packed batches, gradient accumulation's num_items_in_batch, a LoRA adapter; models
whose forward is not body -> head -> cross-entropy keep their own loss."""

from __future__ import annotations

import pytest
import torch

from tunekit import lean_loss

VOCAB = 97


def tiny_model(kind: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))  # no dropout: comparable
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                         tie_word_embeddings=kind == "llama-tied")
    return LlamaForCausalLM(config)


def padded_batch() -> dict[str, torch.Tensor]:
    """Three rows of different lengths, right-padded; the first tokens of each row are a prompt (-100)."""
    generator = torch.Generator().manual_seed(1)
    lengths, prompts, width = (12, 7, 10), (5, 3, 6), 12
    input_ids = torch.randint(0, VOCAB, (3, width), generator=generator)
    attention_mask = torch.zeros(3, width, dtype=torch.long)
    labels = torch.full((3, width), -100)
    for row, (length, prompt) in enumerate(zip(lengths, prompts)):
        attention_mask[row, :length] = 1
        labels[row, prompt:length] = input_ids[row, prompt:length]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def packed_batch() -> dict[str, torch.Tensor]:
    """Two packed rows (sft.PackedRows' layout): position ids restart with each sequence, no attention mask."""
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=generator)
    position_ids = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 0, 1]])
    labels = input_ids.clone()
    labels[position_ids < 2] = -100  # each sequence's first tokens: prompt and boundary
    labels[1, 10:] = -100  # padding at the end of the second row
    return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}


def loss_and_grads(model: torch.nn.Module, compute) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = compute()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_same_as_model(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_items=None) -> None:
    extra = {} if num_items is None else {"num_items_in_batch": num_items}
    expected, expected_grads = loss_and_grads(model, lambda: model(**batch, **extra, use_cache=False).loss)
    parts = lean_loss.lean_parts(model)
    assert parts is not None
    got, got_grads = loss_and_grads(model, lambda: lean_loss.lean_causal_lm_loss(parts, batch, num_items))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert got_grads.keys() == expected_grads.keys() and got_grads
    for name, grad in expected_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(lean_loss, "CHUNK_ELEMENTS", 5 * VOCAB)  # 5 rows a chunk: several chunks per batch


@pytest.mark.parametrize("kind", ["llama-tied", "llama-untied", "gpt2"])
@pytest.mark.parametrize("batch", [padded_batch, packed_batch])
def test_loss_and_every_gradient_equal_the_models_own(kind, batch):
    model = tiny_model(kind)
    data = batch()
    assert_same_as_model(model, data)
    # gradient accumulation: divided by the trained tokens of all micro-batches, not of this one
    assert_same_as_model(model, data, num_items=torch.tensor(int((data["labels"][:, 1:] != -100).sum()) * 3))


@pytest.mark.parametrize("kind", ["llama-tied", "gpt2"])
def test_lora_adapter_gradients_equal_the_models_own(kind):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny_model(kind), LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear",
                                                        init_lora_weights=False))
    assert_same_as_model(model, packed_batch())
    assert_same_as_model(model, padded_batch(), num_items=17)


def test_models_that_change_their_logits_keep_their_own_loss():
    from peft import LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    assert gemma.config.final_logit_softcapping and lean_loss.lean_parts(gemma) is None
    prompted = get_peft_model(tiny_model("llama-tied"), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=2))
    assert lean_loss.lean_parts(prompted) is None
    adapted_head = get_peft_model(tiny_model("llama-untied"), LoraConfig(task_type="CAUSAL_LM", target_modules=["lm_head"]))
    assert lean_loss.lean_parts(adapted_head) is None
    assert lean_loss.lean_parts(torch.nn.Linear(2, 2)) is None


def trainer(folder, out, lean: bool, monkeypatch, lora: bool, bf16: bool = False):
    """tunekit's SFT trainer on 8 rows, batch 2, 2 accumulation steps, 2 optimizer steps (SGD: AdamW's
    first step moves a weight by the learning rate times the sign of its gradient, so float32 noise on a
    near-zero gradient would be magnified to the learning rate); `lean` False takes
    Trainer.compute_loss (the model's own loss) for every step."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from tunekit.upstream import LeanSFTTrainer

    if not lean:
        monkeypatch.setattr(LeanSFTTrainer, "lean_step", lambda self, *args: None)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    generator = torch.Generator().manual_seed(3)
    rows = []
    for length in (9, 14, 6, 11, 13, 8, 10, 7):
        ids = torch.randint(5, len(tokenizer), (length,), generator=generator).tolist()
        rows.append({"input_ids": ids, "labels": [-100] * (length // 2) + ids[length // 2:]})
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                     max_steps=2, learning_rate=1e-2, optim="sgd", report_to="none", save_strategy="no", logging_steps=1,
                     disable_tqdm=True, use_cpu=True, bf16=bf16, gradient_checkpointing=False, seed=0)
    model = AutoModelForCausalLM.from_pretrained(folder)
    if lora:  # as `tunekit lora` hands it over: a PeftModel
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, target_modules="all-linear"))
    return LeanSFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)


@pytest.mark.parametrize("lora", [False, True])
def test_sft_trainer_steps_equal_the_models_own_loss(tiny_gpt, tmp_path, monkeypatch, lora):
    from tunekit import upstream

    taken = []
    original = upstream.LeanSFTTrainer.lean_step

    def spy(self, *args):
        taken.append(original(self, *args) is not None)
        return original(self, *args)

    monkeypatch.setattr(upstream.LeanSFTTrainer, "lean_step", spy)
    lean = trainer(tiny_gpt, tmp_path / "lean", True, monkeypatch, lora)
    lean_losses = [r["loss"] for r in lean.train() and lean.state.log_history if "loss" in r]
    assert taken and all(taken)
    monkeypatch.undo()
    plain = trainer(tiny_gpt, tmp_path / "plain", False, monkeypatch, lora)
    plain_losses = [r["loss"] for r in plain.train() and plain.state.log_history if "loss" in r]
    assert lean_losses == pytest.approx(plain_losses, rel=1e-5)
    for (name, a), b in zip(lean.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("lora", [False, True])
def test_held_out_loss_equals_the_models_own_without_whole_batch_logits(tiny_gpt, tmp_path, monkeypatch, lora):
    """An evaluation that wants the loss alone takes it from the lean path: the LM head sees the
    trained positions only (a chunk at a time), nothing is computed for a gradient, and eval_loss is
    Trainer's own to float32 tolerance."""
    import torch.nn.functional as F

    from tunekit import lean_loss

    plain = trainer(tiny_gpt, tmp_path / "plain", False, monkeypatch, lora)
    expected = plain.evaluate(plain.train_dataset)["eval_loss"]
    monkeypatch.undo()
    lean = trainer(tiny_gpt, tmp_path / "lean", True, monkeypatch, lora)
    vocabulary = lean.model.get_output_embeddings().weight.shape[0]
    head_rows, functions = [], []
    linear = F.linear
    monkeypatch.setattr(F, "linear", lambda x, w, b=None: (w.shape[0] == vocabulary and head_rows.append(x.shape[0]))
                        or linear(x, w, b))
    monkeypatch.setattr(lean_loss.ChunkedCrossEntropy, "apply", lambda *a: functions.append(a))
    measured = lean.evaluate(lean.train_dataset)["eval_loss"]
    trained = sum(sum(label != -100 for label in row["labels"][1:]) for row in lean.train_dataset)
    assert measured == pytest.approx(expected, rel=1e-5)
    assert sum(head_rows) == trained and not functions  # 8 rows' trained positions, no gradient Function


def test_sft_trainer_steps_keep_mixed_precision(tiny_gpt, tmp_path, monkeypatch):
    """train.bf16: accelerate puts autocast on the prepared model's forward, which the lean step does
    not call; the lean step enters it itself, so its matrix products run in bf16 as the model's own
    forward's do, and its losses are the plain path's under the same autocast."""
    def losses_and_dtypes(lean: bool):
        model = trainer(tiny_gpt, tmp_path / str(lean), lean, monkeypatch, False, bf16=True)
        dtypes = []
        layer = model.model.model.layers[0].mlp.down_proj
        layer.register_forward_hook(lambda module, args, out: dtypes.append(out.dtype) if module.training else None)
        model.train()
        monkeypatch.undo()
        return [r["loss"] for r in model.state.log_history if "loss" in r], set(dtypes)

    lean_losses, lean_dtypes = losses_and_dtypes(True)
    plain_losses, plain_dtypes = losses_and_dtypes(False)
    assert lean_dtypes == plain_dtypes == {torch.bfloat16}
    assert lean_losses == pytest.approx(plain_losses, rel=2e-2)


@pytest.mark.parametrize("kind", ["llama-untied", "gpt2"])
def test_under_autocast_the_head_products_run_in_its_dtype(kind):
    """With bf16 autocast every product of the head (logits, and the gradients of the rows and of the
    weight) runs in bf16, as autograd's linear backward runs them: no float32 product of the vocabulary's
    size is left (a float32 weight-gradient product was a quarter of an H200 step's device time), and the
    loss and gradients are the model's own under the same autocast, to bf16's precision."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Products(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.dtypes: set[torch.dtype] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_):
                if any(VOCAB in a.shape for a in args if isinstance(a, torch.Tensor)):
                    self.dtypes.add(args[-1].dtype)
            return func(*args, **(kwargs or {}))

    model, batch = tiny_model(kind), packed_batch()
    parts = lean_loss.lean_parts(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, expected_grads = loss_and_grads(model, lambda: model(**batch, use_cache=False).loss)
        spy = Products()
        with spy:
            got, got_grads = loss_and_grads(model, lambda: lean_loss.lean_causal_lm_loss(parts, batch))
    assert spy.dtypes == {torch.bfloat16}
    torch.testing.assert_close(got, expected, rtol=1e-2, atol=1e-3)
    for name, grad in expected_grads.items():
        assert got_grads[name].dtype == torch.float32
        torch.testing.assert_close(got_grads[name], grad, rtol=5e-2, atol=2e-3, msg=name)
