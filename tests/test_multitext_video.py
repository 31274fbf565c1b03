"""Multi-text video (MEVG): the temporal terms and the segment loop on an exact linear-Gaussian video model, and
the nodes in the real host (the exact model as a ComfyUI MODEL, the tiny Wan 2.1 model, a tiny real CLIP).

Measured here (20 Euler steps, cfg 3, 2 segments, prompt means drawn with std 0.5 per channel, AR(1) rho 0.9,
3 seeds): the boundary gap (previous last frame -> first kept frame) is 0.27 (flow) / 0.24 (EPS) of the gap to an
independently generated segment with the defaults, 0.13 / 0.10 at structure_guidance 30, and 0.72 / 0.76 with
structure guidance off.
"""

from __future__ import annotations

import gc

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import pytest
import tiny_models
import torch
import video_models
from comfy_host import PromptError
from harness import in_process_host, pack
from probes import progress_reports
from video_models import LinearGaussianVideo, prompt_means, video_conditioning

temporal = pack("guidance.temporal")
vs = pack("samplers.video_segments")
steppers = pack("samplers.steppers")
mtv = pack("nodes.multitext_video")
nodes = in_process_host().nodes  # ComfyUI's nodes.py

SHAPE = (2, 4, 9, 4, 4)  # [B, C, T, H, W] for the pure tests


def flow_schedule(n: int, shift: float = 3.0) -> torch.Tensor:
    t = torch.linspace(1.0, 0.0, n + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def ve_schedule(n: int) -> torch.Tensor:
    sigmas = torch.logspace(torch.log10(torch.tensor(14.6)), torch.log10(torch.tensor(0.03)), n, dtype=torch.float64)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def schedule(flow: bool, n: int = 20) -> torch.Tensor:
    return flow_schedule(n) if flow else ve_schedule(n)


class ExactSetting:
    """Denoisers of the exact model: unconditional (mean 0) and CFG toward a prompt mean."""

    def __init__(self, flow: bool, cfg: float = 3.0, count: int = 2, scale: float = 0.5):
        self.flow, self.cfg = flow, cfg
        self.video = LinearGaussianVideo(flow=flow)
        self.means = prompt_means(count, SHAPE[1], seed=1, scale=scale)

    def unconditional(self, x, sigma):
        return self.video.denoise(x, sigma)

    def guided(self, k: int):
        def denoise(x, sigma):
            uncond = self.video.denoise(x, sigma)
            return uncond + self.cfg * (self.video.denoise(x, sigma, self.means[k]) - uncond)

        return denoise

    def noise(self, seed: int, sigmas) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(SHAPE, generator=gen, dtype=torch.float64) * (1.0 if self.flow else float(sigmas[0]))

    def generate(self, settings, seed: int = 0, sigmas=None, on_step=None):
        sigmas = schedule(self.flow) if sigmas is None else sigmas
        noise = self.noise(seed, sigmas)

        def run(k, continuation):
            return vs.run_segment(self.guided(k), self.unconditional, noise, sigmas, settings, continuation,
                                  steppers.seeded_noise(seed + 100 + k), on_step)  # fmt: skip

        still = lambda r: vs.repeat_last_frame(r.samples)  # noqa: E731
        return vs.generate_segments(len(self.means), run, still, vs.inversion_schedule(sigmas))


# ---------------------------------------------------------------- temporal terms


def energy(y, anchor, edge_weights):
    """sum_t g_t ||y_t - y_{t-1}||^2 with y_{-1} = anchor, written out directly."""
    previous = torch.cat([anchor, y[:, :, :-1]], dim=2)
    return sum(float(edge_weights[t]) * ((y[:, :, t] - previous[:, :, t]) ** 2).sum() for t in range(y.shape[2]))


def test_proximal_step_is_the_exact_minimiser_and_first_order_the_gradient_step():
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 3, 6, 2, 2, generator=gen, dtype=torch.float64)
    anchor = torch.randn(2, 3, 1, 2, 2, generator=gen, dtype=torch.float64)
    g = temporal.boundary_weights(6)
    for w in (0.05, 1.0, 20.0):
        y = temporal.smooth_toward_predecessors(x0, w, g, anchor).requires_grad_(True)
        objective = ((y - x0) ** 2).sum() + w * energy(y, anchor, g)
        (grad,) = torch.autograd.grad(objective, y)
        assert grad.abs().max() < 1e-10, w  # stationary point of a strictly convex objective: the minimiser
    w = 1e-4
    x = x0.clone().requires_grad_(True)
    (grad_e,) = torch.autograd.grad(energy(x, anchor, g), x)
    first_order = x0 - w * grad_e / 2
    assert (temporal.smooth_toward_predecessors(x0, w, g, anchor) - first_order).abs().max() < 1e-6
    assert torch.equal(temporal.smooth_toward_predecessors(x0, 0.0, g, anchor), x0)
    frozen = temporal.smooth_toward_predecessors(x0, 1e9, g, anchor)
    assert (frozen - anchor).abs().max() < 1e-5  # infinite pull: every frame becomes the anchor


