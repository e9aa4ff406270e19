"""Checks shared by the live-reshape test modules (real servers, --remp)."""

from __future__ import annotations

from pathlib import Path

import torch

PROMPTS = ("The quick brown fox", "Hello, world! How are you today?", "def main(): return 0")
NEW_TOKENS = 12


def transformers_greedy(
    model_dir: Path, prompts: tuple[str, ...] = PROMPTS, new_tokens: int = NEW_TOKENS
) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, transformers' greedy continuations) in float32: the reference."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # Never stop early: the server runs with ignore_eos, so both produce new_tokens.
    model.generation_config.eos_token_id = None
    prompt_ids, outputs = [], []
    with torch.no_grad():
        for text in prompts:
            ids = tokenizer(text, return_tensors="pt").input_ids
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False)
            prompt_ids.append(ids[0].tolist())
            outputs.append(out[0, ids.shape[1]:].tolist())
    assert all(len(out) == new_tokens for out in outputs)
    return prompt_ids, outputs


def model_and_fault_file(model_dir: Path, root: Path) -> tuple[Path, Path]:
    """A copy of the tiny model under `root` and an empty fault spec for a server
    launched with ``REMP_FAULT_INJECT=@spec`` (a test writes a fault before a reshape)."""
    import shutil

    copy = root / "llama"
    shutil.copytree(model_dir, copy)
    spec = root / "fault"
    spec.write_text("")
    return copy, spec


def reshape(server, tp: int, pp: int) -> dict:
    response = server.post("/remp/reshape", {"tp": tp, "pp": pp}, timeout=600)
    assert response.status_code == 200, response.text + server.log_tail(80)
    return response.json()


def topology(server) -> dict:
    response = server.get("/remp/topology", timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def digest(server) -> dict:
    response = server.get("/remp/debug/kv_digest", timeout=120)
    assert response.status_code == 200, response.text
    return response.json()


def check_greedy(server, reference) -> None:
    prompts, outputs = reference
    for ids, want in zip(prompts, outputs, strict=True):
        assert server.generate_ids(ids, NEW_TOKENS) == want


def same_rows(before: dict, after: dict) -> bool:
    """Every (layer, KV head) now holds rows bit-identical to one of its holders before."""
    return before.keys() == after.keys() and all(
        set(after[key]) <= set(before[key]) for key in before
    )
