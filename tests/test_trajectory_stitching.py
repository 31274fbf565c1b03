"""T-Stitch in the real host: exact routing on tiny real models, and accuracy on the exact GMM."""

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import pytest
import tiny_models
import torch
from harness import pack
from probes import count_calls
from workflows import tiny_arch_nodes

ts = pack("nodes.trajectory_stitching")
core = pack("samplers.stitching")
pag = pack("nodes.perturbed_attention")

# ---------------------------------------------------------------- pure rules


def test_step_rule_and_thresholds():
    assert core.steps_per_model(10, [0.4]) == [4, 6]
    assert core.steps_per_model(10, [0.0]) == [0, 10] and core.steps_per_model(10, [1.0]) == [10, 0]
    assert core.steps_per_model(100, [0.29, 0.58]) == [29, 29, 42]  # 0.29 * 100 is 28.999...: still 29
    sigmas = [10.0, 5.0, 2.0, 1.0, 0.0]
    thresholds = core.step_thresholds(sigmas, [0.5])
    assert [core.model_index(s, thresholds) for s in sigmas[:-1]] == [0, 0, 1, 1]
    assert core.model_index(2.0, core.step_thresholds(sigmas, [0.0])) == 1
    assert all(core.model_index(s, core.step_thresholds(sigmas, [1.0])) == 0 for s in sigmas[:-1])
    with pytest.raises(ValueError, match="must not decrease"):
        core.check_fractions([0.6, 0.3])
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        core.check_fractions([1.2])


# ---------------------------------------------------------------- helpers


def sample(model, arch="sd15", steps=10, cfg=2.0, sampler="euler", scheduler="normal", positive=None):
    latent = torch.zeros(tiny_models.latent_shape(arch))
    positive = positive or tiny_models.tiny_conditioning(arch, 1)
    negative = [[torch.zeros_like(positive[0][0]), {k: torch.zeros_like(v) for k, v in positive[0][1].items()}]]
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler, scheduler, positive, negative, latent, seed=0, disable_pbar=True
    )


def stitch(small, large, r, switch_by="steps", history="carry", release="when_vram_short"):
    return ts.TStitchModel.execute(small, large, r, switch_by, history, release).result[0]


# ---------------------------------------------------------------- exactness of the routing


@pytest.mark.parametrize("r", [0.0, 0.25, 0.4, 1.0])
def test_same_model_twice_is_plain_sampling_with_exact_call_counts(r):
    base = tiny_models.build_tiny_model("sd15")
    small, small_calls = count_calls(base, "sigma")
    large, large_calls = count_calls(base, "sigma")
    assert torch.equal(sample(stitch(small, large, r)), sample(base))
    n_small = int(r * 10 + 1e-9)
    assert (len(small_calls), len(large_calls)) == (n_small, 10 - n_small)


@pytest.mark.parametrize(
    "sampler", ["heun", "dpmpp_2m", "dpmpp_2s_ancestral", "uni_pc", "lcm", "euler_ancestral", "dpmpp_2m_cfg_pp"]
)
def test_every_kind_of_sampler_is_unchanged_when_both_models_are_the_same(sampler):
    """Including the CFG++ samplers, which hook into CFG through model options: the small model's calls get it."""
    base = tiny_models.build_tiny_model("sd15")
    assert torch.equal(sample(stitch(base, base, 0.4), sampler=sampler), sample(base, sampler=sampler))


def test_segments_follow_the_model_that_starts_each_step():
    sigmas = [10.0, 5.0, 2.0, 1.0, 0.0]
    assert core.segment_bounds(sigmas, core.step_thresholds(sigmas, [0.5])) == [(0, 2), (2, 4)]
    assert core.segment_bounds(sigmas, core.step_thresholds(sigmas, [0.0])) == [(0, 4)]
    assert core.segment_bounds(sigmas, core.step_thresholds(sigmas, [0.25, 0.75])) == [(0, 1), (1, 3), (3, 4)]
    assert core.segment_bounds(sigmas, [3.0]) == [(0, 2), (2, 4)]  # switch_by = sigma