def test_boundary_weights_are_the_official_accumulation_and_guidance_pins_frame_0():
    frames = 7
    # The official loop steps after each f with the summed gradients of MSEs over frames 0..f (each / (f + 1)):
    # the edge into frame t is in losses f >= t, each applied (frames - f) times.
    counted = [sum((frames - f) / (f + 1) for f in range(t, frames)) for t in range(frames)]
    expected = torch.tensor(counted, dtype=torch.float64) / counted[0]
    torch.testing.assert_close(temporal.boundary_weights(frames), expected, rtol=1e-12, atol=1e-12)
    x0 = torch.randn(1, 2, frames + 1, 3, 3, generator=torch.Generator().manual_seed(1))
    anchor = torch.randn(1, 2, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    guided = temporal.guide_structure(x0, anchor, 0.3)
    assert torch.equal(guided[:, :, :1], anchor)
    torch.testing.assert_close(guided[:, :, 1:], temporal.smooth_toward_predecessors(
        x0[:, :, 1:], 0.3, temporal.boundary_weights(frames), anchor))  # fmt: skip


def official_sgs_operator(frames: int, scale: float, elements_per_frame: int) -> torch.Tensor:
    """The official SGS update as a frames x frames matrix (anchor 0), re-derived: for f in 0..T-1 add the gradient
    of MSE(y[:f+1], shifted y[:f+1]) (its mean over (f+1) * elements_per_frame values) to a never-reset
    accumulator, and step y -= scale * accumulator."""
    columns = []
    for k in range(frames):
        y = torch.zeros(frames, dtype=torch.float64)
        y[k] = 1.0
        accumulated = torch.zeros(frames, dtype=torch.float64)
        for f in range(frames):
            leaf = y.clone().requires_grad_(True)
            previous = torch.cat([leaf.new_zeros(1), leaf[:-1]])
            loss = ((leaf[: f + 1] - previous[: f + 1]) ** 2).sum() / ((f + 1) * elements_per_frame)
            (grad,) = torch.autograd.grad(loss, leaf)
            accumulated = accumulated + grad
            y = y - scale * accumulated
        columns.append(y)
    return torch.stack(columns, dim=1)


def test_structure_weight_matches_the_official_update_at_its_resolution():
    # LVDM 256^2: 4 x 32 x 32 latent elements per frame, 16 frames, strength 7, 50 DDIM steps.
    official = official_sgs_operator(16, 7.0, 4 * 32 * 32)
    per_step = vs.structure_weight_per_step(7.0, 50)
    ours, _ = temporal.smoothing_operator(temporal.boundary_weights(16), per_step)
    residual = float(torch.linalg.norm(ours - official))
    uniform = min(float(torch.linalg.norm(temporal.smoothing_operator(torch.ones(16), w)[0] - official))
                  for w in torch.linspace(0.001, 0.3, 300).tolist())  # fmt: skip
    assert residual < 0.04 and uniform > 0.25, (residual, uniform)


# ---------------------------------------------------------------- segment loop pieces


def test_dynamic_noise_is_variance_preserving_and_keeps_the_boundary_frame():
    c = vs.dynamic_noise_coefficients(9)
    a = torch.exp(-torch.linspace(0, 10, 8, dtype=torch.float64))
    torch.testing.assert_close(c, torch.cat([torch.ones(1, dtype=torch.float64), a / torch.sqrt(1 + a**2)]))
    gen = torch.Generator().manual_seed(3)
    inverted = torch.randn(4, 8, 9, 32, 32, generator=gen, dtype=torch.float64)
    fresh = torch.randn(4, 8, 9, 32, 32, generator=gen, dtype=torch.float64)
    mixed = vs.mix_dynamic_noise(inverted, fresh, c)
    assert torch.equal(mixed[:, :, 0], inverted[:, :, 0])
    per_frame_var = mixed.var(dim=(0, 1, 3, 4))
    assert (per_frame_var - 1).abs().max() < 0.05, per_frame_var  # the official mix gives 0.75 on frame 1
    correlation = [float((mixed[:, :, t] * inverted[:, :, t]).mean()) for t in range(9)]
    assert all(abs(r - float(ct)) < 0.03 for r, ct in zip(correlation, c, strict=True))


def test_concatenation_drops_each_later_segments_duplicate_frame():
    segments = [torch.full((1, 2, 5, 1, 1), float(k)) for k in range(3)]
    video = vs.concatenate_segments(segments)
    assert video.shape[2] == 1 + 3 * 4
    assert video[0, 0, :, 0, 0].tolist() == [0.0] * 5 + [1.0] * 4 + [2.0] * 4
    still = vs.repeat_last_frame(torch.arange(6.0).reshape(1, 1, 6, 1, 1))
    assert still.flatten().tolist() == [5.0] * 6


def round_trip_error(flow: bool, steps: int, refine: int) -> float:
    """The repeated last frame inverted and sampled back with everything off: relative RMS error."""
    setting = ExactSetting(flow, cfg=1.0)
    clip = setting.video.sample(SHAPE, setting.means[0], torch.Generator().manual_seed(4))
    still = vs.repeat_last_frame(clip)
    plain = vs.SegmentSettings(flow, last_frame_inversion=0.0, dynamic_noise=False, structure_guidance=0.0)
    sigmas = schedule(flow, steps)
    inverted = vs.invert(setting.unconditional, still, vs.inversion_schedule(sigmas), flow, refine=refine)
    out = vs.sample_segment(setting.unconditional, inverted.x, sigmas, plain).samples
    return temporal.frame_distance(out, still) / float(still.pow(2).mean().sqrt())


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "eps"])
def test_inversion_then_sampling_reproduces_the_repeated_last_frame(flow):
    refined = [round_trip_error(flow, 20, r) for r in (0, 2, 8)]
    assert refined[0] > refined[1] > refined[2], refined
    assert refined[2] < 1e-3, refined  # fixed-point rounds converge to the exact inverse of the Euler sampler
    if flow:  # plain DDIM inversion through the flow ODE: first order in the step
        plain_errors = [round_trip_error(flow, n, 0) for n in (10, 20, 40)]
        assert plain_errors[0] > plain_errors[1] > plain_errors[2] and plain_errors[1] < 0.02, plain_errors


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "eps"])
def test_structure_guidance_lowers_the_adjacent_frame_distance_of_x0(flow):
    """Over segment 2's kept frames and its join: x0 of frames 1.. after the previous segment's last-frame x0 at
    the same step (frame 0 duplicates that frame and is dropped from the video)."""
    setting = ExactSetting(flow)
    sigmas = schedule(flow)
    steps = len(sigmas) - 1
    per_step, finals = [], []
    for strength in (0.0, 3.0, 7.0, 30.0, 120.0):
        seen: list[tuple] = []
        settings = vs.SegmentSettings(flow, structure_guidance=strength)
        results = setting.generate(settings, on_step=lambda phase, i, x, x0, seen=seen: seen.append((phase, i, x0)))
        sampled = [(i, x0) for phase, i, x0 in seen if phase == "sampling"][steps:]  # segment 2
        reference = results[0].trajectory
        joined = [torch.cat([reference.at(float(sigmas[i])), x0[:, :, 1:]], dim=2) for i, x0 in sampled]
        per_step.append(sum(temporal.adjacent_frame_distance(j) for j in joined) / steps)
        finals.append(
            temporal.adjacent_frame_distance(
                torch.cat([results[0].samples[:, :, -1:], results[1].samples[:, :, 1:]], dim=2)
            )
        )
    assert all(a > b for a, b in zip(per_step, per_step[1:], strict=False)), per_step
    assert all(a > b for a, b in zip(finals, finals[1:], strict=False)), finals


