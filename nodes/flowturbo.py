"""FlowTurbo nodes: the H/P/R sampler, velocity-refiner distillation, and refiner loading.

Refiners are safetensors files in models/velocity_refiners/ with metadata naming the base model they were
distilled from; a refiner is refused for any other model.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import folder_paths
import safetensors.torch
import torch
from comfy_api.latest import io

from ..atomic_files import atomic_destination
from ..samplers.conventions import ode_derivative
from ..samplers.flowturbo import REFINER_UPDATES, make_plan, sample_flowturbo
from ..samplers.velocity_refiner import (
    TrainingConfig,
    TrainingState,
    VelocityRefinerNet,
    generate_samples,
    new_refiner,
    tile_rows,
    train_velocity_refiner,
)
from .guiders import is_plain_cfg_guider

FOLDER = "velocity_refiners"
FORMAT = "trajectory_lab.velocity_refiner/1"
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.folder_names_and_paths[FOLDER] = ([os.path.join(folder_paths.models_dir, FOLDER)], {".safetensors"})

VelocityRefinerType = io.Custom("TL_VELOCITY_REFINER")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")


@dataclass
class BaseModelInfo:
    """What a refiner must match: the model config, latent channels and the noise parametrisation."""

    model_config: str
    latent_channels: int
    flow: bool

    @classmethod
    def of(cls, base_model) -> BaseModelInfo:
        flow = isinstance(base_model.model_sampling, comfy.model_sampling.CONST)
        return cls(type(base_model.model_config).__name__, base_model.latent_format.latent_channels, flow)

    def describe(self) -> str:
        return f"{self.model_config} ({self.latent_channels}-channel {'flow' if self.flow else 'EPS/VE'} latents)"


@dataclass
class VelocityRefiner:
    net: VelocityRefinerNet  # the EMA weights, used for sampling; on CPU as loaded or trained (never moved)
    base: BaseModelInfo
    metadata: dict = field(default_factory=dict)
    compile_backend: str = "inductor"  # torch.compile backend for compile_refiner (tests use a fast one on CPU)
    training_cfg: float | None = None  # CFG scale of the training samples; None: not recorded (older files)
    # Per sampling device: a copy of net there, and its compiled form. A node's output is shared by every graph
    # that uses it, so net itself is not moved; a refiner is small enough to keep one copy per device.
    _placed: dict = field(default_factory=dict, repr=False)
    _compiled: dict = field(default_factory=dict, repr=False)

    def check_model(self, base_model) -> None:
        info = BaseModelInfo.of(base_model)
        if info != self.base:
            raise ValueError(f"refiner: trained for {self.base.describe()}, but the sampled model is {info.describe()}")

    def check_cfg(self, cfg: float | None) -> None:
        """Warn when sampling at another CFG scale than the training samples had (the corrections are learnt for
        the guided velocity at that scale). cfg None: the guider does not say."""
        if cfg is not None and self.training_cfg is not None and not math.isclose(cfg, self.training_cfg):
            logging.warning(
                "TL_FlowTurboSampler: the refiner was trained at cfg %g but this run samples at cfg %g; its "
                "corrections fit the training cfg (train it with cfg %g for this run)", self.training_cfg, cfg, cfg
            )  # fmt: skip

    def net_on(self, device: torch.device) -> VelocityRefinerNet:
        """The network on the sampling device. It computes in float32 whatever the latents' dtype (forward casts
        its inputs and casts the result back), so only the device has to match."""
        device = torch.device(device)
        if device == next(self.net.parameters()).device:
            return self.net
        if device not in self._placed:
            self._placed[device] = copy.deepcopy(self.net).to(device)
        return self._placed[device]

    def function(self, compile_: bool, pooled: torch.Tensor | None = None):
        """r(x, sigma, v) for the sampler, run on x's device; pooled [P, D]: the positive prompt's pooled
        conditioning (used, and then required, only by refiners trained with one)."""
        pooled_dim = self.net.pooled_dim
        if pooled_dim and (pooled is None or pooled.shape[-1] != pooled_dim):
            got = "none" if pooled is None else f"{pooled.shape[-1]} features"
            raise ValueError(f"refiner: trained with a {pooled_dim}-feature pooled conditioning (pooled_output), but "
                             f"the positive conditioning has {got}")  # fmt: skip

        def refine(x, sigma, v):
            fn: Any = self.net_on(x.device)
            if compile_:
                if x.device not in self._compiled:
                    self._compiled[x.device] = torch.compile(fn, backend=self.compile_backend)
                fn = self._compiled[x.device]
            rows = tile_rows(pooled, x.shape[0]).to(x.device) if pooled_dim else None
            with torch.no_grad():
                return fn(x, sigma, v, rows).to(v.dtype)

        return refine


def refiner_path(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"name: {name!r} must be 1-100 letters, digits, '_', '-' or '.' (no folders)")
    folder = folder_paths.get_folder_paths(FOLDER)[0]
    return os.path.join(folder, name if name.endswith(".safetensors") else name + ".safetensors")


def save_refiner(path: str, net, ema, base: BaseModelInfo, latent_shape, iteration: int,
                 state: TrainingState | None = None, settings: dict | None = None) -> None:  # fmt: skip
    """Both weight sets (training resumes from net; sampling uses ema), the optimizer and random stream (state: an
    exact resume) and the training settings (metadata, as strings), written to a temporary file first."""
    tensors = {f"net.{k}": v.detach().contiguous() for k, v in net.state_dict().items()}
    tensors |= {f"ema.{k}": v.detach().contiguous() for k, v in ema.state_dict().items()}
    metadata = {
        "format": FORMAT, "model_config": base.model_config, "latent_channels": str(base.latent_channels),
        "flow": str(base.flow), "latent_shape": json.dumps(list(latent_shape)), "hidden": str(net.hidden),
        "iteration": str(iteration), "pooled_dim": str(net.pooled_dim),
    }  # fmt: skip
    metadata |= {k: str(v) for k, v in (settings or {}).items()}
    if state is not None:
        state_tensors, state_metadata = state.tensors()
        tensors |= state_tensors
        metadata |= state_metadata
    with atomic_destination(path) as tmp:
        safetensors.torch.save_file(tensors, tmp, metadata=metadata)


def load_refiner_file(path: str) -> tuple[VelocityRefinerNet, VelocityRefinerNet, BaseModelInfo, dict]:
    with safetensors.safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
    if metadata.get("format") != FORMAT:
        raise ValueError(f"refiner_name: {os.path.basename(path)} is not a Trajectory Lab velocity refiner")
    base = BaseModelInfo(metadata["model_config"], int(metadata["latent_channels"]), metadata["flow"] == "True")
    tensors = safetensors.torch.load_file(path)
    pooled_dim = int(metadata.get("pooled_dim", "0"))  # files from before pooled conditioning: none
    net, ema = new_refiner(base.latent_channels, base.flow, int(metadata["hidden"]), pooled_dim)
    net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
    ema.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    return net, ema, base, metadata


def restore_training_state(path: str, state: TrainingState, learning_rate: float) -> bool:
    """Load the optimizer and random stream saved in a refiner file into `state`; False for files saved without
    them (before they were saved), which then resume with a fresh optimizer."""
    with safetensors.safe_open(path, "pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys() if k == "rng_state" or k.startswith("optimizer.")}
    return state.restore(tensors, metadata, learning_rate)


def recorded_cfg(metadata: dict) -> float | None:
    """The training cfg a refiner file records (None in files from before it was recorded)."""
    return float(metadata["cfg"]) if "cfg" in metadata else None


def guider_cfg(model_k) -> float | None:
    """The CFG scale of a plain CFGGuider (SamplerCustom's cfg, CFGGuider, BasicGuider); None for a guider that
    combines predictions its own way, whose cfg attribute may not be the scale it applies."""
    guider = getattr(model_k, "inner_model", None)
    return float(guider.cfg) if is_plain_cfg_guider(guider) else None


def _base_model(model_k):
    """The BaseModel under the k-diffusion wrapper KSAMPLER passes to sampler functions."""
    return model_k.inner_model.inner_model


def positive_batch(model_k) -> int:
    """How many prompts the positive conditioning holds (its batch; ComfyUI tiles them over the latent rows)."""
    conds = getattr(model_k.inner_model, "conds", None) or {}
    rows = [c[key].shape[0] for c in conds.get("positive", []) for key in ("cross_attn", "pooled_output")
            if c.get(key) is not None]  # fmt: skip
    return max(rows, default=1)


def positive_pooled(model_k) -> torch.Tensor | None:
    """The positive prompt's pooled conditioning (pooled_output: Flux, SD3, SDXL), or None when it has none."""
    conds = getattr(model_k.inner_model, "conds", None) or {}
    for cond in conds.get("positive", []):
        if cond.get("pooled_output") is not None:
            return cond["pooled_output"]
    return None


def flowturbo_sampler_fn(model, x, sigmas, extra_args=None, callback=None, disable=None, heun_steps=1, refine_steps=0,
                         refiner=None, refiner_update="consistent", compile_refiner=False):  # fmt: skip
    plan = make_plan(len(sigmas) - 1, heun_steps, refine_steps)
    refine = None
    if plan.refine:
        if refiner is None:
            raise ValueError(f"refiner: refine_steps = {refine_steps} needs a refiner (TL_LoadVelocityRefiner)")
        refiner.check_model(_base_model(model))
        refiner.check_cfg(guider_cfg(model))
        refine = refiner.function(compile_refiner, positive_pooled(model))
    kwargs = extra_args or {}

    def on_step(i, x_i, denoised):
        comfy.model_management.throw_exception_if_processing_interrupted()  # R steps call no model
        if callback is not None:
            callback({"x": x_i, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})

    return sample_flowturbo(lambda x_, s: model(x_, s, **kwargs), x, sigmas, plan, refine, refiner_update, on_step)


class FlowTurboSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_FlowTurboSampler",
            display_name="FlowTurbo Sampler (Trajectory Lab)",
            category="trajectory_lab/sampling",
            description="FlowTurbo (Zhao et al. 2024): heun_steps Heun steps, then pseudo-corrector steps (one "
            "model call each, reusing the cached velocity), then refine_steps velocity-refiner steps (no model "
            "call). The remaining steps of SIGMAS are pseudo-corrector steps. Flow and EPS models.",
            inputs=[
                io.Int.Input("heun_steps", default=1, min=0, max=1000, tooltip="Leading Heun steps (2 calls each)."),
                io.Int.Input(
                    "refine_steps",
                    default=0,
                    min=0,
                    max=1000,
                    tooltip="Trailing refiner steps (no model call); needs a refiner.",
                ),
                VelocityRefinerType.Input(
                    "refiner", optional=True, tooltip="A distilled velocity refiner (TL_LoadVelocityRefiner)."
                ),
                io.Combo.Input(
                    "refiner_update",
                    options=list(REFINER_UPDATES),
                    default="consistent",
                    optional=True,
                    tooltip="consistent: second order (an exact refiner gives Heun). released: the "
                    "official code's update, first order; for comparison.",
                ),
                io.Boolean.Input(
                    "compile_refiner",
                    default=False,
                    optional=True,
                    tooltip="torch.compile the refiner (worth it on GPUs; slow to start on CPU). Compile the model "
                    "itself with ComfyUI's TorchCompileModel.",
                ),
            ],  # fmt: skip
            outputs=[io.Sampler.Output()],
        )

    @classmethod
    def execute(cls, heun_steps, refine_steps, refiner=None, refiner_update="consistent", compile_refiner=False):
        if refine_steps and refiner is None:
            raise ValueError(f"refiner: refine_steps = {refine_steps} needs a refiner (connect TL_LoadVelocityRefiner)")
        options = {"heun_steps": heun_steps, "refine_steps": refine_steps, "refiner": refiner,
                   "refiner_update": refiner_update, "compile_refiner": compile_refiner}  # fmt: skip
        return io.NodeOutput(comfy.samplers.KSAMPLER(flowturbo_sampler_fn, extra_options=options))


