"""llama.cpp itself reads tunekit's GGUF export: the same prompt ids as the tokenizer, and on at
least 9 of 10 prompts the same greedy text as tunekit's own generation (its kernels round
differently). Skipped, never passed, where `llama-cpp-python` is not installed (it builds from its
source distribution: `pip install llama-cpp-python==0.3.36`, minutes with cmake) or where the model
is missing. The model is models/smollm2-135m-instruct (`make models`), or the run folder named by
TUNEKIT_EXPORT_RUN (a LoRA run on it, say)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def prompts(arith: Path) -> list[str]:
    """Eight held-out sums (conftest writes data/arith) and two open prompts."""
    heldout = (arith / "heldout.jsonl").read_text().splitlines()[:8]
    return [json.loads(line)["prompt"] for line in heldout] + [
        "Name three colours.", "Write one sentence about the sea."]


@pytest.mark.slow
def test_llama_cpp_gives_the_greedy_text_of_tunekit(tmp_path, arith_data):
    llama_cpp = pytest.importorskip("llama_cpp")
    target = Path(os.environ.get("TUNEKIT_EXPORT_RUN", ROOT / "models" / "smollm2-135m-instruct"))
    if not target.is_dir():
        pytest.skip(f"{target} is not there (make models, or TUNEKIT_EXPORT_RUN=RUN)")
    from tunekit.export import export
    from tunekit.generation import generate, load_chat_model, settings_with

    out = export(target, kind="f32", out=tmp_path / "model-f32.gguf")
    model, tokenizer, _ = load_chat_model(str(target), "test")
    conversations = [[{"role": "user", "content": p}] for p in prompts(arith_data)]
    greedy = settings_with({}, temperature=0.0, max_new_tokens=32)
    # one prompt at a time, as llama.cpp runs them: no padding in either
    ours = [generate(model, tokenizer, [c], greedy)[0]["response"] for c in conversations]

    llm = llama_cpp.Llama(model_path=str(out), n_ctx=512, n_threads=2, seed=0, verbose=False)
    theirs = []
    for conversation in conversations:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        assert ids == tokenizer(text, add_special_tokens=False).input_ids
        new: list[int] = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
            if token == llm.token_eos() or len(new) == greedy.max_new_tokens:
                break
            new.append(token)
        theirs.append(tokenizer.decode(new, skip_special_tokens=True).strip())
        llm.reset()
    same = sum(a == b for a, b in zip(ours, theirs))
    print(f"llama.cpp and tunekit agree on {same} of {len(conversations)} prompts")
    for a, b in zip(ours, theirs):
        print(f"  tunekit: {a!r}\n  llama.cpp: {b!r}")
    assert same >= 9


@pytest.mark.parametrize("tokenizer_of", ["tunekit", "smollm2"])
def test_llama_cpp_tokenises_like_the_tokenizer(tmp_path, tokenizer_of):
    """llama.cpp's own tokenizer, built from the file's metadata (pre-tokenizer by name), gives the
    ids of the run's tokenizer on 1,000 varied strings."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from test_export import save_tiny_llama, smol_tokenizer, tiny_gpt_tokenizer, varied_strings

    from tunekit.export import export

    tokenizer = smol_tokenizer() if tokenizer_of == "smollm2" else tiny_gpt_tokenizer()
    save_tiny_llama(tmp_path / "model", tokenizer)
    out = export(tmp_path / "model", kind="f32", out=tmp_path / "model.gguf")
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    strings = varied_strings(tokenizer)
    differ = [s for s in strings
              if llm.tokenize(s.encode("utf-8"), add_bos=False, special=True) != tokenizer(s, add_special_tokens=False).input_ids]
    assert not differ, f"{len(differ)} of {len(strings)} differ, e.g. {differ[:3]!r}"
