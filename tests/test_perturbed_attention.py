"""TL_PerturbedAttention in the real host, on tiny real UNets and DiTs, against independent references."""

import math

import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import pytest
import tiny_models
import torch
from comfy_host import PromptError
from harness import pack
from probes import count_calls
from workflows import TINY_ARCHS, tiny_arch_nodes

pag = pack("nodes.perturbed_attention")
core = pack("guidance.perturbed_attention")

# ---------------------------------------------------------------- pure helpers


def test_layer_specs_parse():
    U = core.UNetLayer
    assert core.parse_unet_layers("m0") == [U("middle", 0)]
    assert core.parse_unet_layers("u0.4, d2.2-4") == [U("output", 0, (4,)), U("input", 2, (2, 3, 4))]
    assert core.parse_unet_layers("d1-2") == [U("input", 1), U("input", 2)]
    D = core.DiTLayer
    assert core.parse_dit_layers("double1 single0-1 block3") == [
        D("double_block", 1), D("single_block", 0), D("single_block", 1), D("double_block", 3)
    ]  # fmt: skip
    for bad in ("x3", "m", "u0.", "d3-1"):
        with pytest.raises(ValueError, match="layers"):
            core.parse_unet_layers(bad)
    with pytest.raises(ValueError, match="double<i>"):
        core.parse_dit_layers("m0")


def masked_identity_reference(q, k, v, text_tokens):
    """Full attention with an additive mask: image-to-image block -inf except its diagonal (diffusers' joint PAG)."""
    n = q.shape[2]
    mask = torch.zeros(n, n, dtype=q.dtype)
    img = torch.full((n - text_tokens, n - text_tokens), float("-inf"), dtype=q.dtype).fill_diagonal_(0.0)
    mask[text_tokens:, text_tokens:] = img
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


@pytest.mark.parametrize("text_tokens", [0, 1, 5])
def test_identity_attention_matches_the_masked_reference(text_tokens):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 8, generator=g, dtype=torch.float64) for _ in range(3))
    got = core.identity_attention(q, k, v, text_tokens)
    torch.testing.assert_close(got, masked_identity_reference(q, k, v, text_tokens), rtol=1e-10, atol=1e-10)


def test_adaptive_scale_and_rescale():
    assert core.adaptive_scale(3.0, 0.0, 10.0) == 3.0
    assert core.adaptive_scale(3.0, 0.01, 900.0) == pytest.approx(2.0)
    assert core.adaptive_scale(3.0, 0.01, 100.0) == 0.0
    g = torch.Generator().manual_seed(1)
    guided, ref = torch.randn(2, 4, 8, 8, generator=g) * 3, torch.randn(2, 4, 8, 8, generator=g)
    full = core.guidance_rescale(guided, ref, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), ref.std(dim=(1, 2, 3)))
    torch.testing.assert_close(core.guidance_rescale(guided, ref, 0.5), 0.5 * full + 0.5 * guided)


# ---------------------------------------------------------------- sampling helpers


def zero_conditioning(cond):
    return [[torch.zeros_like(c), {k: torch.zeros_like(v) for k, v in extra.items()}] for c, extra in cond]


def sample(model, arch, steps=4, cfg=2.0, seed=0, batch=1, positive=None, negative=None, sampler="euler"):
    latent = torch.zeros(tiny_models.latent_shape(arch, batch))
    positive = positive or tiny_models.tiny_conditioning(arch, 1, 1)
    negative = negative or zero_conditioning(positive)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(
        model, noise, steps, cfg, sampler, "normal", positive, negative, latent, seed=seed, disable_pbar=True
    )


def with_pag(model, scale=3.0, adaptive=0.0, layers="auto", start=0.0, end=1.0, rescale=0.0, batched=True):
    return pag.apply_perturbed_attention(model, scale, adaptive, layers, start, end, rescale, batched)


def rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


# ---------------------------------------------------------------- behaviour on every architecture


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_scale_zero_is_bit_identical_and_scale_changes_output(arch):
    model = tiny_models.build_tiny_model(arch)
    plain = sample(model, arch)
    assert torch.equal(sample(with_pag(model, scale=0.0), arch), plain)
    assert rel_err(sample(with_pag(model), arch), plain) > 1e-3


@pytest.mark.parametrize("arch,layers", [(a, "auto") for a in TINY_ARCHS] + [("flux", "single0, double0"),
                                                                          ("sdxl", "d3.1, u0")])  # fmt: skip
