"""T-Stitch in the real host: exact routing on tiny real models, and accuracy on the exact GMM."""

import comfy.model_management
import comfy.model_patcher
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
    "sampler",
    ["heun", "dpmpp_2m", "dpmpp_2s_ancestral", "uni_pc", "lcm", "euler_ancestral", "dpmpp_2m_cfg_pp",
     "dpmpp_2m_sde", "dpmpp_3m_sde", "deis", "ipndm", "res_multistep"],
)  # fmt: skip
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


# ---------------------------------------------------------------- what each model of a run is given


def chain(*models, switches=(0.2, 0.6, 0.9), **options):
    named = {f"model_{k}": m for k, m in enumerate(models[2:], 3)}
    extra = {f"switch_{k}": switches[k - 1] for k in range(2, len(models))}
    return ts.TStitchChain.execute(models[0], models[1], switches[0], "steps", **named, **extra, **options).result[0]


def zero_negative(positive):
    return [[torch.zeros_like(positive[0][0]), {k: torch.zeros_like(v) for k, v in positive[0][1].items()}]]


@pytest.mark.parametrize("path", ["model", "guider", "chain"])
def test_every_model_gets_the_runs_seed_and_latent_shapes(path, monkeypatch):
    """ComfyUI passes the seed to outer_sample by position; every model's conditioning must be encoded with it (unCLIP,
    x4 upscaler and others draw noise augmentation from it in extra_conds) and with the run's latent_shapes."""
    models = [tiny_models.build_tiny_model("sd15", seed=s) for s in (3, 5, 0)]
    seen = []
    for index, model in enumerate(models):

        def recording(index=index, encode=model.model.extra_conds, **kwargs):
            seen.append((index, kwargs["prompt_type"], kwargs.get("seed"), kwargs.get("latent_shapes")))
            return encode(**kwargs)

        monkeypatch.setattr(model.model, "extra_conds", recording)
    positive = tiny_models.tiny_conditioning("sd15", 1)
    negative = zero_negative(positive)
    latent = torch.zeros(tiny_models.latent_shape("sd15"))
    noise = comfy.sample.prepare_noise(latent, 0)
    if path == "guider":
        node = ts.TStitchGuider.execute(models[1], models[2], positive, negative, positive, negative, 2.0, 2.0, 0.5,
                                        "steps")  # fmt: skip
        sigmas = comfy.samplers.calculate_sigmas(models[2].get_model_object("model_sampling"), "normal", 4)
        sampler = comfy.samplers.sampler_object("euler")
        node.result[0].sample(noise, latent, sampler, sigmas, seed=1234, disable_pbar=True)
        expected_models = {1, 2}
    else:
        stitched = stitch(models[1], models[2], 0.5) if path == "model" else chain(*models)
        comfy.sample.sample(stitched, noise, 4, 2.0, "euler", "normal", positive, negative, latent, seed=1234,
                            disable_pbar=True)  # fmt: skip
        expected_models = {1, 2} if path == "model" else {0, 1, 2}
    assert {(index, kind) for index, kind, *_ in seen} == {(i, k) for i in expected_models for k in PROMPT_TYPES}
    assert all(seed == 1234 for *_, seed, _ in seen), seen
    assert all(shapes == [latent.shape] for *_, shapes in seen), seen


PROMPT_TYPES = ("positive", "negative")
REFINER_CONTEXT = 48  # the tiny SDXL's is 64 (like the real refiner's 1280 against SDXL's 2048)
# ComfyUI's SDXLRefiner.encode_adm: the pooled text plus five 256-wide embeddings (height, width, crop_h, crop_w,
# aesthetic score).
REFINER_ADM = tiny_models.POOLED_DIM + 5 * 256


@pytest.fixture(scope="module")
def refiner_base():
    """A tiny SDXL refiner (ComfyUI's own SDXLRefiner model class): SDXL's latent space, its own text widths."""
    import comfy.supported_models

    unet = {**tiny_models.TINY_UNET_CONFIGS["sdxl"], "context_dim": REFINER_CONTEXT, "adm_in_channels": REFINER_ADM}
    config = comfy.supported_models.SDXLRefiner(unet)
    config.unet_config.update(unet)  # undo the full-size refiner settings, as tiny_models does for its configs
    config.set_inference_dtype(torch.float32, None)
    with torch.inference_mode(False), torch.no_grad():
        model = config.get_model({})
        tiny_models.fill_seeded_(model.diffusion_model, 0)
    yield comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                           offload_device=comfy.model_management.unet_offload_device())  # fmt: skip


