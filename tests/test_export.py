"""`tunekit export --format gguf`, checked by an independent reader: transformers' own GGUF loader
(`from_pretrained(dir, gguf_file=...)`) must give back the model's logits and the tokenizer's ids.
Tiny random Llamas with tunekit's byte-level tokenizer and, where models/ has it, SmolLM2's."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from tunekit.export import permute_rows

SMOL = Path(__file__).resolve().parent.parent / "models" / "smollm2-135m-instruct"
TEXTS = ["The quick brown fox jumps over the lazy dog.", "What is 12 + 30? It is 42.",
         "To be, or not to be: that is the question.", "Write a haiku about the sea."] * 20


def tiny_gpt_tokenizer():
    from tunekit.data.chat import train_tokenizer

    return train_tokenizer(TEXTS, vocab_size=300)


def smol_tokenizer():
    from transformers import AutoTokenizer

    if not (SMOL / "tokenizer.json").is_file():
        pytest.skip("models/smollm2-135m-instruct is not there (make models)")
    return AutoTokenizer.from_pretrained(SMOL)


def save_tiny_llama(folder: Path, tokenizer, tie: bool = True):
    """A 2-layer Llama with grouped-query attention (4 query, 2 key-value heads), 5 embedding rows
    more than the tokenizer has (as padded vocabularies do), and an FFN width (172) that is no
    whole number of q8_0 blocks."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer) + 5, hidden_size=64, intermediate_size=172, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96, tie_word_embeddings=tie,
        rms_norm_eps=1e-5, rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger than the default init, so logits differ enough to compare
        for parameter in model.parameters():
            parameter.normal_(0, 0.1) if parameter.dim() > 1 else parameter.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return model.eval()


def make_run(root: Path, model_folder: Path, method: str = "sft") -> Path:
    """A finished run folder as training writes it; run.json records the head the method trained."""
    run = root / f"{method}-run"
    shutil.copytree(model_folder, run / "model")
    task = "sequence-classification" if method == "classify" else "causal-lm"
    (run / "run.json").write_text(json.dumps({"method": method, "task": task, "status": "done",
                                              "base_model": str(model_folder)}))
    (run / "config.yaml").write_text(f"method: {method}\n")
    (run / "README.md").write_text(f"# {method} run\n\nA card.\n")
    return run


@pytest.fixture(scope="module")
def gpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt")
    model = save_tiny_llama(folder, tiny_gpt_tokenizer())
    return folder, model


def read_back(path: Path, dtype=None):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype or torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def relative_error(model, other, ids) -> float:
    import torch

    with torch.no_grad():
        a, b = model(ids).logits.float(), other(ids).logits.float()
    return ((a - b).abs().max() / a.abs().max()).item()


def prompt_ids(tokenizer):
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30? Write a haiku."}],
                                         tokenize=False, add_generation_prompt=True)
    return tokenizer(text, return_tensors="pt").input_ids


@pytest.mark.parametrize("kind, tolerance", [("f32", 1e-4), ("f16", 1e-2), ("bf16", 1e-2), ("q8_0", 5e-2)])
def test_logits_read_back(cli, gpt, tmp_path, kind, tolerance):
    folder, model = gpt
    run = make_run(tmp_path, folder)
    result = cli("export", run, "--type", kind)
    assert result.code == 0, result.err
    out = Path(result.last_line)
    assert out == run / f"{run.name}-{kind}.gguf" and out.is_file()
    back, tokenizer = read_back(out)
    assert relative_error(model, back, prompt_ids(tokenizer)) < tolerance


def test_smollm2_tokenizer_and_untied_output(tmp_path):
    """SmolLM2's tokenizer (pre-tokenizer `smollm`), and an output projection of its own."""
    from gguf import GGUFReader

    from tunekit.export import export

    tokenizer = smol_tokenizer()
    model = save_tiny_llama(tmp_path / "smol", tokenizer, tie=False)
    out = export(tmp_path / "smol", kind="f32", out=tmp_path / "out" / "smol.gguf")
    back, back_tokenizer = read_back(out)
    assert not back.config.tie_word_embeddings
    assert relative_error(model, back, prompt_ids(tokenizer)) < 1e-4
    fields = GGUFReader(out).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert "output.weight" in {t.name for t in GGUFReader(out).tensors}
    assert_same_ids(tokenizer, as_llama_cpp_splits(back_tokenizer, "smollm"))
    assert back_tokenizer.chat_template == tokenizer.chat_template
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "TEMPLATE" not in modelfile  # Ollama knows ChatML


