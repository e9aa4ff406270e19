"""Seeded random-weight dense models with a locally built tokenizer.

Tests and demos need real checkpoints that SGLang and ``transformers`` both load, but
no hub is reachable. This module writes one from nothing: a ``transformers`` config,
weights drawn from a seeded generator, and a byte-level BPE tokenizer whose merges are
learned deterministically from a fixed text embedded below. The same arguments always
give byte-identical files, so a test can regenerate a model instead of storing it.

Usage: ``python -m remp_sglang.tiny_model --arch llama --out DIR [--layers N ...]``.
"""

from __future__ import annotations

import argparse
import math
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN = "<|pad|>", "<|bos|>", "<|eos|>", "<|unk|>"
# ids 0-3. Byte-level BPE never emits unk, but naming one keeps transformers'
# Qwen2Tokenizer from appending its default "<|endoftext|>" beyond the model's vocab.
SPECIAL_TOKENS = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
NUM_BYTE_TOKENS = 256
MIN_VOCAB = len(SPECIAL_TOKENS) + NUM_BYTE_TOKENS

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>{{ message['content'] }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# The text the BPE merges are learned from: any fixed text works; this one is plain
# prose so that common English fragments become single tokens.
_MERGE_CORPUS = """\
A language model server keeps the keys and values of every token it has seen in a
cache, so that the next token can be computed without reading the whole prompt again.
When many requests share a prefix, such as a system prompt or the first turns of a
conversation, the server can store that prefix once and reuse it for all of them.
The cache lives in the memory of the devices that run the model. With tensor
parallelism every device holds a slice of the attention heads of every layer; with
pipeline parallelism every device holds all the heads of a range of layers. Changing
the layout while the server is running means moving those slices between devices,
rebuilding the model and its communication groups, and resuming the requests that
were waiting, without losing the tokens that were already computed.
The quick brown fox jumps over the lazy dog. The five boxing wizards jump quickly.
Pack my box with five dozen liquor jugs. How vexingly quick daft zebras jump.
Hello, world! How are you today? I am fine, thank you. What is the weather like?
It is sunny and warm, with a light wind from the west and a few clouds in the sky.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 16 32 64 128 256 512 1024 2048 4096.
Code: def main(): return 0; for i in range(10): print(i); if x == y: break.
The model reads the prompt, writes the answer one token at a time, and stops when it
writes the end of sequence token or reaches the largest number of new tokens allowed.
"""

_ARCHITECTURES = ("llama", "qwen2", "qwen3")


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and seed of a tiny model; every field is a CLI flag of this module."""

    arch: str = "llama"
    layers: int = 4
    heads: int = 4
    kv_heads: int = 2
    hidden: int = 64
    intermediate: int = 128
    vocab: int = 384
    max_position: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        if self.arch not in _ARCHITECTURES:
            raise ValueError(f"arch must be one of {_ARCHITECTURES}, got {self.arch!r}")
        if min(self.layers, self.heads, self.kv_heads, self.hidden, self.intermediate) < 1:
            raise ValueError(f"sizes must be positive: {self}")
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must be a multiple of heads, heads a multiple of kv_heads")
        if self.vocab < MIN_VOCAB:
            raise ValueError(f"vocab must be at least {MIN_VOCAB} (specials + 256 bytes)")


def _byte_alphabet() -> list[str]:
    """GPT-2's byte-to-printable-character map, in byte order (what ByteLevel uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    chars: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(NUM_BYTE_TOKENS):
        if b not in chars:
            chars[b] = chr(NUM_BYTE_TOKENS + extra)
            extra += 1
    return [chars[b] for b in range(NUM_BYTE_TOKENS)]


def _learn_merges(num_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned from the fixed corpus, ties broken by the pair itself.

    Stops early when no adjacent pair is left (every corpus word is one token).
    """
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    word_counts = Counter(piece for piece, _ in pre.pre_tokenize_str(_MERGE_CORPUS))
    words = {tuple(word): count for word, count in sorted(word_counts.items())}
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        merged: dict[tuple[str, ...], int] = {}
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if symbols[i : i + 2] == best:
                    out.append(best[0] + best[1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


def build_tokenizer(vocab_size: int, max_length: int):
    """A byte-level BPE ``PreTrainedTokenizerFast`` of exactly ``vocab_size`` ids.

    Ids 0-3 are pad/bos/eos/unk, then the 256 bytes, then learned merges; if the corpus
    runs out of merges the rest are ``<|reserved_N|>`` special tokens, so every id the
    model can emit decodes.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in _byte_alphabet():
        vocab[char] = len(vocab)
    merges = _learn_merges(vocab_size - len(vocab))
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    reserved = [f"<|reserved_{i}|>" for i in range(vocab_size - len(vocab))]

    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token in (*SPECIAL_TOKENS, *reserved)
        ]
    )
    bos_id = vocab[BOS_TOKEN]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    if tokenizer.get_vocab_size() != vocab_size:
        raise AssertionError(f"tokenizer has {tokenizer.get_vocab_size()} ids, not {vocab_size}")
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        unk_token=UNK_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=max_length,
    )