def refiner_conditioning(seed, pooled=tiny_models.POOLED_DIM):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tiny_models.TOKENS, REFINER_CONTEXT, generator=gen),
             {"pooled_output": torch.randn(1, pooled, generator=gen)}]]  # fmt: skip


def test_conditioning_that_does_not_fit_a_model_is_named_before_any_model_runs(refiner_base):
    """SDXL -> refiner with SDXL's conditioning fails in ComfyUI with a bare shape error inside the refiner's UNet;
    the stitched run names the model and the widths before any model call. With the refiner's own conditioning the
    chain (the issue's SDXL -> refiner) runs."""
    sdxl, sdxl_calls = count_calls(tiny_models.build_tiny_model("sdxl"), "sigma")
    refiner, refiner_calls = count_calls(refiner_base, "sigma")
    sdxl_text = "cross-attention \\(text\\) width 64, but this model takes 48 \\(context_dim\\)"
    with pytest.raises(ValueError, match=f"model_2: its positive conditioning has {sdxl_text}"):
        sample(chain(sdxl, refiner), "sdxl")
    with pytest.raises(ValueError, match=f"small_model: its positive conditioning has {sdxl_text}"):
        sample(stitch(refiner, sdxl, 0.5), "sdxl")
    with pytest.raises(ValueError, match=f"large_model: its positive conditioning has {sdxl_text}"):
        sample(stitch(sdxl, refiner, 0.5), "sdxl")
    # A pooled output of the wrong width: the refiner's adm comes out 16 + 5 * 256 wide.
    narrow = refiner_conditioning(2, pooled=16)
    adm_text = f"adm \\(pooled\\) width {16 + 5 * 256}, but this model takes {REFINER_ADM} \\(adm_in_channels\\)"
    with pytest.raises(ValueError, match=f"model_2: its positive conditioning has {adm_text}"):
        sample(chain(sdxl, refiner, positive_2=narrow, negative_2=zero_negative(narrow), cfg_2=2.0), "sdxl")
    # The guider's small SDXL given a narrow pooled output: SDXL's adm adds six 256-wide size embeddings.
    sdxl_cond = tiny_models.tiny_conditioning("sdxl", 1)
    sdxl_narrow = [[sdxl_cond[0][0], {"pooled_output": torch.ones(1, 16)}]]
    guider = ts.TStitchGuider.execute(sdxl, sdxl, sdxl_narrow, zero_negative(sdxl_narrow), sdxl_cond,
                                      zero_negative(sdxl_cond), 2.0, 2.0, 0.5, "steps").result[0]  # fmt: skip
    latent = torch.zeros(tiny_models.latent_shape("sdxl"))
    sigmas = comfy.samplers.calculate_sigmas(sdxl.get_model_object("model_sampling"), "normal", 4)
    sdxl_adm = tiny_models.POOLED_DIM + 6 * 256
    with pytest.raises(
        ValueError,
        match=f"small_model: its positive conditioning has adm \\(pooled\\) width "
        f"{16 + 6 * 256}, but this model takes {sdxl_adm} \\(adm_in_channels\\)",
    ):
        guider.sample(latent, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=0, disable_pbar=True)
    assert sdxl_calls == [] and refiner_calls == []
    own = refiner_conditioning(3)
    sample(chain(sdxl, refiner, positive_2=own, negative_2=zero_negative(own), cfg_2=2.0), "sdxl")
    assert (len(sdxl_calls), len(refiner_calls)) == (2, 8)  # switch_1 = 0.2 of 10 steps


