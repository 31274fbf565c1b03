"""Feynman-Kac correctors: the samplers.smc core on exact Gaussian mixtures, and TL_FKCSampler / TL_FKCGuider in
the real host (exact GMM MODELs, tiny SD1.5, Flux and Wan), against closed-form answers."""

import math

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils
import pytest
import tiny_models
import torch
from gmm_exact import GaussianMixture
from harness import pack
from probes import count_calls

smc = pack("samplers.smc")
conventions = pack("samplers.conventions")
steppers = pack("samplers.steppers")
basic = pack("samplers.basic")
fk = pack("nodes.feynman_kac")

# ---------------------------------------------------------------- pure core: weights


def random_experts(n=6, dim=3, experts=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64) * 2
    denoised = torch.randn(experts, n, dim, generator=g, dtype=torch.float64)
    return x, denoised


@pytest.mark.parametrize("betas", [(-3.0, 4.0), (1.0, 1.0), (2.0,), (0.5, 0.25, 0.25)])
def test_increment_is_the_literal_score_formula(betas):
    """exact_in_snr=False is (Δ/2)(‖s*‖² − Σ β_k ‖s_k‖²) with s_k = (D_k − x)/σ², computed naively in the VE form."""
    x, denoised = random_experts(experts=len(betas))
    b = torch.tensor(betas, dtype=torch.float64)
    sigma, sigma_next = torch.tensor(2.0, dtype=torch.float64), torch.tensor(1.5, dtype=torch.float64)
    scores = (denoised - x) / sigma**2
    target = (b[:, None, None] * scores).sum(0)
    literal = (sigma**2 - sigma_next**2) / 2 * ((target**2).sum(-1) - (b[:, None] * (scores**2).sum(-1)).sum(0))
    got = smc.log_weight_increment(smc.ExpertPredictions(denoised, b), x, sigma, sigma_next, exact_in_snr=False)
    torch.testing.assert_close(got, literal, rtol=1e-12, atol=1e-12)


