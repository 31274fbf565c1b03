"""Temporal structure terms for video latents [B, C, T, H, W] (frames on dim 2): MEVG's structure guidance.

MEVG's structure-guiding sampling pulls each frame of the predicted clean video x0 toward its predecessor, the
first one toward the previous segment's last frame (the anchor), by gradient steps on the energy

    E(y) = sum_t g_t ||y_t - y_{t-1}||^2,   y_{-1} = the anchor.

Here the pull is the closed-form proximal step instead of a gradient step:

    y = argmin ||y - x0||^2 + w E(y)   <=>   (I + w L_g) y = x0 + w g_0 e_0 anchor,

with L_g the T x T weighted path-graph Laplacian (plus the anchor edge on frame 0). To first order in w it is the
gradient step x0 - w grad(E) / 2; unlike it, it is stable for every w (w -> inf gives every frame the anchor),
needs no autograd (so it runs under ComfyUI's inference mode) and pulls the same per element at every resolution
(the official gradient is of an MSE, which shrinks with the number of latent elements). The T x T solve is shared
by every pixel.

Edge weights g (`boundary_weights`): the official loop accumulates, for f = 0..T-1, the gradients of MSEs over
frames 0..f (each normalised by f + 1) and steps after each; the edge into frame t is thereby weighted by
sum_{f >= t} (T - f) / (f + 1): strongest at the join, fading along the segment. The same weights here make the
proximal step match the official update at its own resolution ten times better than equal weights do.
"""

from __future__ import annotations

import torch
from torch import Tensor

FRAME_DIM = 2


def boundary_weights(frames: int) -> Tensor:
    """g_t for the edge into frame t (t = 0: from the anchor), sum_{f >= t} (T - f) / (f + 1), scaled to g_0 = 1."""
    if frames < 1:
        raise ValueError(f"frames: {frames} must be at least 1")
    f = torch.arange(frames, dtype=torch.float64)
    terms = (frames - f) / (f + 1)
    weights = terms.flip(0).cumsum(0).flip(0)  # suffix sums
    return weights / weights[0]


def temporal_laplacian(edge_weights: Tensor) -> Tensor:
    """L with y^T L y = sum_{t >= 1} g_t (y_t - y_{t-1})^2 + g_0 y_0^2 (g_0: the edge to the anchor, 0 = none)."""
    g = edge_weights.to(torch.float64)
    frames = g.numel()
    lap = torch.zeros(frames, frames, dtype=torch.float64)
    lap[0, 0] = g[0]
    for t in range(1, frames):
        lap[t, t] += g[t]
        lap[t - 1, t - 1] += g[t]
        lap[t, t - 1] = lap[t - 1, t] = -g[t]
    return lap


def smoothing_operator(edge_weights: Tensor, weight: float) -> tuple[Tensor, Tensor]:
    """(M, m) in float64 with prox(x0) = M x0 + m anchor along the frame axis: M = (I + w L_g)^-1, m = w g_0 M e_0."""
    if weight < 0:
        raise ValueError(f"structure weight {weight} must be >= 0")
    lap = temporal_laplacian(edge_weights)
    operator = torch.linalg.inv(torch.eye(lap.shape[0], dtype=torch.float64) + weight * lap)
    return operator, weight * float(edge_weights[0]) * operator[:, 0]


def apply_along_frames(matrix: Tensor, x: Tensor, frame_dim: int = FRAME_DIM) -> Tensor:
    """y_t = sum_s matrix[t, s] x_s along `frame_dim`."""
    out = x.movedim(frame_dim, -1) @ matrix.to(dtype=x.dtype, device=x.device).T
    return out.movedim(-1, frame_dim)


def smooth_toward_predecessors(
    x0: Tensor, weight: float, edge_weights: Tensor, anchor: Tensor | None = None, frame_dim: int = FRAME_DIM
) -> Tensor:
    """The proximal pull of frames toward their predecessors, frame 0 toward `anchor` (one frame) if given."""
    if weight == 0:
        return x0
    frames = x0.shape[frame_dim]
    if edge_weights.numel() != frames:
        raise ValueError(f"{edge_weights.numel()} edge weights for {frames} frames")
    if anchor is None:
        edge_weights = torch.cat([edge_weights.new_zeros(1), edge_weights[1:]])
    operator, anchor_gain = smoothing_operator(edge_weights, weight)
    y = apply_along_frames(operator, x0, frame_dim)
    if anchor is not None:
        if anchor.shape[frame_dim] != 1:
            raise ValueError(f"anchor must be one frame, got {anchor.shape[frame_dim]} along dim {frame_dim}")
        shape = [1] * x0.ndim
        shape[frame_dim] = frames
        gain = anchor_gain.to(dtype=x0.dtype, device=x0.device).reshape(shape)
        y = y + gain * anchor.to(dtype=x0.dtype, device=x0.device)
    return y


def guide_structure(x0: Tensor, anchor: Tensor, weight: float, frame_dim: int = FRAME_DIM) -> Tensor:
    """MEVG's structure guidance for a continuing segment, whose frame 0 duplicates the previous last frame.

    Frame 0 becomes the anchor (that frame's x0 at this step); frames 1.. are pulled toward their predecessors
    with `weight` on the edge into frame 1 and boundary_weights fading along the segment. So the T - 1 new frames
    see what the official code's T frames see (their first pulled toward the previous last frame), the layout the
    weight was calibrated on. The pin is part of the guidance (callers skip this at weight 0); frame 0 is dropped
    from the joined video either way.
    """
    frames = x0.shape[frame_dim]
    pinned = anchor.to(dtype=x0.dtype, device=x0.device).expand_as(x0.narrow(frame_dim, 0, 1))
    if frames == 1:
        return pinned.clone()
    free = x0.narrow(frame_dim, 1, frames - 1)
    smoothed = smooth_toward_predecessors(free, weight, boundary_weights(frames - 1), anchor, frame_dim)
    return torch.cat([pinned, smoothed], dim=frame_dim)


def adjacent_frame_distance(x: Tensor, frame_dim: int = FRAME_DIM) -> float:
    """Root-mean-square difference between consecutive frames (0 for a still video)."""
    if x.shape[frame_dim] < 2:
        return 0.0
    diff = x.narrow(frame_dim, 1, x.shape[frame_dim] - 1) - x.narrow(frame_dim, 0, x.shape[frame_dim] - 1)
    return float(diff.double().pow(2).mean().sqrt())


def frame_distance(a: Tensor, b: Tensor) -> float:
    """Root-mean-square difference between two frames (or any two tensors of one shape)."""
    return float((a.double() - b.double()).pow(2).mean().sqrt())