def test_each_model_of_a_chain_gets_its_own_conditioning():
    """Three models, 10 euler steps, switches 0.2 / 0.6: model_1 and model_3 have their own conditioning, model_2
    takes the sampler's. Every model call's cross-attention rows are exactly its own positive and negative."""
    models = [tiny_models.build_tiny_model("sd15", seed=s) for s in (3, 4, 0)]
    seen: dict[int, list] = {0: [], 1: [], 2: []}
    probed = []
    for index, model in enumerate(models):

        def wrapper(executor, x, t, c_concat, c_crossattn, *args, index=index, **kwargs):
            seen[index].append(c_crossattn)
            return executor(x, t, c_concat, c_crossattn, *args, **kwargs)

        clone = model.clone()
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "tests.conditioning", wrapper)
        probed.append(clone)
    positive = {k: tiny_models.tiny_conditioning("sd15", seed) for k, seed in ((1, 7), (2, 1), (3, 9))}
    negative = {1: tiny_models.tiny_conditioning("sd15", 8), 2: zero_negative(positive[2]),
                3: tiny_models.tiny_conditioning("sd15", 10)}  # fmt: skip
    own = {f"{kind}_{k}": cond[k] for kind, cond in (("positive", positive), ("negative", negative)) for k in (1, 3)}
    stitched = chain(*probed, switches=(0.2, 0.6), **own, cfg_1=3.0, cfg_3=4.0)
    sample(stitched, positive=positive[2])  # the sample helper's negative is the zeroed positive: negative[2]
    assert [len(calls) for calls in seen.values()] == [2, 4, 4]
    for index, calls in seen.items():
        expected = [positive[index + 1][0][0][0], negative[index + 1][0][0][0]]
        for rows in calls:
            assert sorted(any(torch.equal(row, e) for row in rows) for e in expected) == [True, True]
            assert all(any(torch.equal(row, e) for e in expected) for row in rows)


def test_a_chain_with_its_own_conditioning_per_model_is_the_guider():
    """Two models: TL_TStitchChain with positive/negative/cfg per model (the sampler's conditioning and cfg then
    unused) and with them on model_1 only (model_2 takes the sampler's) both equal TL_TStitchGuider exactly."""
    large, small = tiny_models.build_tiny_model("sd15", seed=0), tiny_models.build_tiny_model("sd15", seed=5)
    pos_small, neg_small = tiny_models.tiny_conditioning("sd15", 7), tiny_models.tiny_conditioning("sd15", 8)
    pos_large, neg_large = tiny_models.tiny_conditioning("sd15", 1), tiny_models.tiny_conditioning("sd15", 2)
    unused = tiny_models.tiny_conditioning("sd15", 11)
    latent = torch.zeros(tiny_models.latent_shape("sd15"))
    noise = comfy.sample.prepare_noise(latent, 0)
    sampler = comfy.samplers.sampler_object("dpmpp_2m")
    sigmas = comfy.samplers.calculate_sigmas(large.get_model_object("model_sampling"), "karras", 8)

    def run(guider):
        return guider.sample(noise, latent, sampler, sigmas, seed=0, disable_pbar=True)

    def sampled(model, positive, negative, cfg):
        guider = comfy.samplers.CFGGuider(model)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return run(guider)

    node = ts.TStitchGuider.execute(small, large, pos_small, neg_small, pos_large, neg_large, 3.0, 5.0, 0.5, "steps")
    reference = run(node.result[0])
    first = {"positive_1": pos_small, "negative_1": neg_small, "cfg_1": 3.0}
    both = chain(small, large, switches=(0.5,), **first, positive_2=pos_large, negative_2=neg_large, cfg_2=5.0)
    assert torch.equal(sampled(both, unused, unused, 9.0), reference)
    assert torch.equal(sampled(chain(small, large, switches=(0.5,), **first), pos_large, neg_large, 5.0), reference)
    assert not torch.equal(sampled(large, pos_large, neg_large, 5.0), reference)


def test_chain_conditioning_errors():
    sd15 = tiny_models.build_tiny_model("sd15")
    cond = tiny_models.tiny_conditioning("sd15", 1)
    with pytest.raises(ValueError, match="model_2: positive_2 is connected but negative_2 is not"):
        chain(sd15, sd15, positive_2=cond)
    with pytest.raises(ValueError, match="model_1: negative_1 is connected but positive_1 is not"):
        chain(sd15, sd15, negative_1=cond)
    with pytest.raises(ValueError, match="positive_3/negative_3 are connected but model_3 is not"):
        chain(sd15, sd15, positive_3=cond, negative_3=cond)


