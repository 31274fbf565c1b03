"""Perturbed-Attention Guidance (Ahn et al. 2024) as pure torch: layer specs, identity attention, the combination.

The perturbed prediction replaces chosen self-attention maps by the identity, so each image query sees only
itself: the layer outputs its own value vector. In joint text+image attention (text tokens first in SD3, Flux,
Qwen-Image and AuraFlow blocks; image tokens first in HunyuanVideo and Mochi blocks) the image-to-image block
becomes the identity while image queries still see the text tokens and text queries attend as usual, as
diffusers' joint PAG processor does with its mask; computed directly here in O(L_img * L_txt) rather than
through an L x L mask.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import groupby

import torch
from torch import Tensor

UNET_BLOCKS = {"d": "input", "m": "middle", "u": "output"}
UNET_LETTERS = {name: letter for letter, name in UNET_BLOCKS.items()}


@dataclass(frozen=True)
class UNetLayer:
    """One UNet transformer stack: block name, block number, and transformer indices (None = all).

    As parsed, `number` counts only the blocks of that stack that hold attention (sd-perturbed-attention's
    convention: `d2` on SDXL is its third input block with attention); `comfy_unet_layers` turns it into
    ComfyUI's own block number (SDXL `d2` -> input block 7), the key of ComfyUI's attn1 patches.
    """

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
    `d2.2-9` (input block 2, transformers 2..9), `d1-2` (input blocks 1 and 2); comma or space separated.
    Block numbers count only the blocks with attention (see UNetLayer)."""
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


def describe_unet_blocks(depths: dict[tuple[str, int], int]) -> str:
    """The valid UNet layers in the spec's indexing with their transformer depths, runs of equal depth merged,
    e.g. for SDXL 'd0-1 (depth 2), d2-3 (depth 10), m0 (depth 10), u0-2 (depth 10), u3-5 (depth 2)'."""
    parts = []
    for block, letter in UNET_LETTERS.items():
        stack = [depth for (name, _), depth in sorted(depths.items()) if name == block]
        index = 0
        for depth, run in groupby(stack):
            n = len(list(run))
            parts.append(f"{letter}{index}{f'-{index + n - 1}' if n > 1 else ''} (depth {depth})")
            index += n
    return ", ".join(parts)


def comfy_unet_layers(layers: list[UNetLayer], depths: dict[tuple[str, int], int]) -> list[UNetLayer]:
    """Map parsed layers (block numbers counting only blocks with attention) to ComfyUI block numbers.

    depths: transformer depth of every ComfyUI block that holds attention, keyed (block name, ComfyUI number).
    A block or transformer index that does not exist is a ValueError listing the valid layers.
    """
    valid = describe_unet_blocks(depths)
    out = []
    for layer in layers:
        numbers = sorted(n for name, n in depths if name == layer.block)
        letter = UNET_LETTERS[layer.block]
        if layer.number >= len(numbers):
            raise ValueError(
                f"layers: there is no {letter}{layer.number}: this UNet has {len(numbers)} {layer.block} blocks with "
                f"self-attention (numbered from 0, blocks without attention are not counted); valid: {valid}"
            )
        number = numbers[layer.number]
        depth = depths[(layer.block, number)]
        if layer.transformer_indices and max(layer.transformer_indices) >= depth:
            raise ValueError(
                f"layers: {letter}{layer.number} has transformer indices 0..{depth - 1}, not "
                f"{max(layer.transformer_indices)}; valid: {valid}"
            )
        out.append(UNetLayer(layer.block, number, layer.transformer_indices))
    return out


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
    """Diffusers' adaptive PAG scale s_t = max(0, s - a * (1000 - t)), t the model timestep on diffusers' 0..1000
    scale (the raw timestep of a 1000-step discrete schedule; 1000 sigma for flow models)."""
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