def build_config(spec: TinyModelSpec):
    """The ``transformers`` config for ``spec``, float32, untied LM head."""
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[spec.arch]
    config = config_class(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        head_dim=spec.hidden // spec.heads,
        max_position_embeddings=spec.max_position,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        pad_token_id=SPECIAL_TOKENS.index(PAD_TOKEN),
        bos_token_id=SPECIAL_TOKENS.index(BOS_TOKEN),
        eos_token_id=SPECIAL_TOKENS.index(EOS_TOKEN),
    )
    config.dtype = torch.float32
    return config


#: Extra scale of some linear weights, by module name (see ``_fill_weights``).
_GAINS = {"o_proj": 2.0, "down_proj": 2.0, "lm_head": 2.0}


def _fill_weights(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every parameter from one seeded generator, in parameter order.

    Linear weights are N(0, 1/fan_in), so every activation is O(1) in float32 and
    attention is far from uniform. The projections that close a residual branch
    (``o_proj``, ``down_proj``) are doubled so the context outweighs the current
    token's embedding: at unit gain a third of the greedy continuations fall into
    one-token loops, at 2 under a tenth. The LM head is doubled to widen the gap
    between the top two logits. (std 0.02, the transformers default, gives
    near-constant output at these widths.) Embeddings are N(0, 1); norm weights
    1 + N(0, 0.1^2) and biases N(0, 0.1^2), so a norm or a bias loaded into the
    wrong place changes the output.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.1 * noise
            elif name.endswith(".bias"):
                value = 0.1 * noise
            elif "embed_tokens" in name:
                value = noise
            else:
                gain = _GAINS.get(name.rsplit(".", 2)[-2], 1.0)
                value = gain * noise / math.sqrt(param.shape[-1])
            param.copy_(value)


def make_tiny_model(
    out_dir: str | Path,
    arch: str = "llama",
    *,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    hidden: int = 64,
    intermediate: int = 128,
    vocab: int = 384,
    max_position: int = 1024,
    seed: int = 0,
) -> Path:
    """Write a tiny random-weight model and its tokenizer to ``out_dir``; return it.

    Files of the same names in ``out_dir`` are overwritten.
    """
    from transformers import AutoModelForCausalLM

    spec = TinyModelSpec(
        arch=arch,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        hidden=hidden,
        intermediate=intermediate,
        vocab=vocab,
        max_position=max_position,
        seed=seed,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = AutoModelForCausalLM.from_config(build_config(spec), dtype=torch.float32)
    _fill_weights(model, spec.seed)
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer(spec.vocab, spec.max_position).save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> None:
    defaults = TinyModelSpec()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=_ARCHITECTURES, default=defaults.arch)
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    for field, value in asdict(defaults).items():
        if field != "arch":
            parser.add_argument("--" + field.replace("_", "-"), dest=field, type=int, default=value)
    args = vars(parser.parse_args(argv))
    out = make_tiny_model(args.pop("out"), **args)
    print(out)


if __name__ == "__main__":
    main()