def test_chain_with_its_own_conditioning_in_a_graph(host):
    """Through ComfyUI's executor: the optional per-model inputs reach the node; a second run is identical."""
    prompt = tiny_arch_nodes("sd15", "a_")
    prompt["small"] = {"class_type": "TLTest_TinyModel", "inputs": {"arch": "sd15", "seed": 5}}
    prompt["small_pos"] = {"class_type": "TLTest_TinyConditioning", "inputs": {"arch": "sd15", "seed": 7, "batch": 1}}
    prompt["chain"] = {
        "class_type": "TL_TStitchChain",
        "inputs": {"model_1": ["small", 0], "model_2": ["a_model", 0], "switch_1": 0.5, "switch_2": 0.8,
                   "switch_3": 0.9, "switch_by": "steps", "positive_1": ["small_pos", 0],
                   "negative_1": ["a_neg", 0], "cfg_1": 3.0},
    }  # fmt: skip
    prompt["a_sample"]["inputs"]["model"] = ["chain", 0]
    first, second = host.run(prompt), host.run(prompt)
    assert torch.equal(first["a_sample"][0]["samples"], second["a_sample"][0]["samples"])
    positive = tiny_models.tiny_conditioning("sd15", 1)
    own = {"positive_1": tiny_models.tiny_conditioning("sd15", 7), "negative_1": zero_negative(positive), "cfg_1": 3.0}
    direct = chain(tiny_models.build_tiny_model("sd15", seed=5), tiny_models.build_tiny_model("sd15"),
                   switches=(0.5,), **own)  # fmt: skip
    expected = comfy.sample.sample(direct, comfy.sample.prepare_noise(torch.zeros(1, 4, 8, 8), 0), 3, 2.0, "euler",
                                   "normal", positive, zero_negative(positive), torch.zeros(1, 4, 8, 8), seed=0,
                                   disable_pbar=True)  # fmt: skip
    assert torch.equal(first["a_sample"][0]["samples"], expected)


# ---------------------------------------------------------------- schedules


@pytest.mark.parametrize("network", ["separate", "shared"])
def test_flow_models_with_different_shifts_stitch_and_each_maps_sigma_to_its_own_timestep(network):
    """Flow experts with their own shift (Wan 2.2's high/low-noise pair): the same sigma is the same noise level, so
    they stitch; each model turns sigma into its own timestep. small: AuraFlow-style shift 2 (timestep = sigma),
    large: SD3-style shift 3 (timestep = 1000 sigma). 10 euler steps, r = 0.4, cfg 1 (one call per step). shared:
    one network under both shifts, where each stage's model_sampling must be put back in place for its calls."""
    from comfy_extras.nodes_model_advanced import ModelSamplingAuraFlow, ModelSamplingSD3

    small_preset = "four_modes_blurred" if network == "separate" else "four_modes"
    small = ModelSamplingAuraFlow().patch_aura(tiny_models.build_gmm_model("flow", small_preset), 2.0)[0]
    large = ModelSamplingSD3().patch(tiny_models.build_gmm_model("flow", "four_modes"), 3.0)[0]
    seen: dict[str, list] = {"small": [], "large": []}

    def probe(name):
        def wrapper(executor, x, timesteps, *args, **kwargs):
            sigma = args[1][tiny_models.SIGMA_KEY]  # (context, transformer_options, ...): the exact sigma
            seen[name].append((float(sigma.flatten()[0]), float(timesteps.flatten()[0])))
            return executor(x, timesteps, *args, **kwargs)

        return wrapper

    probed = {}
    for name, model in (("small", small), ("large", large)):
        probed[name] = model.clone()
        probed[name].add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "tests.t", probe(name))
    cond = tiny_models.gmm_conditioning([0, 0, 0, 0])
    latent = torch.zeros(tiny_models.gmm_latent_shape("four_modes", 4))
    comfy.sample.sample(stitch(probed["small"], probed["large"], 0.4), comfy.sample.prepare_noise(latent, 0), 10, 1.0,
                        "euler", "simple", cond, cond, latent, seed=0, disable_pbar=True)  # fmt: skip
    assert (len(seen["small"]), len(seen["large"])) == (4, 6)
    assert all(t == pytest.approx(s, rel=1e-6) for s, t in seen["small"]), seen["small"]
    assert all(t == pytest.approx(1000 * s, rel=1e-6) for s, t in seen["large"]), seen["large"]
    assert seen["small"][0][0] == pytest.approx(1.0) and seen["small"][-1][0] > seen["large"][0][0]


