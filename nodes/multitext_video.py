"""Multi-text video (MEVG, Oh et al. ECCV 2024): one video, one segment per prompt, seamless joins.

TL_PromptSequence turns one prompt per line (through the CLIP, as CLIPTextEncode does) and/or CONDITIONING inputs
into a TL_PROMPT_SEQUENCE. TL_MultiTextVideo samples one segment per prompt (samplers.video_segments) and returns
one LATENT with the segments joined in time, ready for VAE Decode.

How it runs in ComfyUI: each segment is one sampling run of a CFGGuider subclass with that segment's prompt and
the negative, so ComfyUI loads the model and processes the conditioning as for any sampler. Inside the run a
KSAMPLER function does the whole segment: for a later segment the unconditional inversion first (model calls
flagged in model_options, which the guider answers with the negative conditioning alone, one pass), then the
structure-guided sampling. The segment's trajectory stays in the model's latent space (process_latent_in) and is
handed to the next segment. A later segment starts from the previous segment's last frame: by default decoded,
repeated in pixels and re-encoded (a causal video VAE such as Wan's encodes its first latent frame like an image,
so repeating a latent frame would not be a still video), or the last latent frame repeated (latent_frame).
One progress bar runs over every inversion and sampling step of every segment; each step honours Cancel.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import comfy.model_management
import comfy.model_sampling
import comfy.sample
import comfy.samplers
import comfy.utils
import torch
from comfy_api.latest import io

from ..samplers.basic import bind_model
from ..samplers.steppers import seeded_noise
from ..samplers.video_segments import (
    SAMPLERS,
    Continuation,
    SegmentResult,
    SegmentSettings,
    check_video,
    concatenate_segments,
    generate_segments,
    inversion_schedule,
    repeat_last_frame,
    run_segment,
)
from .vae_codec import VaeCodec

PromptSequenceType = io.Custom("TL_PROMPT_SEQUENCE")
UNCONDITIONAL_KEY = "trajectory_lab.unconditional"  # model_options flag: answer with the negative alone
CONTINUE_FROM = ("decoded_frame", "latent_frame")
CONDITIONING_INPUTS = 4


@dataclass(frozen=True)
class PromptSequence:
    """One CONDITIONING per event, in order, and a label for each (its text line or the input's name)."""

    conditionings: tuple = ()
    labels: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.conditionings)


def prompt_lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def build_prompt_sequence(clip, text: str, conditionings: dict, previous: PromptSequence | None) -> PromptSequence:
    """previous's events, then one per non-empty line of text, then the connected conditioning inputs in order."""
    lines = prompt_lines(text)
    if lines and clip is None:
        raise ValueError("clip: text has prompts but no CLIP is connected to encode them")
    conds = list(previous.conditionings) if previous is not None else []
    labels = list(previous.labels) if previous is not None else []
    for line in lines:
        conds.append(clip.encode_from_tokens_scheduled(clip.tokenize(line)))
        labels.append(line)
    for name, cond in conditionings.items():
        if cond is not None:
            conds.append(cond)
            labels.append(name)
    if not conds:
        raise ValueError("text: no prompt; write one prompt per line or connect a conditioning input")
    return PromptSequence(tuple(conds), tuple(labels))


class SegmentGuider(comfy.samplers.CFGGuider):
    """CFG guider that also answers unconditional-only calls (the inversion): the negative alone, one pass."""

    def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 - ComfyUI's signature
        if model_options.get(UNCONDITIONAL_KEY):
            negative = self.conds.get("negative")
            return comfy.samplers.calc_cond_batch(self.inner_model, [negative], x, timestep, model_options)[0]
        return super().predict_noise(x, timestep, model_options, seed)


def segment_sampler_function(model, x, sigmas, extra_args=None, callback=None, disable=None, settings=None,
                             continuation=None, noise_seed=0, on_step=None, record=None):  # fmt: skip
    """KSAMPLER function running one whole segment (inversion included) through the guider's model calls."""
    kwargs = extra_args or {}
    options = dict(kwargs.get("model_options", {}))
    options[UNCONDITIONAL_KEY] = True
    guided = bind_model(model, x, kwargs)
    unconditional = bind_model(model, x, {**kwargs, "model_options": options})
    if continuation is not None:
        continuation = Continuation(
            continuation.clean.to(device=x.device, dtype=x.dtype),
            continuation.reference,
            continuation.inversion_sigmas.to(device=x.device, dtype=sigmas.dtype),
        )
    result = run_segment(guided, unconditional, x, sigmas, settings, continuation, seeded_noise(noise_seed), on_step)
    if record is not None:
        record["trajectory"] = result.trajectory
    return result.samples


