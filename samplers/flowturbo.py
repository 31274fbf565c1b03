"""FlowTurbo (Zhao et al. 2024): Heun steps, then pseudo-corrector steps, then velocity-refiner steps.

In ComfyUI's variable the probability-flow ODE is dx/dsigma = v(x, sigma) = (x - D) / sigma for flow and VE
models alike. With h = sigma_{i+1} - sigma_i:
- Heun (H, 2 calls):      d0 = v(x_i),              x~ = x_i + h d0, d1 = v(x~, sigma_{i+1})
- pseudo-corrector (P, 1): d0 = the cached d1 of the previous step (a velocity at sigma_i), d1 as above
- refiner (R, 0 calls):    d0 = c + r(x_i, sigma_i, c) with c the cached velocity, d1 = d0 + r(x~, sigma_{i+1}, d0)
and x_{i+1} = x_i + h (d0 + d1) / 2, caching d1 (H, P) or d0 (R). With an exact refiner r(x, s, v) = v(x, s) - v
the refiner step is Heun's step. The released code computes d1's correction for the stale cached velocity c (from
the previous step) but adds it to d0 ("released" update): with an exact refiner that leaves an O(h) error d0 - c
per step, one order lost. A step to sigma = 0
is Euler with a fresh velocity (H, P: 1 call) or the refined one (R).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from .conventions import append_dims, ode_derivative

# r(x, sigma, velocity) -> correction added to `velocity` to estimate v(x, sigma); sigma is a per-row tensor.
Refiner = Callable[[Tensor, Tensor, Tensor], Tensor]
REFINER_UPDATES = ("consistent", "released")


@dataclass(frozen=True)
class Plan:
    heun: int
    pseudo: int
    refine: int

    @property
    def steps(self) -> int:
        return self.heun + self.pseudo + self.refine

    def kind(self, step: int) -> str:
        return "H" if step < self.heun else "P" if step < self.heun + self.pseudo else "R"

    def __str__(self) -> str:
        return f"H{self.heun}P{self.pseudo}R{self.refine}"


def make_plan(n_steps: int, heun_steps: int, refine_steps: int) -> Plan:
    """H heun_steps, then pseudo-corrector steps, then refine_steps: the plan must fit the schedule, and refiner steps
    need a model step before them (they update its cached velocity)."""
    if heun_steps < 0 or refine_steps < 0:
        raise ValueError("heun_steps and refine_steps must be >= 0")
    pseudo = n_steps - heun_steps - refine_steps
    if pseudo < 0:
        raise ValueError(
            f"heun_steps ({heun_steps}) + refine_steps ({refine_steps}) exceed the {n_steps} steps of SIGMAS"
        )
    if refine_steps and heun_steps + pseudo == 0:
        # A refiner step corrects a cached model velocity; with no H or P step before it there is none to correct.
        raise ValueError(
            f"refine_steps ({refine_steps}) needs at least one Heun or pseudo-corrector step before it, but "
            f"heun_steps ({heun_steps}) + refine_steps cover all {n_steps} steps of SIGMAS: lower refine_steps or "
            "raise heun_steps"
        )
    return Plan(heun_steps, pseudo, refine_steps)


def sample_flowturbo(
    denoise: Callable[[Tensor, Tensor], Tensor],
    x: Tensor,
    sigmas: Tensor,
    plan: Plan,
    refiner: Refiner | None = None,
    refiner_update: str = "consistent",
    on_step: Callable[[int, Tensor, Tensor], None] | None = None,
) -> Tensor:
    """Integrate the probability-flow ODE over `sigmas` with the plan; denoise(x, sigma) returns D."""
    if plan.steps != len(sigmas) - 1:
        raise ValueError(f"plan {plan} has {plan.steps} steps but SIGMAS has {len(sigmas) - 1}")
    if plan.refine and refiner is None:
        raise ValueError(f"refine_steps = {plan.refine} needs a refiner")
    if refiner_update not in REFINER_UPDATES:
        raise ValueError(f"refiner_update: {refiner_update!r} is not one of {REFINER_UPDATES}")
    ones = x.new_ones([x.shape[0]])

    def velocity(x_: Tensor, sigma: Tensor) -> tuple[Tensor, Tensor]:
        denoised = denoise(x_, sigma * ones)
        return ode_derivative(x_, denoised, sigma), denoised

    cached: Tensor | None = None
    for i in range(plan.steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        kind = plan.kind(i)
        denoised = None
        if kind == "R":
            assert refiner is not None and cached is not None
            d0 = cached + refiner(x, sigma * ones, cached)
        elif kind == "H" or cached is None or sigma_next == 0:
            d0, denoised = velocity(x, sigma)  # fresh: Heun, the first step, and the final Euler step
        else:
            d0 = cached
        if on_step is not None:
            on_step(i, x, x - append_dims(sigma, x.ndim) * d0 if denoised is None else denoised)
        h = append_dims(sigma_next - sigma, x.ndim)
        x_pred = x + h * d0
        if sigma_next == 0:
            x = x_pred
            continue
        if kind == "R":
            assert refiner is not None
            conditioning = d0 if refiner_update == "consistent" else cached
            assert conditioning is not None
            d1 = d0 + refiner(x_pred, sigma_next * ones, conditioning)
        else:
            d1 = velocity(x_pred, sigma_next)[0]
        x = x + h * (d0 + d1) / 2
        # H and P hand on the model's velocity at the predicted point; R hands on its refined velocity at x_i,
        # which is what the refiner was trained to update (a velocity at an earlier time, a new point).
        cached = d0 if kind == "R" else d1
    return x
