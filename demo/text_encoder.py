"""A fixed, deterministic text encoding for the demo world: no trained text model.

Every vocabulary word and every token position gets its own vector from one seeded orthonormal basis, so words are
exactly distinguishable and position (which matters in "turns green") is visible to attention. A prompt becomes
MAX_TOKENS token vectors (word + 0.5 * position, zero padding) and a pooled vector (mean of its word vectors).
The empty prompt encodes to all zeros: that is the unconditional input the models were trained with (CFG dropout).
"""

from __future__ import annotations

import re

import torch

from .shapes_world import ATTRIBUTES

EMBED_DIM = 64
MAX_TOKENS = 8
FASHION_CLASSES = (
    "tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot",
)  # fmt: skip
_MOTION_WORDS = ("moves", "turns", "grows", "shrinks", "up", "down")
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(word for values in ATTRIBUTES.values() for word in values).keys()
) + _MOTION_WORDS + FASHION_CLASSES  # fmt: skip
# Words that carry nothing in this world and are dropped; phrases folded into single tokens first.
STOP_WORDS = frozenset({"a", "an", "the", "and", "with", "on", "at", "of", "to", "in", "is", "that", "then"})
_PHRASES = {"t-shirt": "tshirt", "t shirt": "tshirt", "ankle boot": "ankle_boot", "ankle-boot": "ankle_boot",
            "trousers": "trouser", "sneakers": "sneaker", "sandals": "sandal", "centre": "center",
            "middle": "center", "big": "large"}  # fmt: skip
_SEED = 20261126


def _basis() -> torch.Tensor:
    count = len(VOCABULARY) + MAX_TOKENS
    gen = torch.Generator().manual_seed(_SEED)
    q, _ = torch.linalg.qr(torch.randn(EMBED_DIM, count, generator=gen, dtype=torch.float64))
    return (q.T * EMBED_DIM**0.5).to(torch.float32)  # rows: unit-variance entries, mutually orthogonal


_BASIS = _basis()
_WORD_INDEX = {word: i for i, word in enumerate(VOCABULARY)}


def tokenize(text: str) -> list[str]:
    """Lower-case words of the vocabulary, in order; a clear error for anything else."""
    text = text.lower()
    for phrase, token in _PHRASES.items():
        text = re.sub(rf"\b{re.escape(phrase)}\b", token, text)
    words = [w for w in re.findall(r"[a-z_]+", text) if w not in STOP_WORDS]
    unknown = [w for w in words if w not in _WORD_INDEX]
    if unknown:
        raise ValueError(
            f"text: {', '.join(repr(w) for w in unknown)} not in the demo vocabulary; "
            f"valid words: {', '.join(VOCABULARY)}"
        )
    if len(words) > MAX_TOKENS:
        raise ValueError(f"text: {len(words)} words, the demo encoder takes at most {MAX_TOKENS}: {text!r}")
    return words


def encode(texts: list[str] | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [B, MAX_TOKENS, EMBED_DIM], pooled [B, EMBED_DIM]) for a prompt or a list of prompts."""
    texts = [texts] if isinstance(texts, str) else list(texts)
    tokens = torch.zeros(len(texts), MAX_TOKENS, EMBED_DIM)
    pooled = torch.zeros(len(texts), EMBED_DIM)
    positions = _BASIS[len(VOCABULARY) :]
    for row, text in enumerate(texts):
        words = tokenize(text)
        if not words:
            continue  # the unconditional encoding
        vectors = _BASIS[[_WORD_INDEX[w] for w in words]]
        tokens[row, : len(words)] = vectors + 0.5 * positions[: len(words)]
        pooled[row] = vectors.mean(dim=0)
    return tokens, pooled
