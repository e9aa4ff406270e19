"""The tiny-model generator: deterministic files, requested shapes, loadable, usable tokenizer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from remp_sglang.tiny_model import MIN_VOCAB, TinyModelSpec, make_tiny_model

SHAPES = {"layers": 3, "heads": 6, "kv_heads": 2, "hidden": 48, "intermediate": 80, "vocab": 300}


def _file_bytes(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("qwen2"), "qwen2", **SHAPES, seed=3)


def test_same_arguments_give_byte_identical_files(tmp_path: Path, tiny_llama_dir: Path) -> None:
    again = make_tiny_model(tmp_path / "again", "llama")
    first, second = _file_bytes(tiny_llama_dir), _file_bytes(again)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(first)
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], f"{name} differs between two identical runs"


def test_a_different_seed_changes_the_weights_only(tmp_path: Path, tiny_llama_dir: Path) -> None:
    other = _file_bytes(make_tiny_model(tmp_path / "seed1", "llama", seed=1))
    base = _file_bytes(tiny_llama_dir)
    assert other["model.safetensors"] != base["model.safetensors"]
    assert other["tokenizer.json"] == base["tokenizer.json"]
    assert other["config.json"] == base["config.json"]


def test_command_line_writes_the_same_model(tmp_path: Path, qwen2_dir: Path) -> None:
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in SHAPES.items()]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "remp_sglang.tiny_model",
            "--arch",
            "qwen2",
            "--seed",
            "3",
            "--out",
            str(tmp_path / "cli"),
            *flags,
        ],
        check=True,
        capture_output=True,
    )
    assert _file_bytes(tmp_path / "cli") == _file_bytes(qwen2_dir)


def test_config_has_the_requested_shapes(qwen2_dir: Path) -> None:
    config = json.loads((qwen2_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert config["num_hidden_layers"] == SHAPES["layers"]
    assert config["num_attention_heads"] == SHAPES["heads"]
    assert config["num_key_value_heads"] == SHAPES["kv_heads"]
    assert config["hidden_size"] == SHAPES["hidden"]
    assert config["head_dim"] == SHAPES["hidden"] // SHAPES["heads"]
    assert config["intermediate_size"] == SHAPES["intermediate"]
    assert config["vocab_size"] == SHAPES["vocab"]
    assert config["dtype"] == "float32"
    assert config["tie_word_embeddings"] is False


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_transformers_loads_it_and_greedy_output_varies(tmp_path: Path, arch: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = make_tiny_model(tmp_path / arch, arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert model.dtype == torch.float32
    assert model.config.model_type == arch
    # Weights are the generated ones, not a fresh init: norms are perturbed around 1.
    assert not torch.allclose(model.model.norm.weight, torch.ones_like(model.model.norm.weight))

    model.generation_config.eos_token_id = None
    outputs = []
    for text in ["The quick brown fox", "Hello, world! How are you?", "def main(): return 0"]:
        prompt = tokenizer(text, return_tensors="pt").input_ids
        generated = model.generate(prompt, max_new_tokens=16, do_sample=False)
        outputs.append(generated[0, prompt.shape[1] :].tolist())
    assert all(len(set(out)) > 1 for out in outputs), outputs  # never one token repeated
    assert len({tuple(out) for out in outputs}) == len(outputs), outputs  # depends on the prompt
    assert len({token for out in outputs for token in out}) >= 16, outputs


def test_tokenizer_round_trips_text_and_has_specials(qwen2_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    assert len(tokenizer) == SHAPES["vocab"]
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    for text in ["The quick brown fox.", "  spaces,\ttabs\nand newlines ", "héllo wörld ✓ 日本"]:
        ids = tokenizer(text).input_ids
        assert ids[0] == tokenizer.bos_token_id
        assert max(ids) < SHAPES["vocab"]
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    merged = tokenizer("the model server").input_ids
    assert len(merged) < 1 + len("the model server"), "no BPE merges applied"
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat == "<|user|>hi\n<|assistant|>"


def test_large_vocab_is_padded_with_reserved_tokens(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    path = make_tiny_model(tmp_path / "big", layers=1, vocab=4000)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert len(tokenizer) == 4000
    assert tokenizer.convert_ids_to_tokens(3999).startswith("<|reserved_")


@pytest.mark.parametrize(
    "bad",
    [{"arch": "gpt2"}, {"heads": 3}, {"kv_heads": 3}, {"vocab": MIN_VOCAB - 1}, {"layers": 0}],
)
def test_invalid_specs_are_rejected(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        TinyModelSpec(**bad)