@pytest.mark.parametrize(
    "sampler", ["heun", "euler_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "lcm", "euler_ancestral_cfg_pp"]
)
def test_restart_leaves_single_step_samplers_and_their_noise_unchanged(sampler):
    """A single-step sampler has no history, so restarting it at the switch changes nothing, provided both segments
    draw from the run's one noise stream (seeded generator or Brownian tree): a replayed stream would differ."""
    base = tiny_models.build_tiny_model("sd15")
    restarted = sample(stitch(base, base, 0.4, history="restart"), sampler=sampler)
    assert torch.equal(restarted, sample(base, sampler=sampler))


@pytest.mark.parametrize("path,name", [("model", "dpmpp_2m"), ("guider", "dpmpp_2m"), ("model", "uni_pc")])
def test_restart_runs_the_large_segment_as_a_fresh_multistep_run_from_the_switch_state(path, name):
    """10 steps, r = 0.4: the stitched run equals a small-only run over the first 4 steps followed by a fresh
    large-only run over the last 6, started from that state (tolerance: the latent scale round trip)."""
    large, small = tiny_models.build_tiny_model("sd15", seed=0), tiny_models.build_tiny_model("sd15", seed=5)
    positive = tiny_models.tiny_conditioning("sd15", 1)
    negative = [[torch.zeros_like(positive[0][0]), {}]]
    latent = torch.zeros(tiny_models.latent_shape("sd15"))
    noise = comfy.sample.prepare_noise(latent, 0)
    sigmas = comfy.samplers.calculate_sigmas(large.get_model_object("model_sampling"), "normal", 10)
    sampler = comfy.samplers.sampler_object(name)

    def custom(model, noise, sigmas, latent, callback=None):
        return comfy.sample.sample_custom(model, noise, 2.0, sampler, sigmas, positive, negative, latent,
                                          callback=callback, disable_pbar=True, seed=0)  # fmt: skip

    def stitched(history, callback=None):
        if path == "model":
            return custom(stitch(small, large, 0.4, history=history), noise, sigmas, latent, callback)
        node = ts.TStitchGuider.execute(small, large, positive, negative, positive, negative, 2.0, 2.0, 0.4, "steps",
                                        history)  # fmt: skip
        guider = node.result[0]
        return guider.sample(noise, latent, sampler, sigmas, seed=0, callback=callback, disable_pbar=True)

    at_switch = custom(small, noise, sigmas[:5], latent)
    two_runs = custom(large, torch.zeros_like(noise), sigmas[4:], at_switch)
    steps_seen = []
    restarted = stitched("restart", callback=lambda i, *_: steps_seen.append(i))
    assert steps_seen == list(range(10))  # the progress callback counts over the whole run
    assert torch.allclose(restarted, two_runs, rtol=1e-5, atol=1e-4), (restarted - two_runs).abs().max()
    carried = stitched("carry")
    assert (carried - two_runs).abs().max() > 100 * (restarted - two_runs).abs().max()


# ---------------------------------------------------------------- memory: the small model after the switch


def loaded_record(model):
    """ComfyUI's LoadedModel record holding `model`'s network (any clone of it), or None."""
    # Records of patchers already garbage-collected by earlier tests hold model None (LoadedModel keeps a weakref).
    loaded = [r for r in comfy.model_management.current_loaded_models if r.model is not None]
    records = [r for r in loaded if r.model.model is model.model]
    assert len(records) <= 1
    return records[0] if records else None


@pytest.mark.parametrize("release", ["always", "when_vram_short", "vram_short_at_switch"])
def test_the_small_model_is_released_from_model_management_after_the_switch(release):
    """10 euler steps, r = 0.4, in ComfyUI's own model management on CPU. Every model call logs whether the small
    network is loaded (in current_loaded_models) and still marked as used. always: loaded for its 4 steps only.
    when_vram_short with the large model fully loaded: stays loaded (nothing to gain), marked unused after the
    switch. vram_short_at_switch: the large model loses half its weights to the offload device during the last
    small step (as when VRAM runs short), so at the switch the small one is unloaded and the large reloaded fully."""
    large, small = tiny_models.build_tiny_model("sd15", seed=0), tiny_models.build_tiny_model("sd15", seed=5)
    log = []

    def probe(name):
        def wrapper(executor, x, t, *args, **kwargs):
            record = loaded_record(small)
            log.append((name, record is not None and record.currently_used, record is not None))
            if release == "vram_short_at_switch" and name == "small" and len(log) == 4:
                big = loaded_record(large).model
                big.partially_unload(big.offload_device, big.model_size() // 2)
                assert big.loaded_size() < big.model_size()
            return executor(x, t, *args, **kwargs)

        return wrapper

    probed = []
    for name, model in (("small", small), ("large", large)):
        clone = model.clone()
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "tests.memory", probe(name))
        probed.append(clone)
    mode = "always" if release == "always" else "when_vram_short"
    stitched = stitch(*probed, 0.4, release=mode)
    first = sample(stitched, sampler="euler")
    assert [n for n, *_ in log] == ["small"] * 4 + ["large"] * 6
    assert all(used and loaded for n, used, loaded in log if n == "small")
    large_calls = [(used, loaded) for n, used, loaded in log if n == "large"]
    if release == "when_vram_short":
        assert large_calls == [(False, True)] * 6
    else:
        assert large_calls == [(False, False)] * 6
    if release == "vram_short_at_switch":
        big = loaded_record(large).model
        assert big.loaded_size() == big.model_size()
    log.clear()
    assert torch.equal(sample(stitched, sampler="euler"), first)  # the next run loads the small model again
    assert torch.equal(first, sample(stitch(small, large, 0.4), sampler="euler"))


def test_a_chain_releases_each_model_after_its_segment():
    """Three different models, switches at 0.2 and 0.6 of 10 euler steps, release = always: during each model's
    calls exactly the models of its own and later segments are in ComfyUI's loaded list."""
    models = [tiny_models.build_tiny_model("sd15", seed=s) for s in (3, 4, 0)]
    log = []

    def probe(index):
        def wrapper(executor, x, t, *args, **kwargs):
            log.append((index, tuple(loaded_record(m) is not None for m in models)))
            return executor(x, t, *args, **kwargs)

        return wrapper

    probed = []
    for index, model in enumerate(models):
        clone = model.clone()
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "tests.memory", probe(index))
        probed.append(clone)
    chained = ts.TStitchChain.execute(probed[0], probed[1], 0.2, "steps", model_3=probed[2], switch_2=0.6,
                                      release_after_switch="always").result[0]  # fmt: skip
    sample(chained, sampler="euler")
    expected = {0: (True, True, True), 1: (False, True, True), 2: (False, False, True)}
    assert [i for i, _ in log] == [0] * 2 + [1] * 4 + [2] * 4
    assert all(loaded == expected[i] for i, loaded in log), log