class SegmentProgress:
    """One progress bar over every inversion and sampling step of every segment; each step honours Cancel."""

    def __init__(self, model, total: int):
        import latent_preview  # ComfyUI's top-level module: importable once the host runs

        self.done, self.total = 0, total
        self.bar = comfy.utils.ProgressBar(total)
        self.previewer = latent_preview.get_previewer(model.load_device, model.model.latent_format)

    def step(self, phase: str, i: int, x: torch.Tensor, x0: torch.Tensor) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.done += 1
        preview = None
        if self.previewer is not None and phase == "sampling":
            preview = self.previewer.decode_latent_to_preview_image("JPEG", x0)
        self.bar.update_absolute(min(self.done, self.total), self.total, preview)


def check_inputs(model, vae, prompts, latent, continue_from: str) -> torch.Tensor:
    """Clear errors naming the input, before any work; returns the latent's samples."""
    if not isinstance(prompts, PromptSequence) or len(prompts) == 0:
        raise ValueError("prompts: the sequence is empty; connect a TL_PromptSequence with at least one prompt")
    samples = latent.get("samples") if isinstance(latent, dict) else None
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"latent: expected a LATENT with a video tensor, got {type(samples).__name__}")
    check_video(samples, "latent")
    channels = samples.shape[1]
    model_channels = model.get_model_object("latent_format").latent_channels
    if model_channels != channels:
        raise ValueError(f"latent: it has {channels} channels but the model's latent format takes {model_channels}")
    if continue_from not in CONTINUE_FROM:
        raise ValueError(f"continue_from: {continue_from!r} is not one of {CONTINUE_FROM}")
    if continue_from == "decoded_frame" and getattr(vae, "latent_channels", None) != channels:
        raise ValueError(f"vae: it encodes {getattr(vae, 'latent_channels', '?')} channels but the latent has "
                         f"{channels}; connect the model's VAE (or set continue_from to latent_frame)")  # fmt: skip
    return samples


def last_frame_still(vae, samples: torch.Tensor, continue_from: str) -> torch.Tensor:
    """A still video of the segment's last frame with the segment's shape (latent space)."""
    if continue_from == "latent_frame":
        return repeat_last_frame(samples)
    codec = VaeCodec.for_latent(vae, samples, 0)
    images = codec.decode(samples)  # [B * F, 3, H, W], frames of each batch item together
    batch = samples.shape[0]
    frames = images.reshape(batch, -1, *images.shape[1:])
    still = frames[:, -1:].expand_as(frames).reshape(images.shape)
    latent = codec.encode(still).to(samples)
    if latent.shape != samples.shape:
        raise ValueError(f"vae: re-encoding the last frame gave a latent of shape {tuple(latent.shape)}, not the "
                         f"segment's {tuple(samples.shape)}; use continue_from = latent_frame")  # fmt: skip
    return latent