def test_eps_models_with_different_sigma_ranges_are_refused():
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    sd15 = tiny_models.build_tiny_model("sd15")
    zsnr = ModelSamplingDiscrete().patch(tiny_models.build_tiny_model("sd15"), "eps", True)[0]
    lo, hi = (float(zsnr.get_model_object("model_sampling").sigma_min),
              float(zsnr.get_model_object("model_sampling").sigma_max))  # fmt: skip
    ref = sd15.get_model_object("model_sampling")
    assert hi > 100 * float(ref.sigma_max)  # zero terminal SNR: the top sigma is huge
    pattern = (
        f"small_model: sigma range \\[{lo:.4g}, {hi:.4g}\\] differs from large_model's "
        f"\\[{float(ref.sigma_min):.4g}, {float(ref.sigma_max):.4g}\\]; the schedules do not align"
    )
    with pytest.raises(ValueError, match=pattern):
        ts.TStitchModel.execute(zsnr, sd15, 0.4, "steps")


# ---------------------------------------------------------------- ControlNets and hooks on a model's own conditioning


def controlled(positive, negative, control_net, strength=1.0, end=1.0):
    """positive/negative through ComfyUI's ControlNetApplyAdvanced with the tiny ControlNet and hint."""
    import nodes

    hint = tiny_models.tiny_hint_image(0)
    return nodes.ControlNetApplyAdvanced().apply_controlnet(positive, negative, control_net, hint, strength, 0.0, end)


def lora_hook(seed=0):
    """A HookGroup with one LoRA weight hook (the tiny LoRA), as ComfyUI's CreateHookModelAsLora builds one."""
    import comfy.hooks

    hook = comfy.hooks.WeightHook()
    hook.weights, hook.need_weight_init = tiny_models.tiny_lora_patches("sd15", seed), False
    group = comfy.hooks.HookGroup()
    group.add(hook)
    return group


def with_lora(model, seed=0):
    patched = model.clone()
    patched.add_patches(tiny_models.tiny_lora_patches("sd15", seed), 1.0)
    return patched


def guided(guider, steps=6):
    latent = torch.zeros(tiny_models.latent_shape("sd15"))
    sigmas = comfy.samplers.calculate_sigmas(guider.model_patcher.get_model_object("model_sampling"), "normal", steps)
    return guider.sample(comfy.sample.prepare_noise(latent, 0), latent, comfy.samplers.sampler_object("euler"), sigmas,
                         seed=0, disable_pbar=True)  # fmt: skip


def plain_guider(model, positive, negative, cfg=2.0):
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    return guider


def stitch_guider(small, large, small_conds, large_conds, r, switch_by="steps"):
    return ts.TStitchGuider.execute(small, large, *small_conds, *large_conds, 2.0, 2.0, r, switch_by).result[0]


def test_a_controlnet_on_an_earlier_models_conditioning_is_loaded_applied_and_cleaned_up():
    """A ControlNet only on the small model's own conditioning: its control model is in ComfyUI's loaded list during
    every small call (as for the sampler's own ControlNet; unloaded it would run off the GPU), its per-run state is
    cleaned up after, and it acts on exactly the small model's steps."""
    base = tiny_models.build_tiny_model("sd15")
    positive = tiny_models.tiny_conditioning("sd15", 1)
    negative = zero_negative(positive)
    control_net = tiny_models.build_tiny_controlnet.__wrapped__(3)  # a control model nothing has loaded yet
    cn_conds = controlled(positive, negative, control_net)
    loaded = []

    def probe(executor, *args, **kwargs):
        loaded.append(ts.loaded_entry(control_net.control_model_wrapped) is not None)
        return executor(*args, **kwargs)

    small = base.clone()
    small.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "tests.cn", probe)
    all_small = guided(stitch_guider(small, base, cn_conds, (positive, negative), 1.0))
    assert loaded == [True] * 6
    control = cn_conds[0][0][1]["control"]
    assert control.cond_hint is None and control.timestep_range is None  # ControlBase.cleanup ran
    assert torch.equal(all_small, guided(plain_guider(base, *cn_conds)))
    chained = chain(base, base, switches=(1.0,), positive_1=cn_conds[0], negative_1=cn_conds[1], cfg_1=2.0)
    assert torch.equal(guided(plain_guider(chained, positive, negative)), all_small)
    # Switching by sigma at r: the small model runs exactly where a ControlNet ending at r is active.
    ending = controlled(positive, negative, control_net, end=0.5)
    half = guided(stitch_guider(base, base, cn_conds, (positive, negative), 0.5, "sigma"))
    assert torch.equal(half, guided(plain_guider(base, *ending)))
    no_control = guided(stitch_guider(base, base, (positive, negative), (positive, negative), 0.5, "sigma"))
    assert not torch.equal(half, no_control)
    zero = controlled(positive, negative, control_net, strength=0.0)
    assert torch.equal(guided(stitch_guider(base, base, zero, (positive, negative), 0.5, "sigma")), no_control)
    # release = always: the small model's control model goes with it at the switch.
    loaded.clear()
    large = base.clone()
    large.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "tests.cn", probe)
    node = ts.TStitchGuider.execute(small, large, *cn_conds, positive, negative, 2.0, 2.0, 0.5, "sigma", "carry",
                                    "always")  # fmt: skip
    assert torch.equal(guided(node.result[0]), half)
    assert loaded == [True] * 3 + [False] * 3