def test_cfg_special_case_is_the_general_form_exact_in_snr():
    x, denoised = random_experts()
    w = 4.0
    pred = smc.ExpertPredictions(denoised, torch.tensor([1 - w, w], dtype=torch.float64))
    sigma, sigma_next = torch.tensor(0.8, dtype=torch.float64), torch.tensor(0.5, dtype=torch.float64)
    for flow in (False, True):
        general = smc.log_weight_increment(pred, x, sigma, sigma_next, flow=flow, exact_in_snr=True)
        special = smc.cfg_log_weight_increment(denoised[0], denoised[1], w, sigma, sigma_next, flow=flow)
        torch.testing.assert_close(general, special, rtol=1e-12, atol=1e-12)
        by_hand = 0.5 * w * (w - 1) * ((denoised[1] - denoised[0]) ** 2).sum(-1)
        by_hand = by_hand * (conventions.snr(sigma_next, flow) - conventions.snr(sigma, flow))
        torch.testing.assert_close(special, by_hand, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("betas", [(-3.0, 4.0), (2.0,)])
def test_flow_increments_equal_the_ve_ones_and_stay_finite_at_sigma_one(betas):
    """A flow sample at σ is the VE sample x / (1 − σ) at σ / (1 − σ) with the same D: same weights, both forms."""
    x, denoised = random_experts(experts=len(betas))
    pred = smc.ExpertPredictions(denoised, torch.tensor(betas, dtype=torch.float64))
    sigma, sigma_next = torch.tensor(0.7, dtype=torch.float64), torch.tensor(0.4, dtype=torch.float64)
    for exact in (True, False):
        flow = smc.log_weight_increment(pred, x, sigma, sigma_next, flow=True, exact_in_snr=exact)
        x_ve, s_ve = conventions.flow_to_ve(x, sigma)
        ve = smc.log_weight_increment(pred, x_ve, s_ve, conventions.flow_sigma_to_ve(sigma_next), exact_in_snr=exact)
        torch.testing.assert_close(flow, ve, rtol=1e-10, atol=1e-10)
    at_one = smc.log_weight_increment(pred, x, torch.tensor(1.0, dtype=torch.float64), sigma_next, flow=True)
    assert torch.isfinite(at_one).all()


# ---------------------------------------------------------------- pure core: resampling, ESS, moves


@pytest.mark.parametrize("u", [0.0, 0.37, 1.0 - 2**-53])
def test_uniform_weights_resample_to_the_identity(u):
    for k in (1, 3, 7, 8, 128):
        idx = smc.systematic_resample(
            torch.full((2, k), -1.7, dtype=torch.float64), torch.tensor([u, u], dtype=torch.float64)
        )
        assert torch.equal(idx, torch.arange(k).expand(2, k))


def test_systematic_resampling_gives_floor_or_ceil_copies_within_each_group():
    g = torch.Generator().manual_seed(3)
    log_w = torch.randn(5, 16, generator=g, dtype=torch.float64) * 2
    uniforms = torch.rand(5, generator=g, dtype=torch.float64)
    idx = smc.systematic_resample(log_w, uniforms)
    expected = 16 * torch.softmax(log_w, dim=1)
    for row in range(5):
        copies = torch.bincount(idx[row], minlength=16).double()
        assert copies.sum() == 16
        assert ((copies >= expected[row].floor()) & (copies <= expected[row].ceil())).all()
    one_heavy = torch.full((1, 8), -50.0, dtype=torch.float64)
    one_heavy[0, 5] = 0.0
    assert torch.equal(smc.systematic_resample(one_heavy, torch.tensor([0.5])), torch.full((1, 8), 5))


def test_effective_sample_size():
    log_w = torch.tensor([[0.0] * 8, [0.0] + [-80.0] * 7, [0.0, 0.0] + [-80.0] * 6, [3.0] * 8])
    torch.testing.assert_close(smc.effective_sample_size(log_w), torch.tensor([8.0, 1.0, 2.0, 8.0]))


def test_flow_move_from_sigma_one_is_finite_and_exact():
    """From pure noise (flow σ = 1) the ancestral step is x' = (1 − σ') D + σ' z: nothing of x survives."""
    g = torch.Generator().manual_seed(0)
    x, d, z = (torch.randn(4, 2, generator=g, dtype=torch.float64) for _ in range(3))
    moved = steppers.euler_ancestral_step(x, d, 1.0, 0.9, lambda _: z, 1.0, True)
    torch.testing.assert_close(moved, 0.1 * d + 0.9 * z, rtol=1e-12, atol=1e-12)


def test_chunk_rows_keep_whole_particles():
    assert smc.chunk_rows(12, 3, 0) == [slice(0, 12)]
    assert smc.chunk_rows(12, 3, 7) == [slice(0, 6), slice(6, 12)]
    assert smc.chunk_rows(12, 3, 2) == [slice(i, i + 3) for i in range(0, 12, 3)]  # never below one unit


MIX = GaussianMixture([[-2.0], [2.0]], [0.3, 0.7], 0.5)


def test_identical_experts_keep_zero_weights_and_follow_euler_ancestral():
    """w = 4 with D_c = D_u: the weights stay exactly 0, resampling every step is the identity, and the particles
    follow the shared euler-ancestral sampler with the same noise."""
    sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.2, 0.0], dtype=torch.float64)
    x = torch.randn(12, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]

    def experts(x_, s):
        d = MIX.denoise(x_, s)
        return smc.ExpertPredictions(torch.stack([d, d]), torch.tensor([-3.0, 4.0], dtype=torch.float64))

    result = smc.sample_fkc(experts, x, sigmas, {"seed": 5}, options=smc.FKCOptions(particles=4))
    base = basic.sample_euler_ancestral(lambda x_, s: MIX.denoise(x_, s), x, sigmas, noise_fn=steppers.seeded_noise(5))
    assert torch.equal(result.log_weights, torch.zeros(3, 4, dtype=torch.float64))
    assert all(all(s.resampled) and s.ess == [4.0] * 3 for s in result.steps[:-1])
    torch.testing.assert_close(result.x, base, rtol=1e-12, atol=1e-12)


def cfg_experts(w=4.0, cond=(0.8, 0.2)):
    def experts(x_, s):
        d = torch.stack([MIX.denoise(x_, s), MIX.denoise(x_, s, weights=torch.tensor([cond], dtype=torch.float64))])
        return smc.ExpertPredictions(d, torch.tensor([1 - w, w], dtype=torch.float64))

    return experts


def test_increment_clamp_and_resampling_window():
    sigmas = torch.cat(
        [
            torch.exp(torch.linspace(math.log(10.0), math.log(0.05), 20, dtype=torch.float64)),
            torch.zeros(1, dtype=torch.float64),
        ]
    )
    x = torch.randn(64, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * sigmas[0]
    seen = []
    options = smc.FKCOptions(particles=32, increment_clamp=0.5, resample_sigma_max=1.0)

    def record(info):
        seen.append(info["log_weights"].abs().max().item())

    result = smc.sample_fkc(cfg_experts(), x, sigmas, {"seed": 0}, record, options=options)
    assert max(seen) <= 0.5 * 20 and max(seen[:-1]) > 0.5  # clamped per step, accumulated before the window
    steps = result.steps[:-1]
    assert all(not any(s.resampled) for s in steps if s.sigma > 1.0) and all(
        all(s.resampled) for s in steps if s.sigma <= 1.0
    )
    first_in_window = next(i for i, s in enumerate(steps) if s.sigma <= 1.0)
    assert all(v <= 0.5 + 1e-12 for v in seen[first_in_window + 1 : -1])  # one clamped increment since the reset


def test_select_output_layout():
    x = torch.arange(6.0)[:, None]  # particle-major: rows k·B + b with B = 2 images, K = 3 particles
    log_w = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 0.0]], dtype=torch.float64)
    result = smc.FKCResult(x, log_w, log_w)
    assert smc.select_output(result, "all")[:, 0].tolist() == [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]  # image-major
    assert smc.select_output(result, "best")[:, 0].tolist() == [2.0, 1.0]