def test_fkc_particles_run_through_a_stitched_model():
    """TL_FKCSampler reads the experts through a post-CFG hook of its own (CFG) or TL_FKCGuider's capture slot; on a
    stitched model the small model's calls must feed it too: small == large gives FKC on the plain model exactly."""
    fkc = pack("nodes.feynman_kac")
    base = tiny_models.build_tiny_model("sd15")
    positive = tiny_models.tiny_conditioning("sd15", 1)
    negative = tiny_models.tiny_conditioning("sd15", 2)
    latent = torch.zeros(tiny_models.latent_shape("sd15"))
    sigmas = comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "normal", 6)

    def run(model):
        sampler = fkc.FKCSampler.execute(3, "target", "every_step", 0.5, "all").result[0]
        return comfy.sample.sample_custom(model, comfy.sample.prepare_noise(latent, 0), 3.0, sampler, sigmas, positive,
                                          negative, latent, disable_pbar=True, seed=0)  # fmt: skip

    assert torch.equal(run(stitch(base, base, 0.5)), run(base))
    # TL_FKCGuider combines its experts in its own predict_noise: the small model's steps use it too.
    small = tiny_models.build_tiny_model("sd15", seed=5)
    positive_2 = tiny_models.tiny_conditioning("sd15", 3)

    def product(model, sampler):
        guider = fkc.FKCGuider.execute(model, positive, negative, 0.5, 2.0, positive_2).result[0]
        return guider.sample(comfy.sample.prepare_noise(latent, 0), latent, sampler, sigmas, seed=0, disable_pbar=True)

    particles = fkc.FKCSampler.execute(3, "target", "every_step", 0.5, "all").result[0]
    assert torch.equal(product(stitch(base, base, 0.5), particles), product(base, particles))
    euler = comfy.samplers.sampler_object("euler")
    assert torch.equal(product(stitch(small, base, 1.0), euler), product(small, euler))


def test_r_zero_is_large_only_and_r_one_small_only():
    large, small = tiny_models.build_tiny_model("sd15", seed=0), tiny_models.build_tiny_model("sd15", seed=5)
    assert torch.equal(sample(stitch(small, large, 0.0)), sample(large))
    assert torch.equal(sample(stitch(small, large, 1.0)), sample(small))
    mixed = sample(stitch(small, large, 0.5))
    assert not torch.equal(mixed, sample(large)) and not torch.equal(mixed, sample(small))