def boundary_ratio(flow: bool, settings, seeds=(0, 1, 2)) -> float:
    setting = ExactSetting(flow)
    sigmas = schedule(flow)
    gaps, independent = [], []
    for seed in seeds:
        first, second = (r.samples for r in setting.generate(settings, seed))
        alone = vs.sample_segment(setting.guided(1), setting.noise(seed + 50, sigmas), sigmas, settings).samples
        gaps.append(temporal.frame_distance(first[:, :, -1], second[:, :, 1]))  # frame 0 is dropped in the video
        independent.append(temporal.frame_distance(first[:, :, -1], alone[:, :, 0]))
    return sum(gaps) / sum(independent)


@pytest.mark.parametrize("flow", [True, False], ids=["flow", "eps"])
def test_boundary_gap_is_far_smaller_than_between_independent_segments(flow):
    defaults = vs.SegmentSettings(flow)
    ratio = boundary_ratio(flow, defaults)
    without_structure = boundary_ratio(flow, vs.SegmentSettings(flow, structure_guidance=0.0))
    assert ratio < 0.35 and without_structure > 0.6, (ratio, without_structure)


def test_dynamic_noise_keeps_the_continuation_moving():
    setting = ExactSetting(True)
    moving = setting.generate(vs.SegmentSettings(True))[1].samples
    frozen = setting.generate(vs.SegmentSettings(True, dynamic_noise=False))[1].samples
    natural = temporal.adjacent_frame_distance(setting.generate(vs.SegmentSettings(True))[0].samples)
    # Without Dynamic Noise the inverted still stays nearly still; with it, motion comes back near the natural one.
    assert temporal.adjacent_frame_distance(frozen[:, :, 1:]) < 0.5 * natural
    assert temporal.adjacent_frame_distance(moving[:, :, 1:]) > 0.8 * natural