def test_options_reject_bad_values_by_input_name():
    for bad, name in [
        ({"particles": 0}, "particles"),
        ({"eta": 0.0, "particles": 2}, "eta = 0"),
        ({"ess_threshold": 1.5}, "ess_threshold"),
        ({"noise": "x"}, "noise"),
    ]:
        with pytest.raises(ValueError, match=name):
            smc.FKCOptions(**bad).validate()
    smc.FKCOptions(particles=1, eta=0.0).validate()  # one particle never resamples: an ODE is fine


# ---------------------------------------------------------------- nodes in the host: helpers


def fkc_sampler(particles=4, noise="target", resample="every_step", ess_threshold=0.5, output="all", **optional):
    return fk.FKCSampler.execute(particles, noise, resample, ess_threshold, output, **optional).args[0]


def fkc_guider(model, positive, negative, cfg=4.0, beta=1.0, positive_2=None, positive_3=None):
    return fk.FKCGuider.execute(model, positive, negative, cfg, beta, positive_2, positive_3).args[0]


def mixture_model(mixture: GaussianMixture, flavour: str):
    """An exact GMM MODEL for any mixture, built from the classes of tiny_models' preset GMM MODEL."""
    import comfy.model_management as mm

    donor = tiny_models.build_gmm_model(flavour, "two_modes_1d").model
    unet_config = {
        "means": mixture.means.tolist(),
        "weights": mixture.weights.tolist(),
        "stds": mixture.stds.tolist(),
        "flow": flavour == "flow",
    }
    config = type(donor.model_config)(unet_config, mixture.dim)
    model = type(donor)(config, model_type=donor.model_type, unet_model=tiny_models.GMMDenoiser)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def gmm_latent(batch, preset="two_modes_1d"):
    return torch.zeros(tiny_models.gmm_latent_shape(preset, batch))


def cfg_sample(model, sampler, cfg, positive, negative, latent, seed=0, sigmas=None, steps=10, noise_mask=None):
    if sigmas is None:
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", steps)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample_custom(
        model, noise, cfg, sampler, sigmas, positive, negative, latent, noise_mask=noise_mask, seed=seed
    )


def guider_sample(guider, sampler, latent, sigmas, seed=0):
    noise = comfy.sample.prepare_noise(latent, seed)
    return guider.sample(noise, latent, sampler, sigmas, seed=seed)


UNCOND = tiny_models.gmm_conditioning([0, 0])  # all zeros: the mixture's own weights


# ---------------------------------------------------------------- nodes: invariants


def test_one_particle_at_cfg_one_is_comfyui_euler_ancestral():
    model = tiny_models.build_gmm_model("eps", "two_modes_1d")
    positive = tiny_models.gmm_conditioning([0.8, 0.2])
    sampler = fkc_sampler(particles=1)
    ours = cfg_sample(model, sampler, 1.0, positive, UNCOND, gmm_latent(3), seed=7)
    theirs = cfg_sample(model, comfy.samplers.ksampler("euler_ancestral"), 1.0, positive, UNCOND, gmm_latent(3), seed=7)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert torch.equal(sampler.last_log_weights, torch.zeros(3, 1, dtype=torch.float64))