def multitext_video(
    model, vae, prompts: PromptSequence, negative, latent: dict, seed: int, steps: int, cfg: float,
    last_frame_inversion: float, dynamic_noise: bool, structure_guidance: float, sampler_name: str = "euler",
    scheduler: str = "simple", inversion_steps: int = 0, inversion_refinement: int = 0,
    continue_from: str = "decoded_frame",
) -> dict:  # fmt: skip
    samples = check_inputs(model, vae, prompts, latent, continue_from)
    if steps < 1:
        raise ValueError(f"steps: {steps} must be at least 1")
    if not 0.0 <= last_frame_inversion <= 1.0:
        raise ValueError(f"last_frame_inversion: {last_frame_inversion} must lie in [0, 1]")
    if structure_guidance < 0:
        raise ValueError(f"structure_guidance: {structure_guidance} must be >= 0")
    if sampler_name not in SAMPLERS:
        raise ValueError(f"sampler_name: {sampler_name!r} is not one of {SAMPLERS}")
    if scheduler not in comfy.samplers.SCHEDULER_NAMES:
        raise ValueError(f"scheduler: {scheduler!r} is not one of ComfyUI's schedulers")
    if inversion_steps < 0 or inversion_refinement < 0:
        raise ValueError("inversion_steps and inversion_refinement must be >= 0")
    model_sampling = model.get_model_object("model_sampling")
    flow = isinstance(model_sampling, comfy.model_sampling.CONST)
    sigmas = comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).cpu()
    inversion_count = inversion_steps or steps
    inversion_sigmas = inversion_schedule(comfy.samplers.calculate_sigmas(model_sampling, scheduler, inversion_count)
                                          .cpu())  # fmt: skip
    settings = SegmentSettings(flow, last_frame_inversion, dynamic_noise, structure_guidance, sampler_name,
                               inversion_refinement)  # fmt: skip
    count = len(prompts)
    progress = SegmentProgress(model, count * steps + (count - 1) * inversion_count)
    noise_inds = latent.get("batch_index")

    def run(k: int, continuation: Continuation | None) -> SegmentResult:
        comfy.model_management.throw_exception_if_processing_interrupted()
        if continuation is None:
            start, noise = samples, comfy.sample.prepare_noise(samples, seed, noise_inds)
        else:  # the segment starts from the inversion: the sampler's own start is unused
            start = noise = torch.zeros_like(samples)
            clean = model.model.process_latent_in(continuation.clean)  # trajectories live in the model's space
            continuation = Continuation(clean, continuation.reference, continuation.inversion_sigmas)
        record: dict = {}
        segment_seed = (seed + k) % 2**64  # each segment's own Dynamic / ancestral noise
        options = {"settings": settings, "continuation": continuation, "noise_seed": segment_seed,
                   "on_step": progress.step, "record": record}  # fmt: skip
        guider = SegmentGuider(model)
        guider.set_conds(prompts.conditionings[k], negative)
        guider.set_cfg(cfg)
        out = guider.sample(noise, start, comfy.samplers.KSAMPLER(segment_sampler_function, extra_options=options),
                            sigmas, callback=None, disable_pbar=True, seed=segment_seed)  # fmt: skip
        out = out.to(comfy.model_management.intermediate_device())
        logging.debug("TL_MultiTextVideo: segment %d/%d (%s) done", k + 1, count, prompts.labels[k])
        return SegmentResult(out, record["trajectory"])

    results = generate_segments(count, run, lambda r: last_frame_still(vae, r.samples, continue_from),
                                inversion_sigmas)  # fmt: skip
    out = {k: v for k, v in latent.items() if k != "noise_mask"}  # a mask of one segment fits no longer
    out["samples"] = concatenate_segments([r.samples for r in results])
    return out


class PromptSequenceNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_PromptSequence",
            display_name="Prompt Sequence (Trajectory Lab)",
            category="trajectory_lab/video",
            description="A sequence of prompts, one video segment each, for TL_MultiTextVideo: one prompt per "
            "non-empty line of text (encoded by the CLIP like CLIPTextEncode), then the connected conditioning "
            "inputs in order. Chain several through `previous` for longer sequences.",
            inputs=[
                io.Clip.Input(
                    "clip", optional=True, tooltip="Encodes each line of text; not needed for conditioning inputs."
                ),
                io.String.Input(
                    "text",
                    multiline=True,
                    dynamic_prompts=True,
                    default="",
                    tooltip="One prompt per line; empty lines are skipped.",
                ),
                PromptSequenceType.Input("previous", optional=True, tooltip="Events that come first."),
                *[
                    io.Conditioning.Input(
                        f"conditioning_{i}", optional=True, tooltip="One more event, after the text's lines."
                    )
                    for i in range(1, CONDITIONING_INPUTS + 1)
                ],
            ],
            outputs=[PromptSequenceType.Output()],
        )

    @classmethod
    def execute(cls, clip=None, text="", previous=None, **conditionings) -> io.NodeOutput:
        ordered = {
            f"conditioning_{i}": conditionings.get(f"conditioning_{i}") for i in range(1, CONDITIONING_INPUTS + 1)
        }
        return io.NodeOutput(build_prompt_sequence(clip, text, ordered, previous))


_INVERSION_TIP = (
    "Blend of each inversion step's predicted clean video toward the previous segment's last frame at the same "
    "noise level (0 = plain inversion, 1 = replace). The official code's gradient step is about 0.5."
)
_STRUCTURE_TIP = (
    "Temporal smoothing of the predicted clean video at every step: frames toward their predecessor, the first "
    "toward the previous segment's last frame. 0 = off; the same strength at any resolution and step count."
)


class MultiTextVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TL_MultiTextVideo",
            display_name="Multi-Text Video (Trajectory Lab)",
            category="trajectory_lab/video",
            description="MEVG (Oh et al. 2024): one video with one segment per prompt and seamless transitions. "
            "Segment 1 is plain sampling; each later one inverts the previous last frame (last-frame-aware "
            "inversion), mixes in Dynamic Noise for motion and samples with temporal structure guidance. The "
            "output joins the segments in time without repeating the boundary frame: K segments of T latent "
            "frames give 1 + K (T - 1) frames (Wan: 4n + 1 pixel frames per segment stay 4m + 1 in all).",
            inputs=[
                io.Model.Input("model", tooltip="A video model with [B, C, T, H, W] latents (Wan 2.1/2.2, ...)."),
                io.Vae.Input("vae", tooltip="Decodes and re-encodes the last frame each later segment starts from."),
                PromptSequenceType.Input("prompts", tooltip="One segment per prompt (TL_PromptSequence)."),
                io.Conditioning.Input("negative", tooltip="The CFG negative; also the inversion's model."),
                io.Latent.Input("latent", tooltip="One segment's shape: an empty video latent (e.g. 33 frames)."),
                io.Int.Input(
                    "seed",
                    default=0,
                    min=0,
                    max=0xFFFFFFFFFFFFFFFF,
                    control_after_generate=True,
                    tooltip="Noise seed (each segment draws its own from it).",
                ),
                io.Int.Input("steps", default=30, min=1, max=10000, tooltip="Sampling steps per segment."),
                io.Float.Input("cfg", default=6.0, min=0.0, max=100.0, step=0.1, round=0.01, tooltip="CFG scale."),
                io.Float.Input(
                    "last_frame_inversion", default=0.5, min=0.0, max=1.0, step=0.01, tooltip=_INVERSION_TIP
                ),
                io.Boolean.Input(
                    "dynamic_noise",
                    default=True,
                    tooltip="Mix fresh noise into the inverted noise, more for later frames "
                    "(variance-preserving): motion instead of a frozen start.",
                ),
                io.Float.Input(
                    "structure_guidance", default=7.0, min=0.0, max=1000.0, step=0.1, tooltip=_STRUCTURE_TIP
                ),
                io.Combo.Input(
                    "sampler_name",
                    options=list(SAMPLERS),
                    default="euler",
                    optional=True,
                    tooltip="euler: deterministic (keeps the inverted structure); euler_ancestral: "
                    "fresh noise each step, like the official eta = 1.",
                ),
                io.Combo.Input(
                    "scheduler",
                    options=comfy.samplers.SCHEDULER_NAMES,
                    default="simple",
                    optional=True,
                    tooltip="Noise schedule per segment.",
                ),
                io.Int.Input(
                    "inversion_steps",
                    default=0,
                    min=0,
                    max=10000,
                    optional=True,
                    tooltip="Steps of the inversion schedule; 0 = steps. Fewer: cheaper, coarser.",
                ),
                io.Int.Input(
                    "inversion_refinement",
                    default=0,
                    min=0,
                    max=50,
                    optional=True,
                    tooltip="Fixed-point rounds per inversion step (one unconditional model call each): "
                    "0 = plain DDIM inversion; more makes sampling retrace the inversion exactly.",
                ),
                io.Combo.Input(
                    "continue_from",
                    options=list(CONTINUE_FROM),
                    default="decoded_frame",
                    optional=True,
                    tooltip="decoded_frame: decode, repeat the last pixel frame, encode (right for "
                    "causal video VAEs); latent_frame: repeat the last latent frame (no VAE).",
                ),
            ],
            outputs=[io.Latent.Output()],
        )

    @classmethod
    def execute(
        cls,
        model,
        vae,
        prompts,
        negative,
        latent,
        seed,
        steps,
        cfg,
        last_frame_inversion,
        dynamic_noise,
        structure_guidance,
        sampler_name="euler",
        scheduler="simple",
        inversion_steps=0,
        inversion_refinement=0,
        continue_from="decoded_frame",
    ) -> io.NodeOutput:
        with torch.inference_mode():  # as ComfyUI runs nodes; direct calls (tests, benchmarks) get the same
            video = multitext_video(
                model,
                vae,
                prompts,
                negative,
                latent,
                seed,
                steps,
                cfg,
                last_frame_inversion,
                dynamic_noise,
                structure_guidance,
                sampler_name,
                scheduler,
                inversion_steps,
                inversion_refinement,
                continue_from,
            )
        return io.NodeOutput(video)