def test_batched_equals_unbatched_with_one_call_per_step(arch, layers):
    model = tiny_models.build_tiny_model(arch)
    batched, batched_calls = count_calls(with_pag(model, layers=layers, batched=True))
    separate, separate_calls = count_calls(with_pag(model, layers=layers, batched=False))
    a, b = sample(batched, arch, batch=2), sample(separate, arch, batch=2)
    assert rel_err(a, b) < 1e-5  # float tolerance: only the batch composition differs
    assert batched_calls == [6] * 4  # one call per step: [cond, uncond, perturbed] x batch 2
    assert separate_calls == [4, 2] * 4


def test_sd15_matches_a_hand_computed_reference_at_one_step():
    """One Euler step to sigma 0 returns D itself: check D = D_cfg + s (D_cond - D_pert), with D_pert from an
    independent hook (a plain attn1 replace on the middle block returning V) and no PAG code involved."""
    arch, cfg, s = "sd15", 2.5, 3.0
    model = tiny_models.build_tiny_model(arch)
    positive = tiny_models.tiny_conditioning(arch, 1)
    negative = tiny_models.tiny_conditioning(arch, 2)
    hooked = model.clone()
    hooked.set_model_attn1_replace(lambda q, k, v, extra: v, "middle", 0)
    d_cond = sample(model, arch, steps=1, cfg=1.0, positive=positive, negative=negative)
    d_uncond = sample(model, arch, steps=1, cfg=1.0, positive=negative, negative=negative)
    d_pert = sample(hooked, arch, steps=1, cfg=1.0, positive=positive, negative=negative)
    expected = d_uncond + cfg * (d_cond - d_uncond) + s * (d_cond - d_pert)
    got = sample(with_pag(model, scale=s), arch, steps=1, cfg=cfg, positive=positive, negative=negative)
    assert rel_err(got, expected) < 1e-5
    # cfg = 1: no unconditional pass at all, D = D_cond + s (D_cond - D_pert).
    m1, calls = count_calls(with_pag(model, scale=s))
    got1 = sample(m1, arch, steps=1, cfg=1.0, positive=positive, negative=negative)
    assert calls == [2] and rel_err(got1, d_cond + s * (d_cond - d_pert)) < 1e-5


def test_flux_matches_a_hand_computed_joint_reference_at_one_step():
    """Flux double block 1 (the 'auto' layer) perturbed by an independent hook: masked SDPA for the rows of the
    whole batch, selected through the block_type/block_index that Flux itself writes into transformer_options."""
    arch, s = "flux", 2.0
    model = tiny_models.build_tiny_model(arch)
    positive = tiny_models.tiny_conditioning(arch, 1)
    text_tokens = positive[0][0].shape[1]

    def override(func, q, k, v, heads, **kwargs):
        opts = kwargs["transformer_options"]
        if opts.get("block_type") == "double" and opts.get("block_index") == 1:
            out = masked_identity_reference(q, k, v, text_tokens)  # q, k, v arrive as [B, H, L, D]
            return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        return func(q, k, v, heads, **kwargs)

    hooked = model.clone()
    hooked.model_options["transformer_options"] = {**hooked.model_options["transformer_options"],
                                                   "optimized_attention_override": override}  # fmt: skip
    d_cond = sample(model, arch, steps=1, cfg=1.0, positive=positive)
    d_pert = sample(hooked, arch, steps=1, cfg=1.0, positive=positive)
    got = sample(with_pag(model, scale=s), arch, steps=1, cfg=1.0, positive=positive)
    assert rel_err(got, d_cond + s * (d_cond - d_pert)) < 1e-5


def test_window_runs_the_perturbed_pass_exactly_inside_it():
    arch, steps, start, end = "sd15", 10, 0.3, 0.6
    model = tiny_models.build_tiny_model(arch)
    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", steps)[:-1].tolist()
    inside = [ms.percent_to_sigma(end) <= sg <= ms.percent_to_sigma(start) for sg in sigmas]
    assert 0 < sum(inside) < steps
    m, calls = count_calls(with_pag(model, start=start, end=end))
    sample(m, arch, steps=steps)
    assert calls == [3 if i else 2 for i in inside]
    m, calls = count_calls(with_pag(model, start=start, end=end, batched=False))
    sample(m, arch, steps=steps)
    assert calls == [c for i in inside for c in ([2, 1] if i else [2])]
    # A window between two steps' sigmas holds no step: the result is plain CFG exactly.
    gap = [p / 1000 for p in range(1, 1000) if sigmas[4] < ms.percent_to_sigma(p / 1000) < sigmas[3]]
    outside = with_pag(model, start=gap[0], end=gap[-1])
    assert torch.equal(sample(outside, arch, steps=steps), sample(model, arch, steps=steps))