def test_four_particles_at_cfg_one_keep_zero_weights_and_are_comfyui_euler_ancestral():
    """w = 1 with K = 4: the K = 1 test above cannot tell, since per-group centring zeroes a lone particle's weight
    whatever its increment. At cfg 1 the target is q_c alone (ComfyUI skips the unconditional call), so the
    increments are exactly 0 (tolerance: none; one expert, D-bar = D bit for bit), every-step resampling is the
    identity, and the 4 x 3 particles are ComfyUI's euler_ancestral on their start noise (1e-5, as above). The core
    with the exponent-0 unconditional expert kept (beta = (0, 1), D_u != D_c) gives exactly 0 as well."""
    model = tiny_models.build_gmm_model("eps", "two_modes_1d")
    positive = tiny_models.gmm_conditioning([0.8, 0.2])
    latent, k, seed = gmm_latent(3), 4, 7
    sampler = fkc_sampler(particles=k, output="all")
    ours = cfg_sample(model, sampler, 1.0, positive, UNCOND, latent, seed=seed)
    assert torch.equal(sampler.last_log_weights, torch.zeros(3, k, dtype=torch.float64))
    assert all(step.ess == [k] * 3 and all(step.resampled) for step in sampler.last_steps[:-1])
    noise = smc.particle_start_noise(comfy.sample.prepare_noise(latent, seed), k, seed)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "karras", 10)
    theirs = comfy.sample.sample_custom(
        model, noise, 1.0, comfy.samplers.ksampler("euler_ancestral"), sigmas, positive, UNCOND,
        smc.repeat_particles(latent, k), seed=seed,
    )  # fmt: skip
    theirs = theirs.reshape(k, 3, *latent.shape[1:]).transpose(0, 1).reshape(ours.shape)  # image-major, like "all"
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)

    mix_sigmas = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5, 0.0], dtype=torch.float64)
    x = torch.randn(3 * k, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * mix_sigmas[0]
    core = smc.sample_fkc(cfg_experts(w=1.0), x, mix_sigmas, {"seed": 1}, options=smc.FKCOptions(particles=k))
    assert torch.equal(core.log_weights, torch.zeros(3, k, dtype=torch.float64))


def test_disabled_noise_starts_every_particle_from_the_latent():
    """SamplerCustomAdvanced with DisableNoise (ComfyUI hands the sampler all-zero noise) from sigma 0.6, as in
    img2img: every particle starts from the latent itself, as the plain sampler would, instead of particles 1..K-1
    getting fresh noise. Flow GMM (identity latent format): the first model call sees (1 - 0.6) x latent in every
    row; the particles then part through their own step noise."""
    from comfy_extras.nodes_custom_sampler import DisableNoise, SamplerCustomAdvanced

    model, first_inputs = tiny_models.build_gmm_model("flow", "two_modes_1d").clone(), []

    def record(executor, x, t, *args, **kwargs):
        first_inputs.append(x.clone())
        return executor(x, t, *args, **kwargs)

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "tests.first_input", record)
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(tiny_models.gmm_conditioning([0.8, 0.2]), UNCOND)
    guider.set_cfg(3.0)
    latent = {"samples": torch.tensor([1.5, -0.5]).reshape(2, 1, 1, 1)}
    k, sigmas = 4, torch.linspace(0.6, 0.0, 7)
    noise = DisableNoise.execute().result[0]
    out = SamplerCustomAdvanced.execute(noise, guider, fkc_sampler(k, output="all"), sigmas, latent).result[0]
    start = first_inputs[0]  # cond and uncond rows of the K x 2 particles in one call
    expected = (1.0 - 0.6) * latent["samples"].repeat(start.shape[0] // 2, 1, 1, 1)
    torch.testing.assert_close(start, expected, rtol=0, atol=1e-6)
    assert out["samples"].shape == (2 * k, 1, 1, 1) and out["samples"].unique().numel() == 2 * k


def test_identical_experts_in_the_host_keep_zero_weights_and_match_the_base_sampler():
    """TL_FKCGuider with positive = negative at cfg 4: weights stay 0 at every step, the per-step resampling is the
    identity, and the K particles per image equal the shared euler-ancestral sampler run on the same start noise."""
    model = tiny_models.build_gmm_model("flow", "two_modes_1d")
    cond = tiny_models.gmm_conditioning([0.6, 0.4])
    latent, k, seed = gmm_latent(2), 4, 11
    sigmas = torch.linspace(0.98, 0.0, 13)  # the shared stepper's flow branch divides by 1 - sigma
    sampler = fkc_sampler(particles=k, output="all")
    ours = guider_sample(fkc_guider(model, cond, cond, cfg=4.0), sampler, latent, sigmas, seed)
    assert torch.equal(sampler.last_log_weights, torch.zeros(2, k, dtype=torch.float64))
    assert all(step.ess == pytest.approx([k, k]) and all(step.resampled) for step in sampler.last_steps[:-1])

    plain = comfy.samplers.CFGGuider(model)
    plain.set_conds(cond, cond)
    noise = smc.particle_start_noise(comfy.sample.prepare_noise(latent, seed), k, seed)
    base_sampler = comfy.samplers.KSAMPLER(basic.sample_euler_ancestral, extra_options={"flow": True})
    base = plain.sample(noise, smc.repeat_particles(latent, k), base_sampler, sigmas, seed=seed)
    base = base.reshape(k, 2, *latent.shape[1:]).transpose(0, 1).reshape(ours.shape)  # image-major, like "all"
    torch.testing.assert_close(ours, base, rtol=1e-5, atol=1e-5)
    assert ours.unique().numel() == ours.numel()  # i.i.d. noise per particle: no duplicates


def test_fkc_guider_with_a_plain_sampler_is_cfg_and_the_annealed_score():
    """With any other sampler TL_FKCGuider gives its target's denoiser: plain CFG for one positive, and for beta 2
    (B = 2) D* = 2 D - x, i.e. twice the score; checked on one Euler step against hand-made references."""
    model = tiny_models.build_gmm_model("eps", "two_modes_1d")
    positive = tiny_models.gmm_conditioning([0.8, 0.2])
    euler = comfy.samplers.ksampler("euler")
    sigmas = torch.tensor([3.0, 2.0])
    latent = gmm_latent(4)
    ours = guider_sample(fkc_guider(model, positive, UNCOND, cfg=3.0), euler, latent, sigmas)
    plain = comfy.samplers.CFGGuider(model)
    plain.set_conds(positive, UNCOND)
    plain.set_cfg(3.0)
    torch.testing.assert_close(ours, guider_sample(plain, euler, latent, sigmas), rtol=1e-5, atol=1e-5)

    annealed = guider_sample(fkc_guider(model, positive, UNCOND, cfg=1.0, beta=2.0), euler, latent, sigmas)
    x = comfy.sample.prepare_noise(latent, 0) * 3.0
    d = tiny_models.gmm_preset("two_modes_1d").denoise(
        x.reshape(4, 1).double(), 3.0, weights=torch.tensor([[0.8, 0.2]])
    )
    d_star = 2 * d - x.reshape(4, 1).double()
    expected = x.reshape(4, 1).double() + (2.0 - 3.0) * (x.reshape(4, 1).double() - d_star) / 3.0
    torch.testing.assert_close(annealed.reshape(4, 1).double(), expected, rtol=1e-5, atol=1e-5)


def test_eps_and_flow_versions_give_the_same_centred_log_weights():
    """One GMM as an EPS and as a flow model, on matching schedules (σ_flow = σ_ve / (1 + σ_ve)) and the same noise:
    the particles are the same in VE coordinates, so the accumulated log-weights (no resampling) agree."""
    positive = tiny_models.gmm_conditioning([0.8, 0.2])
    sigmas_ve = torch.cat([torch.exp(torch.linspace(math.log(10.0), math.log(0.05), 25)), torch.zeros(1)])
    results = {}
    for flavour, sigmas in (("eps", sigmas_ve), ("flow", conventions.ve_sigma_to_flow(sigmas_ve))):
        sampler = fkc_sampler(particles=16, resample="ess", ess_threshold=0.0)  # never resample
        out = cfg_sample(
            tiny_models.build_gmm_model(flavour, "two_modes_1d"),
            sampler,
            3.0,
            positive,
            UNCOND,
            gmm_latent(2),
            seed=3,
            sigmas=sigmas,
        )
        log_w = sampler.last_log_weights
        results[flavour] = (out, log_w - log_w.mean(dim=1, keepdim=True))
    spread = results["eps"][1].abs().max().item()
    assert spread > 0.5  # the weights do something
    torch.testing.assert_close(results["flow"][1], results["eps"][1], rtol=0, atol=2e-3 * spread)
    torch.testing.assert_close(results["flow"][0], results["eps"][0], rtol=0, atol=2e-3)


# ---------------------------------------------------------------- nodes: distributions with closed-form targets

UNEQUAL = GaussianMixture([[-2.0], [2.0]], [0.5, 0.5], [0.25, 1.0])  # annealing moves mass between unequal widths
GRID = torch.linspace(-9.0, 9.0, 36001, dtype=torch.float64)
GROUPS, PARTICLES, STEPS = 32, 128, 300


def target_density(experts):
    """Π_k q_k^{β_k} on GRID at σ = 0, normalised; experts: (mode weights or None for the mixture's, β)."""
    log_p = torch.zeros_like(GRID)
    for weights, beta in experts:
        w = None if weights is None else torch.tensor(weights, dtype=torch.float64)
        log_p = log_p + beta * UNEQUAL.log_prob(GRID[:, None], weights=w)
    return torch.softmax(log_p, dim=0)


def wasserstein_1(samples, density):
    """W1 = ∫ |F_n − F| dx between the empirical CDF of 1-D samples and the target's CDF on GRID."""
    s = samples.reshape(-1).to(torch.float64).sort().values
    empirical = torch.searchsorted(s, GRID, right=True).to(torch.float64) / s.numel()
    return float((empirical - torch.cumsum(density, 0)).abs().sum() * (GRID[1] - GRID[0]))


def iid_floor(density, n, draws=100):
    """RMS W1 of n i.i.d. exact samples (inverse CDF on GRID): the best any sampler can do with n samples."""
    g = torch.Generator().manual_seed(1234)
    cdf = torch.cumsum(density, 0)
    errors = [
        wasserstein_1(
            GRID[torch.searchsorted(cdf, torch.rand(n, generator=g, dtype=torch.float64)).clamp_max(GRID.numel() - 1)],
            density,
        )
        for _ in range(draws)
    ]
    return math.sqrt(sum(e * e for e in errors) / draws)


def check_distribution(name, experts, run, eta=fk.AUTO_ETA, noise="target", of_uncorrected=0.5, of_floor=3.0):
    """FKC (GROUPS images x PARTICLES, output all) against the uncorrected SDE (one particle per image, same total,
    same noise kind), both against the exact target. Pass: FKC error <= of_uncorrected x the uncorrected error and
    <= of_floor x the i.i.d. floor (by default half and 3x). eta: the node's default (auto) unless given."""
    density = target_density(experts)
    n = GROUPS * PARTICLES
    fkc = wasserstein_1(run(fkc_sampler(PARTICLES, noise, output="all", eta=eta), GROUPS), density)
    uncorrected = wasserstein_1(run(fkc_sampler(1, noise, output="all", eta=eta), n), density)
    floor = iid_floor(density, n)
    print(f"{name}: W1 uncorrected {uncorrected:.4f}, FKC {fkc:.4f}, i.i.d. floor {floor:.4f} (n = {n})")
    assert fkc <= of_uncorrected * uncorrected, (fkc, uncorrected)
    assert fkc <= of_floor * floor, (fkc, floor)


FLOW_SIGMAS = torch.linspace(1.0, 0.0, STEPS + 1)


@pytest.fixture(scope="module")
def unequal_flow_model():
    return mixture_model(UNEQUAL, "flow")


def test_cfg_w4_matches_the_closed_form_target(unequal_flow_model):
    """q_u^{-3} q_c^4 with q_u = (0.2, 0.8), q_c = (0.5, 0.5) mode weights; plain CFG through SamplerCustom's cfg."""
    positive, negative = tiny_models.gmm_conditioning([0.5, 0.5]), tiny_models.gmm_conditioning([0.2, 0.8])

    def run(sampler, batch):
        return cfg_sample(
            unequal_flow_model, sampler, 4.0, positive, negative, gmm_latent(batch), seed=0, sigmas=FLOW_SIGMAS
        )

    check_distribution("CFG w=4", [([0.2, 0.8], -3.0), ([0.5, 0.5], 4.0)], run)  # auto: eta 1 for B = 1


def test_annealing_beta2_matches_the_closed_form_target(unequal_flow_model):
    """q^2 of a mixture with unequal widths: the narrow mode's mass grows from 0.5 to 0.8. Default eta (auto: sqrt 2;
    same weights, faster-decorrelating noise): with eta = 1 the B = 2 weights are noisy enough to miss the 3x-floor
    bar (W1 0.079 vs floor 0.029, mean of seeds 0-2; auto 0.027)."""
    guider = fkc_guider(unequal_flow_model, UNCOND, UNCOND, cfg=1.0, beta=2.0)

    def run(sampler, batch):
        return guider_sample(guider, sampler, gmm_latent(batch), FLOW_SIGMAS, seed=0)

    check_distribution("annealing beta=2", [(None, 2.0)], run)


def test_annealing_beta2_with_tempered_noise_beats_the_uncorrected_sampler(unequal_flow_model):
    """noise = tempered (the tempered-noise SDE, eta 1/sqrt(B)) on the beta = 2 target above, same sizes and seed.
    Its weights are noisier than the target SDE's with auto eta (the tooltip's 4-10x the floor), so the bars are
    looser: measured W1 0.103 (seed 0; 0.129 with seed 1) against 0.809 uncorrected and a floor of 0.029. Pass:
    at most a quarter of the uncorrected error and 6x the floor (3.6x measured)."""
    guider = fkc_guider(unequal_flow_model, UNCOND, UNCOND, cfg=1.0, beta=2.0)

    def run(sampler, batch):
        return guider_sample(guider, sampler, gmm_latent(batch), FLOW_SIGMAS, seed=0)

    check_distribution("annealing beta=2, tempered", [(None, 2.0)], run, noise="tempered", of_uncorrected=0.25,
                       of_floor=6.0)  # fmt: skip


def test_product_of_two_prompts_matches_the_closed_form_target(unequal_flow_model):
    """q_1 q_2 with mode weights (0.8, 0.2) and (0.2, 0.8): TL_FKCGuider with cfg 0.5, beta 2 (no negative term)."""
    p1, p2 = tiny_models.gmm_conditioning([0.8, 0.2]), tiny_models.gmm_conditioning([0.2, 0.8])
    guider = fkc_guider(unequal_flow_model, p1, UNCOND, cfg=0.5, beta=2.0, positive_2=p2)
    assert guider.expert_betas() == {"positive": 1.0, "positive_2": 1.0}

    def run(sampler, batch):
        return guider_sample(guider, sampler, gmm_latent(batch), FLOW_SIGMAS, seed=0)

    check_distribution("product of two prompts", [([0.8, 0.2], 1.0), ([0.2, 0.8], 1.0)], run)


def test_auto_eta_is_sqrt_b_above_one_and_stored_etas_keep_their_meaning(unequal_flow_model):
    """eta = -1 (the widget's auto, its default) moves with max(1, sqrt B); a workflow that stored an eta (older
    ones stored 1.0, the former default) gets exactly that eta. Checked bit for bit against explicit etas."""
    assert [smc.auto_eta(b) for b in (0.5, 1.0, 4.0)] == [1.0, 1.0, 2.0]
    assert smc.move_eta("target", 2.0) == math.sqrt(2.0) and smc.move_eta("target", 2.0, 1.0) == 1.0
    assert smc.move_eta("tempered", 4.0) == 0.5 and smc.move_eta("tempered", 4.0, 2.0) == 1.0
    assert fkc_sampler().options.eta is None and fkc_sampler(eta=1.0).options.eta == 1.0
    sigmas = torch.linspace(1.0, 0.0, 21)
    annealed = fkc_guider(unequal_flow_model, UNCOND, UNCOND, cfg=1.0, beta=2.0)

    def run(guider, **eta):
        return guider_sample(guider, fkc_sampler(4, **eta), gmm_latent(8), sigmas)

    auto = run(annealed)
    assert torch.equal(auto, run(annealed, eta=math.sqrt(2.0)))
    assert not torch.equal(auto, run(annealed, eta=1.0))
    cfg = fkc_guider(unequal_flow_model, tiny_models.gmm_conditioning([0.5, 0.5]), UNCOND, cfg=4.0)
    assert torch.equal(run(cfg), run(cfg, eta=1.0))


def test_a_stored_eta_in_an_api_workflow_still_validates(host):
    """An API-format prompt as older exports wrote it (eta: 1) and one with the new auto value pass ComfyUI's
    validation and build the sampler with that eta."""
    prompt = {
        "sampler": {"class_type": "TL_FKCSampler", "inputs": {"particles": 2, "noise": "target",
                    "resample": "every_step", "ess_threshold": 0.5, "output": "best", "eta": 1}},
    }  # fmt: skip
    for eta in (1, -1):
        prompt["sampler"]["inputs"]["eta"] = eta
        outputs = host.run(prompt)
        assert outputs["sampler"][0].options.eta == (None if eta == -1 else 1.0)


# ---------------------------------------------------------------- nodes: chunking, inpainting, UI, cancel


def test_chunked_calls_with_an_inpainting_mask_equal_one_call():
    """max_batch splits B·K·experts rows into whole-particle chunks; the inpainting wrapper is sliced with them."""
    model, calls = count_calls(tiny_models.build_gmm_model("flow", "two_modes_1d"))
    positive = tiny_models.gmm_conditioning([0.8, 0.2])
    latent = torch.full((3, 1, 2, 1), 1.5)  # two independent 1-D samples per image; keep the second
    mask = torch.tensor([[[1.0], [0.0]]])
    sigmas = torch.linspace(1.0, 0.0, 7)
    whole = cfg_sample(model, fkc_sampler(4), 3.0, positive, UNCOND, latent, sigmas=sigmas, noise_mask=mask)
    assert calls == [3 * 4 * 2] * 6
    calls.clear()
    chunked = cfg_sample(
        model, fkc_sampler(4, max_batch=12), 3.0, positive, UNCOND, latent, sigmas=sigmas, noise_mask=mask
    )
    assert calls == [2 * 3 * 2] * 12  # 2 particles x 3 images x 2 experts per call
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    assert torch.equal(whole[:, :, 1], torch.full((12, 1, 1), 1.5))  # the kept half is the input latent
    assert not torch.equal(whole[:, :, 0], torch.full((12, 1, 1), 1.5))


def test_reports_ess_to_the_ui_and_progress_and_honours_cancel(monkeypatch):
    import server

    messages = []
    stub = type("Stub", (), {"client_id": "tests", "send_sync": lambda self, e, d, sid=None: messages.append((e, d))})
    monkeypatch.setattr(server.PromptServer, "instance", stub(), raising=False)
    progress = []
    monkeypatch.setattr(
        comfy.utils, "PROGRESS_BAR_HOOK", lambda value, total, preview, node_id=None: progress.append((value, total))
    )
    model = tiny_models.build_gmm_model("flow", "two_modes_1d")
    positive = tiny_models.gmm_conditioning([0.8, 0.2])
    sigmas = torch.linspace(1.0, 0.0, 6)
    cfg_sample(
        model, fkc_sampler(8, resample="ess", ess_threshold=0.9), 4.0, positive, UNCOND, gmm_latent(2), sigmas=sigmas
    )
    assert [e for e, _ in messages] == [fk.UI_EVENT] * 5
    assert [d["step"] for _, d in messages] == list(range(5))
    for _, d in messages:
        assert len(d["ess"]) == 2 and all(1.0 <= e <= 8.0 + 1e-9 for e in d["ess"]) and d["particles"] == 8
        assert d["resampled"] == [e < 0.9 * 8 for e in d["ess"]] or d["step"] == 4  # the last step never resamples
    assert progress == [(i, 5) for i in range(1, 6)]

    comfy.model_management.interrupt_current_processing(True)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        cfg_sample(model, fkc_sampler(8), 4.0, positive, UNCOND, gmm_latent(2), sigmas=sigmas)
    comfy.model_management.interrupt_current_processing(False)


# ---------------------------------------------------------------- nodes: errors


def test_errors_name_the_input():
    with pytest.raises(ValueError, match="TL_FKCSampler: particles must be at least 1"):
        fkc_sampler(particles=0)
    with pytest.raises(ValueError, match="TL_FKCSampler: eta = 0 makes every move deterministic"):
        fkc_sampler(particles=4, eta=0.0)
    with pytest.raises(ValueError, match=r"TL_FKCSampler: eta must be >= 0, or -1 for auto \(got -0.5\)"):
        fkc_sampler(eta=-0.5)
    with pytest.raises(ValueError, match="resample_start_percent"):
        fkc_sampler(resample_start_percent=0.8, resample_end_percent=0.2)
    model = tiny_models.build_gmm_model("flow", "two_modes_1d")
    with pytest.raises(ValueError, match="TL_FKCGuider: beta must be > 0"):
        fkc_guider(model, UNCOND, UNCOND, beta=0.0)


def test_a_guider_without_per_expert_predictions_is_refused():
    from comfy_extras.nodes_custom_sampler import Guider_DualCFG

    model = tiny_models.build_gmm_model("flow", "two_modes_1d")
    guider = Guider_DualCFG(model)
    guider.set_conds(tiny_models.gmm_conditioning([0.8, 0.2]), UNCOND, UNCOND)
    guider.set_cfg(3.0, 2.0)
    with pytest.raises(ValueError, match="guider Guider_DualCFG combines them in its own predict_noise"):
        guider_sample(guider, fkc_sampler(4), gmm_latent(1), torch.linspace(1.0, 0.0, 4))


# ---------------------------------------------------------------- nodes: tiny real architectures end to end

TINY_CASES = [("sd15", "cfg", "best", 2), ("flux", "product", "all", 1), ("wan21", "cfg", "sample", 1)]


@pytest.mark.parametrize("arch,target,output,batch", TINY_CASES)
def test_tiny_models_end_to_end(arch, target, output, batch):
    """Shapes, finiteness and determinism by seed; Flux runs an annealed AND-product from σ = 1 (SNR 0, B = 2)."""
    model = tiny_models.build_tiny_model(arch)
    positive = tiny_models.tiny_conditioning(arch, 1)
    negative = tiny_models.tiny_conditioning(arch, 2)
    latent = torch.zeros(tiny_models.latent_shape(arch, batch))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 4)
    k = 3

    def run(seed):
        sampler = fkc_sampler(k, output=output)
        if target == "cfg":
            return cfg_sample(model, sampler, 3.0, positive, negative, latent, seed=seed, sigmas=sigmas)
        guider = fkc_guider(
            model, positive, negative, cfg=0.5, beta=2.0, positive_2=tiny_models.tiny_conditioning(arch, 3)
        )
        return guider_sample(guider, sampler, latent, sigmas, seed=seed)

    first, again, other = run(0), run(0), run(1)
    expected = (batch * k if output == "all" else batch, *latent.shape[1:])
    assert tuple(first.shape) == expected
    assert torch.isfinite(first).all()
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