class TrainVelocityRefiner(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_TrainVelocityRefiner",
            display_name="Train Velocity Refiner (Trajectory Lab)",
            category="trajectory_lab/sampling",
            description="Distils a FlowTurbo velocity refiner from MODEL with samples the model generates itself "
            "(no dataset). Saves models/velocity_refiners/<name>.safetensors; running again with the same name "
            "resumes up to `iterations`, exactly where it stopped (the file keeps the optimizer state). Cancel keeps "
            "the progress.",
            inputs=[
                io.Model.Input("model", tooltip="The flow model the refiner learns to imitate."),
                io.Conditioning.Input("positive", tooltip="Prompt for the self-generated training samples."),
                io.Conditioning.Input("negative", tooltip="Negative prompt for the training samples."),
                io.Latent.Input("latent", tooltip="Sets the latent shape; its batch is ignored."),
                io.Int.Input(
                    "iterations",
                    default=2000,
                    min=1,
                    max=10_000_000,
                    tooltip="Total training steps (resumed runs count on).",
                ),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    tooltip="Seed for the training samples and the training run.",
                ),
                io.String.Input(
                    "name", default="velocity_refiner", tooltip="File name under models/velocity_refiners."
                ),
                io.Float.Input(
                    "cfg",
                    default=4.0,
                    min=0.0,
                    max=100.0,
                    step=0.1,
                    optional=True,
                    tooltip="The CFG scale the refiner will be used with (recorded in the file; sampling at "
                    "another cfg logs a warning).",
                ),
                io.Int.Input(
                    "steps",
                    default=20,
                    min=2,
                    max=1000,
                    optional=True,
                    tooltip="Euler steps used to generate the training samples.",
                ),
                io.Int.Input(
                    "samples",
                    default=64,
                    min=1,
                    max=100_000,
                    optional=True,
                    tooltip="How many samples the model generates for training.",
                ),
                io.Int.Input(
                    "batch_size",
                    default=8,
                    min=1,
                    max=4096,
                    optional=True,
                    tooltip="Training batch size; also the rows per model call when generating the samples.",
                ),
                io.Float.Input(
                    "learning_rate",
                    default=1e-4,
                    min=1e-7,
                    max=1.0,
                    step=1e-5,
                    optional=True,
                    tooltip="AdamW learning rate.",
                ),
                io.Float.Input(
                    "ema_decay",
                    default=0.999,
                    min=0.0,
                    max=0.99999,
                    step=0.0001,
                    optional=True,
                    tooltip="Weight averaging of the saved refiner.",
                ),
                io.Int.Input("hidden", default=64, min=8, max=1024, optional=True, tooltip="Refiner network width."),
                io.Boolean.Input(
                    "resume",
                    default=True,
                    optional=True,
                    tooltip="Continue from models/velocity_refiners/<name>.safetensors if it exists.",
                ),
            ],  # fmt: skip
            outputs=[VelocityRefinerType.Output()],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, positive, negative, latent, iterations, seed, name, cfg=4.0, steps=20, samples=64,
                batch_size=8, learning_rate=1e-4, ema_decay=0.999, hidden=64, resume=True):  # fmt: skip
        path = refiner_path(name)
        shape = tuple(latent["samples"].shape[1:])
        config = TrainingConfig(iterations, batch_size, learning_rate, ema_decay)
        # Recorded in the file: cfg is checked when sampling; the rest says how the training data were made.
        settings = {"cfg": cfg, "seed": seed, "sample_steps": steps, "samples": samples, "batch_size": batch_size,
                    "learning_rate": learning_rate, "ema_decay": ema_decay}  # fmt: skip
        result: dict = {}

        def train(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            base_model = _base_model(model_k)
            info = BaseModelInfo.of(base_model)
            kwargs = extra_args or {}

            def velocity(x_, sigma):
                return ode_derivative(x_, model_k(x_, sigma, **kwargs), sigma)

            def honour_cancel(_rows):
                comfy.model_management.throw_exception_if_processing_interrupted()

            # All the noise in one draw, so the samples do not depend on the chunking; batch_size rows per model
            # call, the batch the training itself runs the model at.
            noise = torch.randn((samples, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float32)
            with torch.no_grad():
                data = generate_samples(velocity, sigmas, noise, batch_size, x.device, x.dtype, on_chunk=honour_cancel)
            pooled = positive_pooled(model_k)
            pooled_dim = 0 if pooled is None else pooled.shape[-1]
            resuming = resume and os.path.exists(path)
            with torch.inference_mode(False):  # ComfyUI runs nodes in inference mode; training needs autograd
                if resuming:
                    net, ema, saved, metadata = load_refiner_file(path)
                    if saved != info:
                        raise ValueError(f"name: {name} holds a refiner for {saved.describe()}, not for "
                                         f"{info.describe()}; pick another name or set resume off")  # fmt: skip
                    if net.pooled_dim != pooled_dim:
                        raise ValueError(f"name: {name} holds a refiner with a {net.pooled_dim}-feature pooled "
                                         f"conditioning, but positive has {pooled_dim}; pick another name or set "
                                         "resume off")  # fmt: skip
                    saved_cfg = recorded_cfg(metadata)
                    if saved_cfg is not None and not math.isclose(saved_cfg, cfg):
                        logging.warning("TL_TrainVelocityRefiner: %s was trained at cfg %g; resuming at cfg %g",
                                        name, saved_cfg, cfg)  # fmt: skip
                    start = int(metadata["iteration"])
                else:
                    net, ema = new_refiner(info.latent_channels, info.flow, hidden, pooled_dim, seed)
                    start = 0
                net, ema = net.to(x.device), ema.to(x.device)  # before the optimizer, whose state follows net
                state = TrainingState.start(net, config, seed, start)
                if resuming:  # files saved before the optimizer state was: a fresh optimizer, as they always had
                    restore_training_state(path, state, learning_rate)
            progress = comfy.utils.ProgressBar(iterations)
            progress.update_absolute(min(start, iterations))

            def on_iteration(i, loss):
                progress.update_absolute(i)
                comfy.model_management.throw_exception_if_processing_interrupted()

            try:
                with torch.inference_mode(False), torch.enable_grad():
                    rows = None if pooled is None else pooled.to(x.device)
                    train_velocity_refiner(net, ema, velocity, data, sigmas, config, state, on_iteration, rows,
                                           positive_batch(model_k))  # fmt: skip
            finally:  # Cancel or error: keep what was learned, resumable from the last completed iteration
                save_refiner(path, net.cpu(), ema.cpu(), info, shape, state.iteration, state, settings)
            result["refiner"] = VelocityRefiner(ema.eval(), info, {"iteration": state.iteration, "path": path},
                                                training_cfg=cfg)  # fmt: skip
            return x

        noise = torch.zeros(latent["samples"].shape)  # the sampler generates its own noise
        model_sampling = model.get_model_object("model_sampling")
        sigmas = comfy.samplers.calculate_sigmas(model_sampling, "normal", steps).cpu()
        sampler = comfy.samplers.KSAMPLER(train)
        comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, positive, negative, latent["samples"] * 0,
                                   disable_pbar=True, seed=seed)  # fmt: skip
        return io.NodeOutput(result["refiner"])


class LoadVelocityRefiner(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_LoadVelocityRefiner",
            display_name="Load Velocity Refiner (Trajectory Lab)",
            category="trajectory_lab/sampling",
            description="Loads a FlowTurbo velocity refiner made by TL_TrainVelocityRefiner, for TL_FlowTurboSampler.",
            inputs=[
                io.Combo.Input(
                    "refiner_name",
                    options=folder_paths.get_filename_list(FOLDER),
                    tooltip="A file in models/velocity_refiners.",
                )
            ],
            outputs=[VelocityRefinerType.Output()],
        )

    @classmethod
    def execute(cls, refiner_name) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise(FOLDER, refiner_name)
        _, ema, base, metadata = load_refiner_file(path)
        return io.NodeOutput(
            VelocityRefiner(ema.eval(), base, {**metadata, "path": path}, training_cfg=recorded_cfg(metadata))
        )