def as_llama_cpp_splits(tokenizer, pre: str):
    """The read-back tokenizer splitting text as llama.cpp does for the file's pre-tokenizer name.
    transformers 5.24's GGUF reader knows no "smollm" and applies the GPT-2 pattern alone, which puts
    a whitespace run before a digit into other tokens ("  8" -> "Ġ", "Ġ", "8" instead of "ĠĠ", "8");
    llama.cpp (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM) isolates every digit first."""
    from tokenizers import Regex, pre_tokenizers

    assert pre == "smollm"
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\p{N}"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    return tokenizer


def varied_strings(tokenizer, count: int = 1000) -> list[str]:
    """Unicode (accents, CJK, emoji, combining marks), whitespace runs, digits, special tokens."""
    rng = random.Random(0)
    pieces = ["hello", " world", "The", "fox", "ünïcødé", "日本語のテキスト", "😀🚀", "e\u0301", "Ωμέγα", "\u00a0",
              "ß", "naïve café", "'s", "'ll", "--", "...", "?!", "(x)", "\\n", "{}", "<", "|"]
    spaces = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "\t\t  "]
    specials = list(tokenizer.all_special_tokens)
    strings = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(1, 12)):
            pick = rng.random()
            if pick < 0.4:
                parts.append(rng.choice(pieces))
            elif pick < 0.6:
                parts.append(rng.choice(spaces))
            elif pick < 0.85:
                parts.append(str(rng.randint(0, 10 ** rng.randint(1, 9))))
            else:
                parts.append(rng.choice(specials))
        strings.append("".join(parts))
    return strings


def assert_same_ids(tokenizer, back) -> None:
    strings = varied_strings(tokenizer)
    differ = [s for s in strings if tokenizer(s).input_ids != back(s).input_ids]
    assert not differ, f"{len(differ)} of {len(strings)} strings tokenise differently, e.g. {differ[:3]!r}"


def test_tiny_gpt_tokenizer_reads_back(gpt, tmp_path):
    from transformers import AutoTokenizer

    from tunekit.export import export

    folder, _ = gpt
    out = export(folder, kind="f16", out=tmp_path / "gpt.gguf")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    _, back = read_back(out)
    assert_same_ids(tokenizer, back)
    modelfile = out.with_suffix(".Modelfile").read_text()
    assert modelfile.startswith("# Ollama") and "FROM ./gpt.gguf" in modelfile
    assert 'PARAMETER stop "<|end|>"' in modelfile and 'TEMPLATE """' in modelfile  # tunekit's format: Ollama needs it
    assert 'PARAMETER stop "<|user|>"' in modelfile  # a model that starts the next turn is done