def test_sigma_switch_routes_by_the_large_models_noise_level():
    base = tiny_models.build_tiny_model("sd15")
    small, small_calls = count_calls(base, "sigma")
    large, large_calls = count_calls(base, "sigma")
    r = 0.3
    threshold = base.get_model_object("model_sampling").percent_to_sigma(r)
    sample(stitch(small, large, r, "sigma"), steps=12, scheduler="karras", sampler="heun")
    assert small_calls and large_calls
    assert all(s > threshold for s in small_calls) and all(s <= threshold for s in large_calls)


def test_chain_of_three_takes_cumulative_fractions():
    base = tiny_models.build_tiny_model("sd15")
    (m1, c1), (m2, c2), (m3, c3) = count_calls(base, "sigma"), count_calls(base, "sigma"), count_calls(base, "sigma")
    chained = ts.TStitchChain.execute(m1, m2, 0.2, "steps", model_3=m3, switch_2=0.7).result[0]
    assert torch.equal(sample(chained, steps=10), sample(base, steps=10))
    assert (len(c1), len(c2), len(c3)) == (2, 5, 3)


def test_each_model_keeps_its_own_patches():
    base = tiny_models.build_tiny_model("sd15")
    with_pag = pag.apply_perturbed_attention(base, 3.0, 0.0, "auto", 0.0, 1.0, 0.0, True)
    lora = base.clone()
    lora.add_patches(tiny_models.tiny_lora_patches("sd15", seed=0), 1.0)
    assert torch.equal(sample(stitch(with_pag, base, 1.0)), sample(with_pag))  # PAG on small: runs on small
    assert torch.equal(sample(stitch(with_pag, base, 0.0)), sample(base))  # ... and never on large
    assert torch.equal(sample(stitch(base, with_pag, 1.0)), sample(base))  # PAG on large never runs on small
    assert torch.equal(sample(stitch(lora, base, 1.0)), sample(lora))  # LoRA weights patched for the small model
    assert torch.equal(sample(stitch(base, lora, 0.0)), sample(lora))
    assert torch.equal(sample(base), sample(tiny_models.build_tiny_model("sd15")))  # and unpatched afterwards


# ---------------------------------------------------------------- accuracy on the exact GMM


def gmm_stitched_error(r, sampler="heun", steps=30, history="carry", n=4000):
    """large = the exact four-mode mixture (std 0.25), small = the same modes blurred to std 1; Karras steps, seed 0.
    Error = relative error of the mean squared distance to the nearest mode (exact: 2 * 0.25^2)."""
    exact = tiny_models.gmm_preset("four_modes")
    large = tiny_models.build_gmm_model("eps", "four_modes")
    small = tiny_models.build_gmm_model("eps", "four_modes_blurred")
    latent = torch.zeros(tiny_models.gmm_latent_shape("four_modes", n))
    cond = tiny_models.gmm_conditioning([0, 0, 0, 0])
    out = comfy.sample.sample(
        stitch(small, large, r, history=history), comfy.sample.prepare_noise(latent, 0), steps, 1.0, sampler,
        "karras", cond, cond, latent, seed=0, disable_pbar=True,
    ).reshape(n, 2)  # fmt: skip
    spread = ((out.double() - exact.means[exact.nearest_mode(out)]) ** 2).sum(1).mean().item()
    return abs(spread / (2 * 0.25**2) - 1)


def test_gmm_error_rises_with_r_and_matches_large_only_while_switching_at_high_noise():
    """Heun, 30 Karras steps, 4000 samples. Tolerance: within 0.02 of large-only while the switch sigma is >= 5
    (data scale ~3.5)."""
    large = tiny_models.build_gmm_model("eps", "four_modes")
    sigmas = comfy.samplers.calculate_sigmas(large.get_model_object("model_sampling"), "karras", 30)
    errors, switch_sigma = {}, {}
    for r in (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0):
        errors[r] = gmm_stitched_error(r)
        switch_sigma[r] = float(sigmas[int(r * 30 + 1e-9)])
    high_noise = [r for r in errors if switch_sigma[r] >= 5.0]
    assert len(high_noise) >= 3
    assert all(abs(errors[r] - errors[0.0]) < 0.02 for r in high_noise), errors
    later = [errors[r] for r in errors if switch_sigma[r] < 5.0]
    assert later == sorted(later) and later[-1] > 10 * errors[0.0], errors


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "lms"])
def test_gmm_carrying_the_history_is_more_accurate_than_restarting_it(sampler):
    """Why history = carry is the default: 20 steps, r = 0.4. Measured: dpmpp_2m 0.101 (carry) vs 0.170 (restart),
    lms 0.091 vs 0.201 (large-only 0.025 / 0.011)."""
    errors = {h: gmm_stitched_error(0.4, sampler, 20, h) for h in ("carry", "restart")}
    assert errors["carry"] < 0.7 * errors["restart"], errors