def test_a_controlnet_on_the_last_models_own_conditioning_is_plain_sampling_with_it():
    base = tiny_models.build_tiny_model("sd15")
    positive = tiny_models.tiny_conditioning("sd15", 1)
    cn_conds = controlled(positive, zero_negative(positive), tiny_models.build_tiny_controlnet(0))
    unused = tiny_models.tiny_conditioning("sd15", 11)
    chained = chain(base, base, switches=(0.0,), positive_2=cn_conds[0], negative_2=cn_conds[1], cfg_2=2.0)
    expected = guided(plain_guider(base, *cn_conds))
    assert torch.equal(guided(plain_guider(chained, unused, unused, 9.0)), expected)
    assert torch.equal(guided(stitch_guider(base, base, cn_conds, cn_conds, 0.5)), expected)


def test_a_lora_hook_on_an_earlier_models_conditioning_acts_on_its_steps_only():
    """A LoRA hook on the small model's own conditioning is the LoRA on the small model, whether the two models share
    one network (where the hook's weights must come off before the large model's steps) or not."""
    import comfy.hooks

    base, other = tiny_models.build_tiny_model("sd15"), tiny_models.build_tiny_model("sd15", seed=5)
    positive = tiny_models.tiny_conditioning("sd15", 1)
    negative = zero_negative(positive)
    hooked = tuple(comfy.hooks.set_hooks_for_conditioning(c, lora_hook()) for c in (positive, negative))
    plain = guided(plain_guider(base, positive, negative))
    hook_run = guided(plain_guider(base, *hooked))  # ComfyUI's own hook path, on one model
    assert (hook_run - plain).abs().max() > 10  # the LoRA acts
    assert torch.equal(guided(stitch_guider(base, base, hooked, (positive, negative), 1.0)), hook_run)
    assert torch.equal(guided(plain_guider(stitch(base, base, 0.5), *hooked)), hook_run)  # the sampler's hooks
    for small in (base, other):
        # A hook patches the weights as add_patches does, up to float rounding.
        expected = guided(plain_guider(stitch(with_lora(small), base, 0.5), positive, negative))
        stitched = guided(stitch_guider(small, base, hooked, (positive, negative), 0.5))
        assert torch.allclose(stitched, expected, rtol=0, atol=1e-3), (stitched - expected).abs().max()
        chained = chain(small, base, switches=(0.5,), positive_1=hooked[0], negative_1=hooked[1], cfg_1=2.0)
        assert torch.equal(guided(plain_guider(chained, positive, negative)), stitched)
    assert torch.equal(guided(plain_guider(base, positive, negative)), plain)  # no hook weights left on the network


def test_hooks_on_the_last_models_own_conditioning_are_refused():
    """ComfyUI registers conditioning hooks from the sampler's conditioning before any wrapper runs, so hooks on the
    last model's own positive_k/negative_k would be silently dropped: refused, with the way out."""
    import comfy.hooks

    base = tiny_models.build_tiny_model("sd15")
    positive = tiny_models.tiny_conditioning("sd15", 1)
    hooked = comfy.hooks.set_hooks_for_conditioning(positive, lora_hook())
    with pytest.raises(ValueError, match="model_2: its own conditioning carries hooks .* connect it to the sampler's"):
        chain(base, base, positive_2=hooked, negative_2=zero_negative(positive))
    with pytest.raises(ValueError, match="model_3: its own conditioning carries hooks"):
        chain(base, base, base, switches=(0.2, 0.6), positive_3=positive, negative_3=hooked)
    chain(base, base, positive_1=hooked, negative_1=zero_negative(positive))  # an earlier model's: supported