def test_metadata_and_tensors(gpt, tmp_path):
    import numpy as np
    from gguf import GGUFReader

    from tunekit.export import export

    folder, model = gpt
    out = export(folder, kind="q8_0", out=tmp_path / "gpt.gguf")
    reader = GGUFReader(out)
    fields = {name: field.contents() for name, field in reader.fields.items()
              if name not in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type")}
    assert fields["general.architecture"] == "llama"
    assert (fields["llama.context_length"], fields["llama.embedding_length"], fields["llama.block_count"]) == (96, 64, 2)
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.rope.freq_base"] == 50000.0 and fields["llama.rope.dimension_count"] == 16
    assert abs(fields["llama.attention.layer_norm_rms_epsilon"] - 1e-5) < 1e-12
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt-2"
    assert fields["tokenizer.ggml.eos_token_id"] == model.config.eos_token_id and fields["tokenizer.ggml.add_bos_token"] is False
    assert "generation %}" not in fields["tokenizer.chat_template"]  # TRL's training-only tags are dropped
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    assert len(types) == model.config.vocab_size and types[-5:] == [5] * 5 and 3 in types  # padding rows UNUSED, specials CONTROL
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied: the reader uses token_embd
    assert len(tensors) == 2 + 2 * 9
    assert tensors["token_embd.weight"].tensor_type.name == "Q8_0"
    assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F16"  # rows of 172: no whole q8_0 blocks
    assert tensors["blk.1.attn_norm.weight"].tensor_type.name == "F32"
    out32 = export(folder, kind="f32", out=tmp_path / "gpt32.gguf")
    stored = {t.name: np.array(t.data) for t in GGUFReader(out32).tensors}
    layer = model.model.layers[1].self_attn
    q, k = layer.q_proj.weight.detach().numpy(), layer.k_proj.weight.detach().numpy()
    assert np.array_equal(stored["blk.1.attn_q.weight"].reshape(q.shape), permute_rows(q, 4))
    assert np.array_equal(stored["blk.1.attn_k.weight"].reshape(k.shape), permute_rows(k, 2))
    assert np.array_equal(stored["blk.1.attn_v.weight"].reshape(k.shape), layer.v_proj.weight.detach().numpy())


def test_permutation_interleaves_the_halves_of_each_head():
    """Rows (head h, half j, index i) go to (h, i, j): each head's two halves interleaved."""
    import numpy as np

    rows = np.arange(8).reshape(8, 1)
    assert permute_rows(rows, 2).ravel().tolist() == [0, 2, 1, 3, 4, 6, 5, 7]
    assert permute_rows(rows, 1).ravel().tolist() == [0, 4, 1, 5, 2, 6, 3, 7]


@pytest.mark.parametrize("dora", [False, True])  # plain LoRA: merged tensor by tensor; DoRA: by peft
def test_adapter_run_is_merged_first(cli, gpt, tmp_path, dora):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = gpt
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    tuned = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "k_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False, use_dora=dora)).eval()
    run = tmp_path / "lora-run"
    tuned.save_pretrained(run / "adapter")
    base.config.save_pretrained(run / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.save_pretrained(run / "adapter")
    (run / "run.json").write_text(json.dumps({"method": "sft", "status": "done"}))
    (run / "config.yaml").write_text("method: sft\n")
    from tunekit.export import lora_merged_weights

    assert (lora_merged_weights(run / "adapter") is None) == dora
    result = cli("export", run, "--type", "f32", "--out", tmp_path / "lora.gguf")
    assert result.code == 0, result.err
    back, _ = read_back(tmp_path / "lora.gguf")
    ids = prompt_ids(tokenizer)
    assert relative_error(tuned, back, ids) < 1e-4
    assert relative_error(AutoModelForCausalLM.from_pretrained(folder), back, ids) > 1e-2  # the adapter mattered

    shutil.rmtree(folder.parent / "moved", ignore_errors=True)
    moved = folder.parent / "moved"
    folder.rename(moved)
    try:
        result = cli("export", run, "--type", "f32", "--out", tmp_path / "again.gguf")
        assert result.code == 2 and len(result.err.strip().splitlines()) == 1
        assert "the adapter's base model" in result.err and "is not there" in result.err
    finally:
        moved.rename(folder)


def test_export_is_recorded(cli, gpt, tmp_path):
    folder, _ = gpt
    run = make_run(tmp_path / "runs", folder)
    assert cli("export", run, "--type", "f16").code == 0
    info = json.loads((run / "run.json").read_text())
    assert [(e["format"], e["type"]) for e in info["exports"]] == [("gguf", "f16")]
    card = (run / "README.md").read_text()
    assert card.startswith("# sft run") and "## Exports" in card and f"{run.name}-f16.gguf" in card
    assert cli("export", run, "--type", "f16").code == 2  # exists: not replaced without --overwrite
    assert cli("export", run, "--type", "f16", "--overwrite").code == 0
    assert cli("export", run, "--type", "q8_0").code == 0
    card = (run / "README.md").read_text()
    assert card.count("## Exports") == 1 and card.count("| gguf |") == 2
    listing = cli("runs", tmp_path / "runs")
    assert "gguf:f16, gguf:q8_0" in listing.out
    assert not list(run.glob(".*.tmp"))


def test_bad_input_is_one_line(cli, gpt, tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    folder, _ = gpt
    run = make_run(tmp_path, folder)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300)).save_pretrained(tmp_path / "gpt2")
    classify = make_run(tmp_path, folder, method="classify")
    cases = {
        ("export", run, "--type", "q4_k"): "--type q4_k: unknown type; one of f32, f16, bf16, q8_0",
        ("export", run, "--format", "onnx"): "--format onnx: unknown format; one of gguf",
        ("export", tmp_path / "gpt2"): "a gpt2 model (GPT2LMHeadModel); `tunekit export` writes the Llama architecture",
        ("export", classify): "needs a causal LM",
        ("export", tmp_path / "nowhere"): "no such run folder",
        ("export", run, "--out", tmp_path / "x.bin"): "a GGUF file name ends in .gguf",
    }
    for args, message in cases.items():
        result = cli(*args)
        assert result.code == 2, (args, result.err)
        lines = result.err.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], (args, lines)