def test_segment_loop_errors():
    setting = ExactSetting(True)
    with pytest.raises(ValueError, match="prompts: the sequence is empty"):
        vs.generate_segments(0, None, None, vs.inversion_schedule(flow_schedule(4)))
    with pytest.raises(ValueError, match="last_frame_inversion"):
        vs.invert(setting.unconditional, torch.zeros(SHAPE), vs.inversion_schedule(flow_schedule(4)), True, pull=2.0)
    with pytest.raises(ValueError, match="latent: expected a video latent"):
        vs.check_video(torch.zeros(1, 4, 8, 8))
    with pytest.raises(ValueError, match="at least 2 latent frames"):
        vs.check_video(torch.zeros(1, 4, 1, 8, 8))


# ---------------------------------------------------------------- the nodes in the real host


@pytest.fixture(scope="module")
def tiny():
    """The tiny Wan 2.1 model, its 16-channel image VAE (frames decoded one by one) and a tiny real CLIP."""
    held = {"model": tiny_models.build_tiny_model("wan21"), "vae": tiny_models.build_tiny_vae(16),
            "clip": video_models.build_tiny_clip()}  # fmt: skip
    yield held
    held.clear()
    gc.collect()


WAN_LATENT = tiny_models.latent_shape("wan21")  # (1, 16, 3, 8, 8): 9 pixel frames
STEPS = 6


def wan_prompts(count: int = 3):
    return mtv.PromptSequence(tuple(tiny_models.tiny_conditioning("wan21", s) for s in range(1, count + 1)),
                              tuple(f"p{s}" for s in range(count)))  # fmt: skip


def wan_negative():
    return [[torch.zeros(1, tiny_models.TOKENS, 32), {}]]


def run_node(model, vae, prompts, **overrides):
    inputs = dict(model=model, vae=vae, prompts=prompts, negative=wan_negative(),
                  latent={"samples": torch.zeros(WAN_LATENT)}, seed=5, steps=STEPS, cfg=4.0, last_frame_inversion=0.5,
                  dynamic_noise=True, structure_guidance=7.0)  # fmt: skip
    inputs.update(overrides)
    return mtv.MultiTextVideo.execute(**inputs).result[0]