def test_adaptive_scale_applies_the_formula_per_step(monkeypatch):
    arch, s, a = "sd15", 3.0, 0.004
    model = tiny_models.build_tiny_model(arch)
    ms = model.get_model_object("model_sampling")
    used = []
    original = pag.pag_guided

    def spy(x, sigma, cfg_denoised, cond, perturbed, scale, rescale):
        used.append((float(sigma[0]), scale))
        return original(x, sigma, cfg_denoised, cond, perturbed, scale, rescale)

    monkeypatch.setattr(pag, "pag_guided", spy)
    sample(with_pag(model, scale=s, adaptive=a), arch, steps=8)
    t_max = float(ms.timestep(ms.sigma_max.reshape(1)))
    for sigma, scale in used:
        t = float(ms.timestep(torch.tensor([sigma]))) * 1000.0 / t_max
        assert scale == pytest.approx(max(0.0, s - a * (1000.0 - t)))
    assert used[0][1] > 2.9 and used[-1][1] == 0.0  # full at high noise, off near the end


def test_rescale_moves_the_result_and_zero_is_off():
    arch = "sd15"
    model = tiny_models.build_tiny_model(arch)
    base = sample(with_pag(model), arch)
    assert torch.equal(sample(with_pag(model, rescale=0.0), arch), base)
    assert rel_err(sample(with_pag(model, rescale=0.7), arch), base) > 1e-3


# ---------------------------------------------------------------- composition


def test_composes_with_the_builtin_pag_in_either_order():
    import comfy_extras.nodes_pag as builtin

    arch, cfg = "sd15", 2.0
    model = tiny_models.build_tiny_model(arch)

    def add_builtin(m):
        return builtin.PerturbedAttentionGuidance.execute(m, 1.5).result[0]

    plain = sample(model, arch, steps=1, cfg=cfg)
    ours = sample(with_pag(model, layers="u0"), arch, steps=1, cfg=cfg)
    theirs = sample(add_builtin(model), arch, steps=1, cfg=cfg)
    ours_then_theirs = sample(add_builtin(with_pag(model, layers="u0")), arch, steps=1, cfg=cfg)
    theirs_then_ours = sample(with_pag(add_builtin(model), layers="u0"), arch, steps=1, cfg=cfg)
    assert rel_err(ours_then_theirs, theirs_then_ours) < 1e-5  # both add to D_cfg: order-independent
    # Both effects present: at one step the two guidance terms add up exactly.
    assert rel_err(ours_then_theirs - plain, (ours - plain) + (theirs - plain)) < 1e-4


def test_composes_with_attention_patches_and_freeu():
    import comfy_extras.nodes_freelunch as freelunch

    arch = "sd15"
    model = tiny_models.build_tiny_model(arch)
    patched = model.clone()
    patched.set_model_attn1_patch(lambda q, k, v, extra: (q * 1.5, k, v))  # another pack's attention patch
    patched = freelunch.FreeU_V2().patch(patched, 1.3, 1.4, 0.9, 0.2)[0]
    assert rel_err(sample(patched, arch), sample(model, arch)) > 1e-3
    both = sample(with_pag(patched), arch)
    assert rel_err(both, sample(patched, arch)) > 1e-3 and rel_err(both, sample(with_pag(model), arch)) > 1e-3
    assert rel_err(sample(with_pag(patched, batched=False), arch), both) < 1e-5