def perturbed_row_mask(labels: list[int], batch: int, perturbed_label: int | None, device=None) -> Tensor:
    """Which rows of a model batch belong to the perturbed chunk. ComfyUI labels each chunk of a batch by its
    index in the conds list (transformer_options["cond_or_uncond"]); chunks are equal, in label order."""
    if not labels or batch % len(labels):
        raise ValueError(f"cannot split a batch of {batch} into {len(labels)} chunks")
    flags = torch.tensor([label == perturbed_label for label in labels], device=device)
    return flags.repeat_interleave(batch // len(labels))


def additive_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """An attention mask as ComfyUI's attention takes it ([L, L], [B, L, L] or [B, H, L, L]; boolean = keep, or an
    additive bias) as an additive bias of shape [B or 1, H or 1, L, L]."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    if mask.ndim == 2:  # the same axes ComfyUI's attention_pytorch adds
        mask = mask.unsqueeze(0)
    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    return mask.to(dtype)


def identity_attention(
    q: Tensor, k: Tensor, v: Tensor, text_tokens: int = 0, mask: Tensor | None = None, text_first: bool = True
) -> Tensor:
    """Attention with the image-to-image map replaced by the identity. q, k, v: [B, heads, L, D].

    text_tokens = 0: self-attention; the output is v (each query attends to its own key only; a mask cannot change a
    softmax over one key). Otherwise the sequence is joint text + image, the text_tokens text tokens first
    (SD3, Flux, Qwen-Image, AuraFlow) or last (text_first=False: HunyuanVideo, Mochi): image query i attends to
    {text keys, key i} only, and text queries attend to all keys as usual; the optional attention mask (see
    `additive_mask`; a key-only mask [..., 1, L] applies to every query) biases exactly those logits.
    """
    if text_tokens == 0:
        return v
    n = q.shape[2]
    if not 0 < text_tokens < n:
        raise ValueError(f"identity_attention: {text_tokens} text tokens in a joint sequence of {n}")
    image_tokens = n - text_tokens
    txt = slice(0, text_tokens) if text_first else slice(image_tokens, n)
    img = slice(text_tokens, n) if text_first else slice(0, image_tokens)
    scale = q.shape[-1] ** -0.5
    bias = additive_mask(mask, torch.promote_types(q.dtype, torch.float32))
    if bias is not None:  # expanding is free, and lets the slices below pick query rows of a key-only mask
        bias = bias.expand(*bias.shape[:-2], n, n)
    q_txt, q_img = q[:, :, txt], q[:, :, img]
    k_txt, k_img = k[:, :, txt], k[:, :, img]
    v_txt, v_img = v[:, :, txt], v[:, :, img]
    txt_logits = (q_txt @ k.transpose(-1, -2)) * scale
    img_logits = torch.cat([q_img @ k_txt.transpose(-1, -2), (q_img * k_img).sum(-1, keepdim=True)], dim=-1) * scale
    if bias is not None:
        txt_logits = txt_logits + bias[..., txt, :]
        img_bias = bias[..., img, txt], bias[..., img, img].diagonal(0, -2, -1)
        img_logits = img_logits + torch.cat([img_bias[0], img_bias[1].unsqueeze(-1)], dim=-1)
    softmax_dtype = torch.promote_types(img_logits.dtype, torch.float32)
    out_txt = torch.softmax(txt_logits, dim=-1, dtype=softmax_dtype).to(v.dtype) @ v
    weights = torch.softmax(img_logits, dim=-1, dtype=softmax_dtype).to(v.dtype)
    out_img = weights[..., :text_tokens] @ v_txt + weights[..., text_tokens:] * v_img
    return torch.cat([out_txt, out_img] if text_first else [out_img, out_txt], dim=2)


def split_heads(t: Tensor, heads: int) -> Tensor:
    """[B, L, heads * D] (or already [B, L, heads, D], as SD3 passes V) -> [B, heads, L, D]."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def merge_heads(t: Tensor) -> Tensor:
    """[B, heads, L, D] -> [B, L, heads * D]."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)
