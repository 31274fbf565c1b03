"""DiffuseHigh: exact wavelet algebra, the stage plan and the guided denoiser; the node on tiny real models.

The end-to-end references are built with ComfyUI's own nodes (VAEDecode, ImageScale bicubic, VAEEncode and
common_ksampler, i.e. KSampler with denoise), so "the node equals plain upscale + img2img" is checked bit for bit.
"""

import math

import comfy.model_management
import comfy.utils
import pytest
import tiny_models
import torch
import video_models
from harness import in_process_host, pack
from probes import progress_reports

wavelets = pack("guidance.wavelets")
sharpening = pack("guidance.sharpen")
highres = pack("samplers.progressive_highres")
basic = pack("samplers.basic")
dh = pack("nodes.diffusehigh")
nodes = in_process_host().nodes  # ComfyUI's nodes.py (the pack has a nodes/ package of its own)

MODES = ("symmetric", "periodization")

# ---------------------------------------------------------------- wavelets


def test_filters_are_orthonormal_with_the_right_vanishing_moments():
    for wavelet, moments in (("haar", 1), ("db4", 4)):
        low, high = wavelets.filter_bank(wavelet)[:, 0]
        taps = low.numel()
        assert math.isclose(float(low.sum()), math.sqrt(2), abs_tol=1e-15)
        for shift in range(0, taps, 2):  # orthonormal under even shifts, low against high too
            for a, b in ((low, low), (high, high), (low, high)):
                dot = float((a[shift:] * b[: taps - shift]).sum())
                assert abs(dot - (shift == 0 and a is b)) < 1e-15, (wavelet, shift)
        k = torch.arange(taps, dtype=torch.float64)
        assert all(abs(float((high * k**p).sum())) < 1e-12 for p in range(moments))
        assert abs(float((high * k**moments).sum())) > 1e-3  # and no more: the filter is the one named


def analysis_matrix(n: int, wavelet: str, mode: str) -> torch.Tensor:
    """Low-pass rows written from the definitions, independently of the conv implementation.

    symmetric: PyWavelets' a[o] = sum_j dec_lo[j] x_ext[2o + 1 - j] over the half-sample mirror extension;
    periodization: a[o] = sum_t h[t] x[(2o - taps/2 + 1 + t) mod n'] with n' = n rounded up to even (the last
    sample repeated), the alignment the module documents.
    """
    h = wavelets.LOW_PASS[wavelet]
    taps = len(h)
    dec_lo = h[::-1]
    rows = wavelets.coefficient_count(n, wavelet, mode)
    a = torch.zeros(rows, n, dtype=torch.float64)
    for o in range(rows):
        for j in range(taps):
            if mode == "symmetric":
                p = (2 * o + 1 - j) % (2 * n)
                a[o, p if p < n else 2 * n - 1 - p] += dec_lo[j]
            else:
                p = (2 * o - taps // 2 + 1 + (taps - 1 - j)) % (n + n % 2)
                a[o, min(p, n - 1)] += dec_lo[j]
    return a


@pytest.mark.parametrize("wavelet", ["haar", "db4"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(16, 16), (12, 20), (15, 17), (9, 6), (3, 5)])
def test_dwt_low_band_matches_the_definition_and_reconstructs_exactly(wavelet, mode, size):
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(sum(size)), dtype=torch.float64)
    bands = wavelets.dwt2(x, wavelet, mode)
    a_h, a_w = analysis_matrix(size[0], wavelet, mode), analysis_matrix(size[1], wavelet, mode)
    torch.testing.assert_close(bands.low, a_h @ x @ a_w.T, rtol=0, atol=1e-13)
    torch.testing.assert_close(wavelets.idwt2(bands), x, rtol=0, atol=1e-13)
    # float32 in, float32-exact out
    x32 = x.float()
    torch.testing.assert_close(wavelets.idwt2(wavelets.dwt2(x32, wavelet, mode)), x32, rtol=0, atol=1e-5)


def test_haar_low_band_is_the_scaled_2x2_block_sum():
    x = torch.randn(1, 8, 10, dtype=torch.float64)
    blocks = x.reshape(1, 4, 2, 5, 2).sum(dim=(2, 4)) / 2
    for mode in MODES:
        torch.testing.assert_close(wavelets.dwt2(x, "haar", mode).low, blocks, rtol=0, atol=1e-15)