def test_three_prompts_end_to_end_on_tiny_wan(tiny):
    out = run_node(tiny["model"], tiny["vae"], wan_prompts(3))
    samples = out["samples"]
    frames = WAN_LATENT[2]
    assert samples.shape == (1, 16, 1 + 3 * (frames - 1), 8, 8) and torch.isfinite(samples).all()
    assert (samples.shape[2] - 1) * 4 + 1 == 3 * 8 + 1  # 4m + 1 pixel frames: 3 segments of 8 new frames
    assert torch.equal(run_node(tiny["model"], tiny["vae"], wan_prompts(3))["samples"], samples)
    other = run_node(tiny["model"], tiny["vae"], wan_prompts(3), seed=6)["samples"]
    assert (other - samples).abs().max() > 1e-2
    # Segment 1 is plain sampling: ComfyUI's own euler on the first prompt, same seed, gives its frames.
    latent = torch.zeros(WAN_LATENT)
    plain = comfy.sample.sample(
        tiny["model"],
        comfy.sample.prepare_noise(latent, 5),
        STEPS,
        4.0,
        "euler",
        "simple",
        wan_prompts(1).conditionings[0],
        wan_negative(),
        latent,
        disable_pbar=True,
        seed=5,
    )
    torch.testing.assert_close(samples[:, :, :frames], plain, rtol=1e-5, atol=1e-5)
    # The video decodes like any Wan latent.
    with torch.inference_mode():  # as ComfyUI runs nodes
        images = nodes.VAEDecode().decode(tiny["vae"], {"samples": samples[0].movedim(1, 0)})[0]
    assert images.shape == (samples.shape[2], 64, 64, 3)


def test_continuation_through_a_causal_video_vae(tiny, monkeypatch):
    """With a Wan 2.1 VAE (4n + 1 pixel frames per n + 1 latent frames) the last decoded pixel frame is repeated over
    the segment's 9 pixel frames and re-encoded to its 3 latent frames."""
    vae = video_models.build_wan_vae()
    segment = run_node(tiny["model"], vae, wan_prompts(1))["samples"]
    encoded: list[torch.Tensor] = []
    original_encode = vae.encode

    def spying_encode(pixels):
        encoded.append(pixels.clone())
        return original_encode(pixels)

    monkeypatch.setattr(vae, "encode", spying_encode)
    with torch.inference_mode():
        still = mtv.last_frame_still(vae, segment, "decoded_frame")
        decoded = vae.decode(segment)
    assert decoded.shape == (1, 9, 64, 64, 3) and still.shape == segment.shape
    (pixels,) = encoded
    assert pixels.shape == (9, 64, 64, 3)
    torch.testing.assert_close(pixels, decoded[0, -1:].expand(9, -1, -1, -1).to(pixels))
    monkeypatch.undo()
    out = run_node(tiny["model"], vae, wan_prompts(3))["samples"]
    assert out.shape == (1, 16, 7, 8, 8) and torch.isfinite(out).all()


def test_latent_frame_continuation_and_ancestral_sampler(tiny):
    for overrides in ({"continue_from": "latent_frame"}, {"sampler_name": "euler_ancestral"},
                      {"inversion_steps": 3, "inversion_refinement": 1, "scheduler": "normal"},
                      {"seed": 2**64 - 1, "sampler_name": "euler_ancestral"}):  # fmt: skip
        out = run_node(tiny["model"], tiny["vae"], wan_prompts(2), **overrides)["samples"]
        assert out.shape == (1, 16, 5, 8, 8) and torch.isfinite(out).all(), overrides


def test_prompt_sequence_from_text_and_conditioning_inputs(tiny):
    clip = tiny["clip"]
    extra = tiny_models.tiny_conditioning("wan21", 9)
    first = mtv.PromptSequenceNode.execute(clip, "a red car\n\n  a blue car  \n").result[0]
    assert first.labels == ("a red car", "a blue car")
    encoded = nodes.CLIPTextEncode().encode(clip, "a blue car")[0]
    assert torch.equal(first.conditionings[1][0][0], encoded[0][0])
    chained = mtv.PromptSequenceNode.execute(clip, "a green car", previous=first, conditioning_2=extra).result[0]
    assert chained.labels == ("a red car", "a blue car", "a green car", "conditioning_2")
    assert chained.conditionings[3] is extra
    only_inputs = mtv.PromptSequenceNode.execute(None, "", conditioning_1=extra).result[0]
    assert len(only_inputs) == 1
    with pytest.raises(ValueError, match="text: no prompt"):
        mtv.PromptSequenceNode.execute(clip, " \n ")
    with pytest.raises(ValueError, match="clip: "):
        mtv.PromptSequenceNode.execute(None, "a car")
    # Through ComfyUI's validation and executor: conditioning inputs alone need no CLIP; text without one fails.
    host = in_process_host()
    graph = {
        "a": {"class_type": "TLTest_TinyConditioning", "inputs": {"arch": "wan21", "seed": 9, "batch": 1}},
        "b": {"class_type": "TLTest_TinyConditioning", "inputs": {"arch": "wan21", "seed": 10, "batch": 1}},
        "seq": {"class_type": "TL_PromptSequence", "inputs": {"text": "", "conditioning_1": ["a", 0],
                                                              "conditioning_3": ["b", 0]}},
    }  # fmt: skip
    from_graph = host.run(graph)["seq"][0]
    assert from_graph.labels == ("conditioning_1", "conditioning_3")
    assert torch.equal(from_graph.conditionings[1][0][0], tiny_models.tiny_conditioning("wan21", 10)[0][0])
    graph["seq"]["inputs"]["text"] = "a car"
    with pytest.raises(PromptError, match="clip: text has prompts but no CLIP"):
        host.run(graph)
    # CLIP-encoded prompts (77 tokens) drive the tiny Wan model end to end.
    out = run_node(tiny["model"], tiny["vae"], first, negative=nodes.CLIPTextEncode().encode(clip, "")[0])
    assert out["samples"].shape == (1, 16, 5, 8, 8)


