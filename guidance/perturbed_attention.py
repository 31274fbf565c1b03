"""Perturbed-Attention Guidance (Ahn et al. 2024) as pure torch: layer specs, identity attention, the combination.

The perturbed prediction replaces chosen self-attention maps by the identity, so each image query sees only
itself: the layer outputs its own value vector. In joint text+image attention (SD3 / Flux blocks, text tokens
first) the image-to-image block becomes the identity while image queries still see the text tokens and
text queries attend as usual, as diffusers' joint PAG processor does with its mask; computed directly here
in O(L_img * L_txt) rather than through an L x L mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import Tensor

# ComfyUI labels batch chunks 0 (cond) and 1 (uncond) by their index in the conds list; the perturbed
# conditional chunk is appended third, so its label is 2 in transformer_options["cond_or_uncond"].
PERTURBED_LABEL = 2

UNET_BLOCKS = {"d": "input", "m": "middle", "u": "output"}


@dataclass(frozen=True)
class UNetLayer:
    """One UNet transformer stack: ComfyUI block name, block number, and transformer indices (None = all)."""

    block: str
    number: int
    transformer_indices: tuple[int, ...] | None = None


@dataclass(frozen=True)
class DiTLayer:
    """One DiT block as ComfyUI's `patches_replace["dit"]` keys it: ("double_block" | "single_block", index)."""

    kind: str
    index: int


def _int_range(text: str, what: str) -> tuple[int, ...]:
    if "-" in text:
        lo, hi = (int(p) for p in text.split("-", 1))
        if hi < lo:
            raise ValueError(f"{what}: range {text!r} runs backwards")
        return tuple(range(lo, hi + 1))
    return (int(text),)


_UNET_TOKEN = re.compile(r"^([dmu])(\d+(?:-\d+)?)(?:\.(\d+(?:-\d+)?))?$")
_DIT_TOKEN = re.compile(r"^(double|single|block)(\d+(?:-\d+)?)$")


def _tokens(spec: str) -> list[str]:
    return [t for t in re.split(r"[\s,]+", spec.strip().lower()) if t]


def parse_unet_layers(spec: str) -> list[UNetLayer]:
    """Parse a UNet layer list: `m0` (middle block), `u0.4` (output block 0, transformer 4),
    `d2.2-9` (input block 2, transformers 2..9), `d1-2` (input blocks 1 and 2); comma or space separated."""
    layers = []
    for token in _tokens(spec):
        m = _UNET_TOKEN.match(token)
        if not m:
            raise ValueError(
                f"layers: {token!r} is not a UNet layer; use d<i> / m0 / u<i> (input, middle, output block), "
                "optionally .<t> or .<t1>-<t2> for transformer indices, e.g. 'm0', 'u0.4', 'd2.2-9'"
            )
        indices = _int_range(m.group(3), "layers") if m.group(3) else None
        layers += [UNetLayer(UNET_BLOCKS[m.group(1)], n, indices) for n in _int_range(m.group(2), "layers")]
    return layers


def parse_dit_layers(spec: str) -> list[DiTLayer]:
    """Parse a DiT layer list: `double1`, `single0-3`, `block5` (= double: SD3 joint and Wan blocks)."""
    layers = []
    for token in _tokens(spec):
        m = _DIT_TOKEN.match(token)
        if not m:
            raise ValueError(
                f"layers: {token!r} is not a DiT layer; use double<i>, single<i> or block<i> "
                "(ranges like double0-2), e.g. 'double1' or 'block1, single4'"
            )
        kind = "single_block" if m.group(1) == "single" else "double_block"
        layers += [DiTLayer(kind, i) for i in _int_range(m.group(2), "layers")]
    return layers


def adaptive_scale(scale: float, adaptive: float, timestep_1000: float) -> float:
    """Diffusers' adaptive PAG scale s_t = max(0, s - a * (1000 - t)), t on a 0..1000 noise scale."""
    return max(0.0, scale - adaptive * (1000.0 - timestep_1000))


def guidance_rescale(guided: Tensor, reference: Tensor, strength: float) -> Tensor:
    """Blend `guided` toward itself rescaled to the per-sample std of `reference` (Lin et al. 2024)."""
    if strength == 0:
        return guided
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (reference.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-12))
    return strength * rescaled + (1 - strength) * guided


def pag_guided(
    x: Tensor, sigma: Tensor, cfg_denoised: Tensor, cond: Tensor, perturbed: Tensor, scale: float, rescale: float
) -> Tensor:
    """D = D_cfg + s (D_cond - D_pert), with the optional rescale done on the noise prediction (x - D) / sigma."""
    guided = cfg_denoised + scale * (cond - perturbed)
    if rescale == 0:
        return guided
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    eps_guided, eps_cond = (x - guided) / s, (x - cond) / s
    return x - s * guidance_rescale(eps_guided, eps_cond, rescale)


def perturbed_row_mask(labels: list[int], batch: int, device=None) -> Tensor:
    """Which rows of a model batch belong to the perturbed chunk (chunks are equal, in label order)."""
    if not labels or batch % len(labels):
        raise ValueError(f"cannot split a batch of {batch} into {len(labels)} chunks")
    per_chunk = batch // len(labels)
    flags = torch.tensor([label == PERTURBED_LABEL for label in labels], device=device)
    return flags.repeat_interleave(per_chunk)


def identity_attention(q: Tensor, k: Tensor, v: Tensor, text_tokens: int = 0) -> Tensor:
    """Attention with the image-to-image map replaced by the identity. q, k, v: [B, heads, L, D], text first.

    text_tokens = 0: the output is v. Otherwise image query i attends to {text keys, key i} only, and text
    queries attend to all keys as usual.
    """
    if text_tokens == 0:
        return v
    scale = q.shape[-1] ** -0.5
    q_txt, q_img = q[:, :, :text_tokens], q[:, :, text_tokens:]
    k_txt, k_img = k[:, :, :text_tokens], k[:, :, text_tokens:]
    v_txt, v_img = v[:, :, :text_tokens], v[:, :, text_tokens:]
    out_txt = torch.softmax((q_txt @ k.transpose(-1, -2)) * scale, dim=-1) @ v
    logits = torch.cat([q_img @ k_txt.transpose(-1, -2), (q_img * k_img).sum(-1, keepdim=True)], dim=-1) * scale
    weights = torch.softmax(logits, dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32)).to(v.dtype)
    out_img = weights[..., :text_tokens] @ v_txt + weights[..., text_tokens:] * v_img
    return torch.cat([out_txt, out_img], dim=2)


def split_heads(t: Tensor, heads: int) -> Tensor:
    """[B, L, heads * D] (or already [B, L, heads, D], as SD3 passes V) -> [B, heads, L, D]."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """[B, heads, L, D] -> [B, L, heads * D]."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)