def test_periodization_preserves_energy_on_even_sizes():
    x = torch.randn(4, 24, 32, dtype=torch.float64)
    b = wavelets.dwt2(x, "db4", "periodization")
    energy = sum(float((t**2).sum()) for t in (b.low, b.high_w, b.high_h, b.high_hw))
    assert math.isclose(energy, float((x**2).sum()), rel_tol=1e-13)


@pytest.mark.parametrize("wavelet", ["haar", "db4"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [(32, 32), (24, 40), (31, 29)])
def test_low_band_swap_is_exact_where_the_transform_promises(wavelet, mode, size):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(2, *size, generator=gen, dtype=torch.float64)
    reference = torch.randn(wavelets.dwt2(x, wavelet, mode).low.shape, generator=gen, dtype=torch.float64)
    swapped = wavelets.replace_low_band(x, reference, wavelet, mode)
    after = wavelets.dwt2(swapped, wavelet, mode)
    rows, cols = wavelets.exact_low_band_region(size, wavelet, mode)
    assert rows.stop - rows.start >= size[0] // 2 - 4 and cols.stop - cols.start >= size[1] // 2 - 4
    torch.testing.assert_close(after.low[:, rows, cols], reference[:, rows, cols], rtol=0, atol=1e-12)
    original = wavelets.dwt2(x, wavelet, mode)  # the high bands are kept on the same region
    torch.testing.assert_close(after.high_hw[:, rows, cols], original.high_hw[:, rows, cols], rtol=0, atol=1e-12)
    even = size[0] % 2 == 0 and size[1] % 2 == 0
    if mode == "periodization" and even:
        torch.testing.assert_close(after.low, reference, rtol=0, atol=1e-12)  # everywhere
    if wavelet == "db4" and not (mode == "periodization" and even):
        assert (after.low - reference).abs().max() > 1e-3  # the excluded border really differs


def test_swap_rejects_a_reference_of_another_shape():
    with pytest.raises(ValueError, match="same shape"):
        wavelets.replace_low_band(torch.zeros(1, 16, 16), torch.zeros(1, 4, 4), "db4", "symmetric")
    with pytest.raises(ValueError, match="wavelet"):
        wavelets.dwt2(torch.zeros(4, 4), "db2")


# ---------------------------------------------------------------- sharpening


def test_sharpen_matches_the_unsharp_mask_formula():
    image = torch.rand(1, 3, 6, 7, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert sharpening.sharpen(image, 0.0) is image
    sigma, amount = 0.8, 1.5
    w = [math.exp(-0.5 / sigma**2), 1.0, math.exp(-0.5 / sigma**2)]
    kernel = torch.outer(torch.tensor(w, dtype=torch.float64), torch.tensor(w, dtype=torch.float64))
    kernel /= kernel.sum()
    patch = image[0, 1, 2:5, 3:6]  # an interior pixel, by hand
    expected = (1 + amount) * image[0, 1, 3, 4] - amount * (kernel * patch).sum()
    got = sharpening.sharpen(image, amount, sigma)
    assert math.isclose(float(got[0, 1, 3, 4]), float(expected), rel_tol=1e-12)
    flat = torch.full((1, 3, 5, 5), 0.3, dtype=torch.float64)  # the blur keeps a constant image (reflected edges)
    torch.testing.assert_close(sharpening.sharpen(flat, 2.0), flat, rtol=0, atol=1e-15)


# ---------------------------------------------------------------- stage plan and guided denoiser


def test_stage_plan_sizes_rounding_and_errors():
    plan = highres.plan_stages((8, 8), 2.0, 3)
    assert plan.sizes == ((16, 16), (32, 32), (64, 64)) and plan.warnings == ()
    plan = highres.plan_stages((9, 7), 1.5, 2, latent_multiple=2)  # 13.5 x 10.5, then 20.25 x 15.75
    assert plan.sizes == ((14, 10), (20, 16)) and len(plan.warnings) == 2
    assert "rounded to 10x14" in plan.warnings[0]
    targets = highres.parse_target_sizes("1536x1024, 1000×1000")
    assert targets == [(1536, 1024), (1000, 1000)]
    plan = highres.plan_stages((8, 8), 2.0, 1, latent_multiple=2, compression=8, target_sizes=targets)
    assert plan.sizes == ((128, 192), (124, 124)) and len(plan.warnings) == 1  # 125 is not a multiple of 2
    with pytest.raises(ValueError, match="scale_factor"):
        highres.plan_stages((8, 8), 0.5, 1)
    with pytest.raises(ValueError, match="stages"):
        highres.plan_stages((8, 8), 2.0, 0)
    with pytest.raises(ValueError, match="scale_factor: stage 5 .* maximum side"):
        highres.plan_stages((128, 128), 2.0, 5)
    with pytest.raises(ValueError, match="target_sizes"):
        highres.parse_target_sizes("1024 by 1024")


def test_guided_denoiser_replaces_exactly_the_first_steps():
    sigmas = torch.tensor([4.0, 2.0, 1.0, 0.5, 0.0])
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def denoiser(x, sigma):
        return 0.5 * x

    calls = []

    def replace(d):
        calls.append(True)
        return d + 1.0

    def recorded(x, sigma):
        levels.append(float(sigma.flatten()[0]))
        return guided(x, sigma)

    guided = highres.structure_guided_denoiser(denoiser, sigmas, 2, replace)
    levels: list[float] = []
    out = basic.sample_euler(lambda x, s: recorded(x, s), x0, sigmas)
    expected = x0.clone()
    for i in range(4):  # Euler by hand, the first two denoised estimates shifted by +1
        d = 0.5 * expected + (1.0 if i < 2 else 0.0)
        expected = expected + (sigmas[i + 1] - sigmas[i]) * (expected - d) / sigmas[i]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    assert len(calls) == 2 and levels == [4.0, 2.0, 1.0, 0.5]
    # Heun: its corrector at sigma 2 (after step 0) sits at a guided level, the one at sigma 1 does not.
    calls.clear()
    basic.sample_heun(highres.structure_guided_denoiser(denoiser, sigmas, 2, replace), x0, sigmas)
    assert len(calls) == 3  # sigma 4, the corrector at 2, then step 1 at 2
    assert highres.guided_sigma_floor(sigmas, 0) == math.inf and highres.guided_sigma_floor(sigmas, 9) == 0.5


# ---------------------------------------------------------------- the node on tiny real models

SD15_LATENT = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
STEPS, CFG, DENOISE = 4, 3.0, 0.3


def sd15_inputs(**overrides):
    positive = tiny_models.tiny_conditioning("sd15", 1)
    inputs = dict(
        model=tiny_models.build_tiny_model("sd15"), positive=positive,
        negative=[[torch.zeros_like(positive[0][0]), {}]], vae=tiny_models.build_tiny_vae(4),
        latent={"samples": SD15_LATENT.clone()}, scale_factor=2.0, stages=1, denoise=DENOISE, dwt_steps=2,
        wavelet="db4", sharpen=1.0, seed=5, steps=STEPS, cfg=CFG, sampler_name="euler", scheduler="normal",
    )  # fmt: skip
    inputs.update(overrides)
    return inputs


def run_node(**inputs):
    return dh.DiffuseHigh.execute(**inputs).result[0]["samples"]


def plain_upscale_img2img(inputs, base_size_conditioning=False):
    """The same stages with ComfyUI's own nodes: VAEDecode -> ImageScale bicubic -> VAEEncode -> KSampler."""
    latent, vae = inputs["latent"], inputs["vae"]
    positive, negative = inputs["positive"], inputs["negative"]
    base_h, base_w = (8 * s for s in latent["samples"].shape[-2:])
    if base_size_conditioning:
        size = {"width": base_w, "height": base_h, "target_width": base_w, "target_height": base_h}
        positive, negative = ([[c[0], {**c[1], **size}] for c in cond] for cond in (positive, negative))
    for k in range(1, inputs["stages"] + 1):
        image = nodes.VAEDecode().decode(vae, latent)[0]
        width, height = (round(s * inputs["scale_factor"] ** k) for s in (base_w, base_h))
        image = nodes.ImageScale().upscale(image, "bicubic", width, height, "disabled")[0]
        latent = nodes.VAEEncode().encode(vae, image)[0]
        latent = nodes.common_ksampler(
            inputs["model"], inputs["seed"], inputs["steps"], inputs["cfg"], inputs["sampler_name"],
            inputs["scheduler"], positive, negative, latent, denoise=inputs["denoise"],
        )[0]  # fmt: skip
    return latent["samples"]


@pytest.mark.parametrize("stages, scale", [(1, 2.0), (2, 1.5)])
def test_output_size_is_input_times_scale_per_stage(stages, scale):
    out = run_node(**sd15_inputs(stages=stages, scale_factor=scale))
    side = 8 * scale**stages
    assert out.shape == (1, 4, side, side) and torch.isfinite(out).all()


@pytest.mark.parametrize("stages, scale", [(1, 2.0), (2, 1.5)])
def test_without_guidance_and_sharpening_it_is_plain_upscale_then_img2img(stages, scale):
    inputs = sd15_inputs(dwt_steps=0, sharpen=0.0, stages=stages, scale_factor=scale)
    assert torch.equal(run_node(**inputs), plain_upscale_img2img(inputs))
    # sharpening alone changes the result (the comparison can fail)
    assert not torch.equal(run_node(**{**inputs, "sharpen": 1.0}), plain_upscale_img2img(inputs))


def test_sdxl_size_conditioning_stays_at_the_base_size():
    positive = tiny_models.tiny_conditioning("sdxl", 1)
    negative = [
        [torch.zeros_like(positive[0][0]), {"pooled_output": torch.zeros_like(positive[0][1]["pooled_output"])}]
    ]
    model = tiny_models.build_tiny_model("sdxl")
    inputs = sd15_inputs(model=model, positive=positive, negative=negative, dwt_steps=0, sharpen=0.0)
    out = run_node(**inputs)
    assert torch.equal(out, plain_upscale_img2img(inputs, base_size_conditioning=True))
    assert not torch.equal(out, plain_upscale_img2img(inputs))  # ComfyUI's default: the upscaled size
    assert "width" not in positive[0][1]  # the caller's conditioning is untouched


def low_band_error(latent, reference_low, wavelet="db4"):
    """Metric: relative L2 distance ||LL(latent) - LL_ref|| / ||LL_ref|| (db4, symmetric)."""
    low = wavelets.dwt2(latent, wavelet, "symmetric").low
    return float((low - reference_low).norm() / reference_low.norm())


@pytest.mark.parametrize("space", ["image", "latent"])
def test_guidance_pulls_the_output_low_band_toward_the_reference(space):
    # Reference: the low band of the stage's start latent, VAEEncode(sharpen(bicubic(VAEDecode(input)))), which is
    # where the sampler works. (The random tiny VAE cannot reproduce images, so an image-space metric measures
    # mostly its reconstruction error; the exact image-space swap is checked in the next test.)
    inputs = sd15_inputs(guidance_space=space)
    vae = inputs["vae"]
    with torch.inference_mode():
        image = vae.decode(SD15_LATENT).movedim(-1, 1)
        guide = sharpening.sharpen(torch.nn.functional.interpolate(image, size=(128, 128), mode="bicubic"), 1.0)
        reference = wavelets.dwt2(vae.encode(guide.movedim(1, -1)), "db4", "symmetric").low
    errors = {d: low_band_error(run_node(**{**inputs, "dwt_steps": d}), reference) for d in (0, 2, STEPS)}
    assert errors[STEPS] < errors[2] < 0.75 * errors[0], errors
    assert errors[STEPS] < 0.1 * errors[0], errors


def test_image_space_hands_the_vae_images_with_exactly_the_reference_low_band(monkeypatch):
    encoded: list[torch.Tensor] = []
    original = dh.VaeCodec.encode

    def spy(self, images):
        encoded.append(images.clone())
        return original(self, images)

    monkeypatch.setattr(dh.VaeCodec, "encode", spy)
    run_node(**sd15_inputs(dwt_steps=3, wavelet_mode="periodization", wavelet="haar", stages=2, scale_factor=1.5))
    assert len(encoded) == 2 * (1 + 3)  # per stage: the guide image, then one re-encode per guided step
    for stage in range(2):
        guide, swapped = encoded[4 * stage], encoded[4 * stage + 1 : 4 * stage + 4]
        reference = wavelets.dwt2(guide, "haar", "periodization").low
        for image in swapped:
            torch.testing.assert_close(wavelets.dwt2(image, "haar", "periodization").low, reference, rtol=0, atol=2e-6)
            assert (image - guide).abs().max() > 1e-2  # ... while the high bands are the model's


def test_video_latent_is_upscaled_per_frame():
    vae = tiny_models.build_tiny_vae(16)
    latent = torch.randn(tiny_models.latent_shape("wan21", 2), generator=torch.Generator().manual_seed(1)) * 0.5
    positive = tiny_models.tiny_conditioning("wan21", 1)
    inputs = dict(
        model=tiny_models.build_tiny_model("wan21"), positive=positive,
        negative=[[torch.zeros_like(positive[0][0]), {}]], vae=vae, latent={"samples": latent}, scale_factor=2.0,
        stages=1, denoise=0.0, dwt_steps=2, wavelet="db4", sharpen=0.0, seed=0, steps=3, cfg=2.0,
        sampler_name="euler", scheduler="normal",
    )  # fmt: skip
    b, c, t, h, w = latent.shape
    # denoise 0: the start latent itself, which must be each frame decoded, upscaled and encoded on its own
    out = run_node(**inputs)
    assert out.shape == (b, c, t, 2 * h, 2 * w)
    for frame in range(t):
        image = nodes.VAEDecode().decode(vae, {"samples": latent[:, :, frame]})[0]
        image = nodes.ImageScale().upscale(image, "bicubic", 16 * w, 16 * h, "disabled")[0]
        expected = nodes.VAEEncode().encode(vae, image)[0]["samples"]
        torch.testing.assert_close(out[:, :, frame], expected, rtol=1e-5, atol=1e-5)
    for space in ("image", "latent"):
        sampled = run_node(**{**inputs, "denoise": 0.5, "sharpen": 1.0, "guidance_space": space})
        assert sampled.shape == (b, c, t, 2 * h, 2 * w) and torch.isfinite(sampled).all()
        assert (sampled - out).abs().max() > 1e-3


@pytest.mark.parametrize("tile", [0, 64])
def test_video_vae_upscales_whole_clips(tile):
    """A real Wan causal video VAE: each clip is decoded as a video (5 pixel frames from 2 latent frames), every
    frame upscaled, and the clip encoded again as one video, as ComfyUI's VAEDecode -> ImageScale -> VAEEncode do."""
    vae = video_models.build_wan_vae()
    latent = torch.randn(1, 16, 2, 8, 8, generator=torch.Generator().manual_seed(1)) * 0.5
    positive = tiny_models.tiny_conditioning("wan21", 1)
    inputs = dict(
        model=tiny_models.build_tiny_model("wan21"), positive=positive,
        negative=[[torch.zeros_like(positive[0][0]), {}]], vae=vae, latent={"samples": latent}, scale_factor=2.0,
        stages=1, denoise=0.0, dwt_steps=2, wavelet="db4", sharpen=0.0, seed=0, steps=3, cfg=2.0,
        sampler_name="euler", scheduler="normal", vae_tile_size=tile,
    )  # fmt: skip
    out = run_node(**inputs)
    assert out.shape == (1, 16, 2, 16, 16)
    if not tile:  # tiles change the numbers (a random VAE has no reason to tile seamlessly), not the layout
        frames = nodes.VAEDecode().decode(vae, {"samples": latent})[0]
        frames = frames.reshape(-1, *frames.shape[-3:])
        assert frames.shape == (5, 64, 64, 3)
        frames = nodes.ImageScale().upscale(frames, "bicubic", 128, 128, "disabled")[0]
        expected = nodes.VAEEncode().encode(vae, frames)[0]["samples"]
        torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    sampled = run_node(**{**inputs, "denoise": 0.5, "sharpen": 1.0})
    assert sampled.shape == out.shape and torch.isfinite(sampled).all() and (sampled - out).abs().max() > 1e-3


def test_tiled_vae_option_uses_the_tiled_paths(monkeypatch):
    vae = tiny_models.build_tiny_vae(4)
    used = []
    for name in ("decode_tiled", "encode_tiled"):
        original = getattr(vae, name)
        monkeypatch.setattr(vae, name, lambda *a, _f=original, _n=name, **k: used.append(_n) or _f(*a, **k))
    out = run_node(**sd15_inputs(vae=vae, vae_tile_size=64, dwt_steps=1))
    assert out.shape == (1, 4, 16, 16) and torch.isfinite(out).all()
    assert used.count("decode_tiled") == 2 and used.count("encode_tiled") == 2  # input + guided step, guide + step


def test_progress_bar_runs_over_stages_times_steps_and_cancel_stops_it():
    with progress_reports() as reports:
        run_node(**sd15_inputs(stages=2, scale_factor=1.5))
    assert {total for _, total in reports} == {2 * STEPS}
    values = [v for v, _ in reports]
    assert values == sorted(values) and values[-1] == 2 * STEPS and set(range(1, 2 * STEPS + 1)) <= set(values)

    with progress_reports(cancel_at=2) as reports:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_node(**sd15_inputs(stages=2, scale_factor=1.5))
        assert max(v for v, _ in reports) == 2 and not comfy.model_management.processing_interrupted()


def test_inputs_are_not_mutated_and_a_rerun_is_identical():
    inputs = sd15_inputs()
    model = inputs["model"]
    before = repr(model.model_options), inputs["latent"]["samples"].clone(), dict(inputs["positive"][0][1])
    first = run_node(**inputs)
    assert repr(model.model_options) == before[0] and torch.equal(inputs["latent"]["samples"], before[1])
    assert inputs["positive"][0][1] == before[2]
    assert torch.equal(run_node(**inputs), first)


def test_clear_errors_name_the_input():
    with pytest.raises(ValueError, match="scale_factor"):
        run_node(**sd15_inputs(scale_factor=0.5))
    with pytest.raises(ValueError, match="stages"):
        run_node(**sd15_inputs(stages=0))
    with pytest.raises(ValueError, match="latent: it has 3 channels but the vae encodes 4"):
        run_node(**sd15_inputs(latent={"samples": torch.zeros(1, 3, 8, 8)}))
    with pytest.raises(ValueError, match="latent: it has 16 channels but the model's latent format takes 4"):
        run_node(**sd15_inputs(latent={"samples": torch.zeros(1, 16, 8, 8)}, vae=tiny_models.build_tiny_vae(16)))
    with pytest.raises(ValueError, match="latent: expected an image"):
        run_node(**sd15_inputs(latent={"samples": torch.zeros(4, 8, 8)}))
    with pytest.raises(ValueError, match="target_sizes"):
        run_node(**sd15_inputs(target_sizes="big"))
    with pytest.raises(ValueError, match="guidance_space"):
        run_node(**sd15_inputs(guidance_space="pixels"))


def test_explicit_target_sizes_override_scale_and_stages():
    out = run_node(**sd15_inputs(target_sizes="96x80, 128x112", scale_factor=3.0))
    assert out.shape == (1, 4, 14, 16)


def test_schema_keeps_the_contract():
    schema = dh.DiffuseHigh.define_schema()
    assert schema.node_id == "TL_DiffuseHigh"
    inputs = {i.id: i for i in schema.inputs}
    contract = {"scale_factor": 2.0, "stages": 1, "denoise": 0.3, "dwt_steps": 5, "wavelet": "db4", "sharpen": 1.0}
    assert {k: inputs[k].default for k in contract} == contract
    assert inputs["wavelet"].options == ["db4", "haar"]
    for name in ("model", "positive", "negative", "vae", "latent", "seed", "steps", "cfg", "sampler_name", "scheduler"):
        assert name in inputs and not inputs[name].optional
    assert inputs["guidance_space"].options == ["image", "latent"] and inputs["guidance_space"].optional


def test_runs_in_a_comfyui_graph_after_a_ksampler(host):
    if "TL_DiffuseHigh" not in host.nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("TL_DiffuseHigh is not registered in nodes/__init__.py yet")
    from workflows import sd15_image_nodes

    prompt = sd15_image_nodes("g_")
    del prompt["g_decode"], prompt["g_save"]
    prompt["high"] = {"class_type": "TL_DiffuseHigh", "inputs": {
        "model": ["g_model", 0], "positive": ["g_pos", 0], "negative": ["g_neg", 0], "vae": ["g_vae", 0],
        "latent": ["g_sample", 0], "scale_factor": 2.0, "stages": 1, "denoise": 0.3, "dwt_steps": 2,
        "wavelet": "haar", "sharpen": 1.0, "seed": 1, "steps": 3, "cfg": 2.0, "sampler_name": "euler",
        "scheduler": "normal", "guidance_space": "latent"}}  # fmt: skip
    out = host.run(prompt)
    upscaled = out["high"][0]["samples"]
    assert upscaled.shape == (1, 4, 16, 16)
    direct = dict(prompt["high"]["inputs"], model=out["g_model"][0], positive=out["g_pos"][0],
                  negative=out["g_neg"][0], vae=out["g_vae"][0], latent=out["g_sample"][0])  # fmt: skip
    assert torch.equal(run_node(**direct), upscaled)