@pytest.mark.parametrize("flavour", ["flow", "eps"])
def test_exact_model_through_the_node_reproduces_the_last_frame_and_joins_smoothly(tiny, flavour):
    """Flow and EPS (VE noise scaling, process_latent_in, inversion up to sigma_max) through ComfyUI's sampler."""
    model = video_models.build_video_model(flavour)
    means = prompt_means(2, video_models.CHANNELS, seed=1, scale=0.5)
    zero = video_conditioning(torch.zeros(video_models.CHANNELS))
    latent = {"samples": torch.zeros(1, video_models.CHANNELS, 6, 4, 4)}
    common = dict(model=model, vae=tiny["vae"], negative=zero, latent=latent, seed=3, steps=20, cfg=1.0,
                  continue_from="latent_frame")  # fmt: skip
    # Second prompt = the negative, everything off, cfg 1: sampling retraces the unconditional inversion.
    repeat = mtv.PromptSequence((video_conditioning(means[0]), zero), ("m", "zero"))
    out = mtv.MultiTextVideo.execute(
        prompts=repeat,
        last_frame_inversion=0.0,
        dynamic_noise=False,
        structure_guidance=0.0,
        inversion_refinement=8,
        **common,
    ).result[0]["samples"]
    last = out[:, :, 5:6]
    assert temporal.frame_distance(out[:, :, 6:], last.expand(-1, -1, 5, -1, -1)) < 2e-3 * float(last.std())
    # Defaults, two prompts: the join is far closer than to an independently sampled segment.
    prompts = mtv.PromptSequence(tuple(video_conditioning(m) for m in means), ("a", "b"))
    video = mtv.MultiTextVideo.execute(
        prompts=prompts, last_frame_inversion=0.5, dynamic_noise=True, structure_guidance=7.0, **{**common, "cfg": 3.0}
    ).result[0]["samples"]
    alone = mtv.MultiTextVideo.execute(prompts=mtv.PromptSequence((prompts.conditionings[1],), ("b",)),
                                       last_frame_inversion=0.5, dynamic_noise=True, structure_guidance=7.0,
                                       **{**common, "cfg": 3.0, "seed": 4}).result[0]["samples"]  # fmt: skip
    gap = temporal.frame_distance(video[:, :, 5], video[:, :, 6])
    independent = temporal.frame_distance(video[:, :, 5], alone[:, :, 0])
    assert gap < 0.5 * independent, (gap, independent)