def test_composes_with_lora_and_controlnet_in_a_graph(host):
    """LoRA-patched model -> PAG, and a ControlNet on the conditioning: the three-chunk batch carries the control
    hint too (batched equals unbatched), and each of PAG, LoRA and ControlNet changes the result."""

    def prompt(pag_on=True, batched=True, lora=True, control=True):
        p = tiny_arch_nodes("sd15", "a_")
        model = ["a_model", 0]
        if lora:
            p["lora"] = {"class_type": "TLTest_TinyLoRA", "inputs": {"model": model, "strength": 1.0, "seed": 0}}
            model = ["lora", 0]
        if pag_on:
            p["pag"] = pag_node(model, batched=batched)
            model = ["pag", 0]
        p["a_sample"]["inputs"]["model"] = model
        if control:
            p["cn"] = {"class_type": "TLTest_TinyControlNet", "inputs": {"seed": 0}}
            p["hint"] = {"class_type": "TLTest_HintImage", "inputs": {"seed": 0}}
            p["apply"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
                "positive": ["a_pos", 0], "negative": ["a_neg", 0], "control_net": ["cn", 0], "image": ["hint", 0],
                "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}  # fmt: skip
            p["a_sample"]["inputs"].update(positive=["apply", 0], negative=["apply", 1])
        return host.run(p)["a_sample"][0]["samples"]

    full = prompt()
    assert rel_err(prompt(batched=False), full) < 1e-5
    for variant in (dict(pag_on=False), dict(lora=False), dict(control=False)):
        assert rel_err(prompt(**variant), full) > 1e-3, variant


def test_input_model_is_not_mutated_and_reapplying_replaces():
    arch = "flux"
    model = tiny_models.build_tiny_model(arch)
    before = repr(model.model_options), repr(model.wrappers)
    once = with_pag(model)
    assert (repr(model.model_options), repr(model.wrappers)) == before
    twice = with_pag(with_pag(model, scale=1.0), scale=3.0)
    assert torch.equal(sample(twice, arch), sample(once, arch))


# ---------------------------------------------------------------- errors


def test_clear_errors():
    sd15 = tiny_models.build_tiny_model("sd15")
    with pytest.raises(ValueError, match="has no self-attention.*blocks with attention: d1"):
        with_pag(sd15, layers="u9")
    with pytest.raises(ValueError, match="transformer indices 0..0"):
        with_pag(sd15, layers="m0.3")
    with pytest.raises(ValueError, match="has no double block 5"):
        with_pag(tiny_models.build_tiny_model("flux"), layers="double5")
    with pytest.raises(ValueError, match="is not a DiT layer"):
        with_pag(tiny_models.build_tiny_model("wan21"), layers="m0")
    with pytest.raises(ValueError, match="unsupported architecture"):
        with_pag(tiny_models.build_gmm_model("eps"))
    with pytest.raises(ValueError, match="start_percent"):
        with_pag(sd15, start=0.8, end=0.2)


# ---------------------------------------------------------------- through ComfyUI's graph


def pag_node(model_link, **inputs):
    defaults = {"scale": 3.0, "adaptive_scale": 0.0, "layers": "auto", "start_percent": 0.0, "end_percent": 1.0,
                "rescale": 0.0, "batched": True}  # fmt: skip
    return {"class_type": "TL_PerturbedAttention", "inputs": {"model": model_link, **defaults, **inputs}}


def test_ksampler_advanced_and_custom_advanced_agree_and_rerun_is_identical(host):
    prompt = tiny_arch_nodes("sdxl", "a_", steps=4)
    prompt["pag"] = pag_node(["a_model", 0])
    prompt["a_sample"]["inputs"]["model"] = ["pag", 0]
    prompt.update({
        "adv": {"class_type": "KSamplerAdvanced", "inputs": {
            "model": ["pag", 0], "add_noise": "enable", "noise_seed": 0, "steps": 4, "cfg": 2.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["a_pos", 0], "negative": ["a_neg", 0],
            "latent_image": ["a_latent", 0], "start_at_step": 0, "end_at_step": 10000,
            "return_with_leftover_noise": "disable"}},
        "guider": {"class_type": "CFGGuider", "inputs": {"model": ["pag", 0], "positive": ["a_pos", 0],
                                                         "negative": ["a_neg", 0], "cfg": 2.0}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "select": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["pag", 0], "scheduler": "normal",
                                                              "steps": 4, "denoise": 1.0}},
        "custom": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["select", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["a_latent", 0]}},
    })  # fmt: skip
    first, second = host.run(prompt), host.run(prompt)
    ks = first["a_sample"][0]["samples"]
    assert torch.equal(ks, second["a_sample"][0]["samples"])  # re-running gives identical output
    assert rel_err(first["adv"][0]["samples"], ks) < 1e-6
    assert rel_err(first["custom"][0]["samples"], ks) < 1e-6
    plain = host.run(tiny_arch_nodes("sdxl", "a_", steps=4))["a_sample"][0]["samples"]
    assert rel_err(ks, plain) > 1e-3
    assert math.isfinite(ks.abs().max().item())


def test_bad_layer_spec_fails_the_prompt_with_the_reason(host):
    prompt = tiny_arch_nodes("sd3", "a_")
    prompt["pag"] = pag_node(["a_model", 0], layers="single0")
    prompt["a_sample"]["inputs"]["model"] = ["pag", 0]
    with pytest.raises(PromptError, match="has no single block 0"):
        host.run(prompt)


def test_node_is_registered_with_its_contract(host):
    schema = host.nodes.NODE_CLASS_MAPPINGS["TL_PerturbedAttention"].GET_SCHEMA()
    inputs = {i.id: i for i in schema.inputs}
    assert list(inputs) == ["model", "scale", "adaptive_scale", "layers", "start_percent", "end_percent", "rescale",
                            "batched"]  # fmt: skip
    assert [inputs[k].default for k in list(inputs)[1:]] == [3.0, 0.0, "auto", 0.0, 1.0, 0.0, True]
    assert all(inputs[k].tooltip for k in list(inputs)[1:])