# ---------------------------------------------------------------- guider, graph, errors


def test_guider_uses_each_models_conditioning_and_cfg():
    base, small = tiny_models.build_tiny_model("sd15"), tiny_models.build_tiny_model("sd15", seed=5)
    pos_large, pos_small = tiny_models.tiny_conditioning("sd15", 1), tiny_models.tiny_conditioning("sd15", 7)
    neg = [[torch.zeros_like(pos_large[0][0]), {}]]
    latent = torch.zeros(tiny_models.latent_shape("sd15"))
    noise = comfy.sample.prepare_noise(latent, 0)
    sampler = comfy.samplers.sampler_object("euler")
    sigmas = comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "normal", 8)

    def run(guider):
        return guider.sample(noise, latent, sampler, sigmas, seed=0, disable_pbar=True)

    def plain(model, positive, cfg):
        g = comfy.samplers.CFGGuider(model)
        g.set_conds(positive, neg)
        g.set_cfg(cfg)
        return run(g)

    def stitched(r):
        g = ts.TStitchGuider.execute(small, base, pos_small, neg, pos_large, neg, 3.0, 5.0, r, "steps").result[0]
        return run(g)

    assert torch.equal(stitched(1.0), plain(small, pos_small, 3.0))
    assert torch.equal(stitched(0.0), plain(base, pos_large, 5.0))
    assert not torch.equal(stitched(0.5), plain(base, pos_large, 5.0))


def test_stitched_model_in_a_graph_with_ksampler(host):
    prompt = tiny_arch_nodes("sd15", "a_")
    prompt["small"] = {"class_type": "TLTest_TinyModel", "inputs": {"arch": "sd15", "seed": 5}}
    prompt["stitch"] = {
        "class_type": "TL_TStitchModel",
        "inputs": {
            "small_model": ["small", 0],
            "large_model": ["a_model", 0],
            "small_fraction": 0.4,
            "switch_by": "steps",
        },
    }
    prompt["a_sample"]["inputs"]["model"] = ["stitch", 0]  # fmt: skip
    first, second = host.run(prompt), host.run(prompt)
    assert torch.equal(first["a_sample"][0]["samples"], second["a_sample"][0]["samples"])


def test_clear_errors():
    sd15, sdxl, sd3 = (tiny_models.build_tiny_model(a) for a in ("sd15", "sdxl", "sd3"))
    with pytest.raises(ValueError, match="small_model: latent format SD3 .16 channels. differs"):
        ts.TStitchModel.execute(sd3, sd15, 0.4, "steps")
    with pytest.raises(ValueError, match="small_model: latent format SD15 .* large_model's SDXL"):
        ts.TStitchModel.execute(sd15, sdxl, 0.4, "steps")
    eps, flow = tiny_models.build_gmm_model("eps"), tiny_models.build_gmm_model("flow")
    with pytest.raises(ValueError, match="small_model: a flow .CONST. model cannot be stitched"):
        ts.TStitchModel.execute(flow, eps, 0.4, "steps")
    with pytest.raises(ValueError, match="model_4 is connected but model_3 is not"):
        ts.TStitchChain.execute(sd15, sd15, 0.2, "steps", model_4=sd15)
    with pytest.raises(ValueError, match="must not decrease"):
        ts.TStitchChain.execute(sd15, sd15, 0.6, "steps", model_3=sd15, switch_2=0.3)
    with pytest.raises(ValueError, match="history: 'fresh' is not one of"):
        ts.TStitchModel.execute(sd15, sd15, 0.4, "steps", "fresh")
    turbo = pack("nodes.flowturbo").FlowTurboSampler.execute(1, 0).result[0]
    sigmas = comfy.samplers.calculate_sigmas(sd15.get_model_object("model_sampling"), "normal", 6)
    positive = tiny_models.tiny_conditioning("sd15", 1)
    latent = torch.zeros(tiny_models.latent_shape("sd15"))
    with pytest.raises(ValueError, match=r"history: restart works with ComfyUI's built-in samplers, but this sampler "
                                         r"\(flowturbo_sampler_fn\) runs its own loop"):  # fmt: skip
        comfy.sample.sample_custom(stitch(sd15, sd15, 0.5, history="restart"), latent, 1.0, turbo, sigmas, positive,
                                   positive, latent, disable_pbar=True)  # fmt: skip