def test_model_calls_follow_steps_inversion_steps_and_refinement(tiny):
    model = video_models.build_video_model("flow").clone()
    calls = []

    def counting(apply_model, args):
        calls.append(float(args["timestep"].flatten()[0]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    model.set_model_unet_function_wrapper(counting)
    zero = video_conditioning(torch.zeros(video_models.CHANNELS))
    prompts = mtv.PromptSequence(tuple(video_conditioning(m) for m in prompt_means(3)), ("a", "b", "c"))
    latent = {"samples": torch.zeros(1, video_models.CHANNELS, 3, 2, 2)}
    mtv.MultiTextVideo.execute(model, tiny["vae"], prompts, zero, latent, 0, 8, 3.0, 0.5, True, 7.0,
                               inversion_steps=4, inversion_refinement=2, continue_from="latent_frame")  # fmt: skip
    # cond + uncond share one call per sampling step; the inversion's step to sigma 1 needs one call, no rounds.
    inversion = (4 - 1) * (1 + 2) + 1
    assert len(calls) == 3 * 8 + 2 * inversion


def test_progress_bar_runs_over_segments_times_steps_and_cancel_stops_it(tiny):
    with progress_reports() as reports:
        run_node(tiny["model"], tiny["vae"], wan_prompts(3), inversion_steps=4)
    total = 3 * STEPS + 2 * 4
    assert {t for _, t in reports} == {total}
    values = [v for v, _ in reports]
    assert values == sorted(values) and set(range(1, total + 1)) <= set(values)

    with progress_reports(cancel_at=STEPS + 2) as reports:  # inside segment 2's inversion
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(tiny["model"], tiny["vae"], wan_prompts(3))
        assert max(v for v, _ in reports) == STEPS + 2 and not comfy.model_management.processing_interrupted()


def test_inputs_are_not_mutated(tiny):
    model, prompts = tiny["model"], wan_prompts(2)
    latent = {"samples": torch.zeros(WAN_LATENT), "noise_mask": torch.ones(1, 1, 8, 8)}
    before = repr(model.model_options), dict(prompts.conditionings[0][0][1])
    out = run_node(model, tiny["vae"], prompts, latent=latent)
    assert repr(model.model_options) == before[0] and prompts.conditionings[0][0][1] == before[1]
    assert "noise_mask" in latent and "noise_mask" not in out and torch.count_nonzero(latent["samples"]) == 0


def test_clear_errors_name_the_input(tiny):
    model, vae = tiny["model"], tiny["vae"]
    with pytest.raises(ValueError, match="prompts: the sequence is empty"):
        run_node(model, vae, mtv.PromptSequence())
    with pytest.raises(ValueError, match=r"latent: expected a video latent \[B, C, T, H, W\], got shape \(1, 16, 8"):
        run_node(model, vae, wan_prompts(2), latent={"samples": torch.zeros(1, 16, 8, 8)})
    with pytest.raises(ValueError, match="latent: a segment needs at least 2 latent frames"):
        run_node(model, vae, wan_prompts(2), latent={"samples": torch.zeros(1, 16, 1, 8, 8)})
    with pytest.raises(ValueError, match="latent: it has 4 channels but the model's latent format takes 16"):
        run_node(model, vae, wan_prompts(2), latent={"samples": torch.zeros(1, 4, 3, 8, 8)})
    with pytest.raises(ValueError, match="vae: it encodes 4 channels"):
        run_node(model, tiny_models.build_tiny_vae(4), wan_prompts(2))
    with pytest.raises(ValueError, match="sampler_name"):
        run_node(model, vae, wan_prompts(2), sampler_name="heun")
    with pytest.raises(ValueError, match="last_frame_inversion"):
        run_node(model, vae, wan_prompts(2), last_frame_inversion=1.5)


def test_schema_keeps_the_contract():
    sequence = mtv.PromptSequenceNode.define_schema()
    assert sequence.node_id == "TL_PromptSequence"
    seq_inputs = {i.id: i for i in sequence.inputs}
    assert seq_inputs["clip"].optional and not seq_inputs["text"].optional and seq_inputs["text"].multiline
    assert sequence.outputs[0].io_type == "TL_PROMPT_SEQUENCE"
    schema = mtv.MultiTextVideo.define_schema()
    assert schema.node_id == "TL_MultiTextVideo"
    inputs = {i.id: i for i in schema.inputs}
    for name in ("model", "vae", "prompts", "negative", "latent", "seed", "steps", "cfg"):
        assert name in inputs and not inputs[name].optional
    contract = {"last_frame_inversion": 0.5, "dynamic_noise": True, "structure_guidance": 7.0}
    assert {k: inputs[k].default for k in contract} == contract
    assert inputs["prompts"].io_type == "TL_PROMPT_SEQUENCE"
    assert schema.outputs[0].io_type == "LATENT"
    for node in (mtv.PromptSequenceNode, mtv.MultiTextVideo):  # what ComfyUI's loader and /object_info ask
        info = node.GET_NODE_INFO_V1()
        assert info["name"] == node.GET_SCHEMA().node_id and info["category"] == "trajectory_lab/video"
