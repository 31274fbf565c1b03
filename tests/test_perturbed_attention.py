"""TL_PerturbedAttention in the real host, on tiny real UNets and DiTs, against independent references."""

import math
import re

import comfy.ldm.modules.attention
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.supported_models
import comfy_extras.nodes_custom_sampler as custom_sampler
import comfy_extras.nodes_perpneg as perpneg
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


def masked_identity_reference(q, k, v, text_tokens, user_mask=None, text_first=True):
    """Full attention with an additive mask: image-to-image block -inf except its diagonal (diffusers' joint PAG),
    plus the model's own attention mask where there is one ([B, L, L] or key-only [B, 1, L] additive bias, as Flux
    and HunyuanVideo pass them). Text tokens first, or last with text_first=False."""
    n = q.shape[2]
    img = slice(text_tokens, n) if text_first else slice(0, n - text_tokens)
    mask = torch.zeros(n, n, dtype=q.dtype)
    mask[img, img] = torch.full((n - text_tokens, n - text_tokens), float("-inf"), dtype=q.dtype).fill_diagonal_(0.0)
    if user_mask is not None:
        mask = mask + user_mask.to(q.dtype).unsqueeze(1)  # [B, 1, L or 1, L]: one bias for every head
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def random_attention_bias(batch, n, text_tokens, seed=0, text_first=True):
    """An additive attention bias [B, L, L] that hides three text tokens from every image query."""
    bias = 2 * torch.randn(batch, n, n, generator=torch.Generator().manual_seed(seed))
    if text_first:
        bias[:, text_tokens:, :3] = float("-inf")
    else:
        bias[:, : n - text_tokens, n - 3 :] = float("-inf")
    return bias


ORDERS = pytest.mark.parametrize("text_first", [True, False], ids=["text first", "image first"])


@ORDERS
@pytest.mark.parametrize("text_tokens", [0, 1, 5])
def test_identity_attention_matches_the_masked_reference(text_tokens, text_first):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 12, 8, generator=g, dtype=torch.float64) for _ in range(3))
    got = core.identity_attention(q, k, v, text_tokens, text_first=text_first)
    expected = masked_identity_reference(q, k, v, text_tokens, text_first=text_first)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@ORDERS
@pytest.mark.parametrize("form", ["bias [B, L, L]", "bias [L, L]", "boolean [B, L, L]", "key-only bias [B, 1, L]"])
def test_identity_attention_honours_an_attention_mask(form, text_first):
    text_tokens, n = 5, 12
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g, dtype=torch.float64) for _ in range(3))
    bias = random_attention_bias(2, n, text_tokens, text_first=text_first).double()
    text = slice(0, text_tokens) if text_first else slice(n - text_tokens, n)
    if form == "bias [L, L]":
        bias = bias[:1].expand(2, n, n)
        mask = bias[0]
    elif form.startswith("boolean"):
        keep = torch.rand(2, n, n, generator=g) > 0.3
        keep[:, :, 3 if text_first else n - text_tokens] = True  # a text key no bias hides: no row fully masked
        keep[bias == float("-inf")] = False
        mask, bias = keep, torch.zeros(2, n, n, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    elif form.startswith("key-only"):  # HunyuanVideo's text padding mask: one row of key biases for every query
        bias = torch.zeros(2, 1, n, dtype=torch.float64)
        bias[:, :, text][:, :, -2:] = float("-inf")
        bias[:, :, text] += torch.randn(2, 1, text_tokens, generator=g, dtype=torch.float64)
        mask = bias
    else:
        mask = bias
    got = core.identity_attention(q, k, v, text_tokens, mask, text_first=text_first)
    expected = masked_identity_reference(q, k, v, text_tokens, bias, text_first=text_first)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


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
    zero = lambda v: torch.zeros_like(v) if isinstance(v, torch.Tensor) else v  # noqa: E731
    return [[torch.zeros_like(c), {k: zero(v) for k, v in extra.items()}] for c, extra in cond]


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


def with_attention_override(model, override):
    """A clone whose attention runs through `override` (ComfyUI's own hook; no PAG code): the hand references."""
    hooked = model.clone()
    hooked.model_options["transformer_options"] = {**hooked.model_options["transformer_options"],
                                                   "optimized_attention_override": override}  # fmt: skip
    return hooked


def middle_block_returns_v(model):
    """An independent perturbation of the SD1.5 'auto' layer: a plain attn1 replace on the middle block returning V."""
    hooked = model.clone()
    hooked.set_model_attn1_replace(lambda q, k, v, extra: v, "middle", 0)
    return hooked


def first_step_input(model, arch, **kwargs):
    """x and sigma of the first model evaluation, read by a post-CFG function on a plain clone."""
    seen = []

    def record(args):
        seen.append((args["input"], args["sigma"]))
        return args["denoised"]

    spy = model.clone()
    spy.set_model_sampler_post_cfg_function(record)
    sample(spy, arch, steps=1, cfg=1.0, **kwargs)
    return seen[0]


# ---------------------------------------------------------------- behaviour on every architecture


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_scale_zero_is_bit_identical_and_scale_changes_output(arch):
    model = tiny_models.build_tiny_model(arch)
    plain = sample(model, arch)
    assert torch.equal(sample(with_pag(model, scale=0.0), arch), plain)
    assert rel_err(sample(with_pag(model), arch), plain) > 1e-3


@pytest.mark.parametrize("arch,layers", [(a, "auto") for a in TINY_ARCHS] + [("flux", "single0, double0"),
                                                                          ("sdxl", "d0.1, u0")])  # fmt: skip
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
    hooked = middle_block_returns_v(model)
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

    hooked = with_attention_override(model, override)
    d_cond = sample(model, arch, steps=1, cfg=1.0, positive=positive)
    d_pert = sample(hooked, arch, steps=1, cfg=1.0, positive=positive)
    got = sample(with_pag(model, scale=s), arch, steps=1, cfg=1.0, positive=positive)
    assert rel_err(got, d_cond + s * (d_cond - d_pert)) < 1e-5


@pytest.mark.parametrize("layers", ["double1, single0", "single1", "double0-1, single0-1"])
@pytest.mark.parametrize("masked", [False, True], ids=["no mask", "attention mask"])
def test_flux_single_blocks_match_a_hand_computed_joint_reference(layers, masked):
    """Single blocks see [txt, img] in one sequence: the text rows must stay unperturbed there too, whichever double
    blocks are selected, and Flux's attention mask (here a [B, L, L] bias, as Redux's attn_bias builds) applies to
    the perturbed rows as to the others. Reference: masked SDPA on the blocks Flux itself names in
    transformer_options (block_type, block_index), no PAG code involved."""
    arch, s = "flux", 2.0
    model = tiny_models.build_tiny_model(arch)
    positive = tiny_models.tiny_conditioning(arch, 1)
    text_tokens = positive[0][0].shape[1]
    h, w = (n // 2 for n in tiny_models.latent_shape(arch)[2:])  # Flux patches 2x2
    if masked:
        bias = random_attention_bias(1, text_tokens + h * w, text_tokens)
        positive = [[positive[0][0], {**positive[0][1], "attention_mask": bias, "attention_mask_img_shape": (h, w)}]]
    chosen = {(kind, i) for kind, i in ((la.kind.split("_")[0], la.index) for la in core.parse_dit_layers(layers))}

    def override(func, q, k, v, heads, **kwargs):
        opts = kwargs["transformer_options"]
        if (opts.get("block_type"), opts.get("block_index")) in chosen:
            out = masked_identity_reference(q, k, v, text_tokens, kwargs.get("mask"))  # q, k, v: [B, H, L, D]
            return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
        return func(q, k, v, heads, **kwargs)

    hooked = with_attention_override(model, override)
    d_cond = sample(model, arch, steps=1, cfg=1.0, positive=positive)
    d_pert = sample(hooked, arch, steps=1, cfg=1.0, positive=positive)
    if masked:  # the mask reaches the model and matters
        unmasked = tiny_models.tiny_conditioning(arch, 1)
        assert rel_err(d_cond, sample(model, arch, steps=1, cfg=1.0, positive=unmasked)) > 1e-3
    for batched in (True, False):
        got = sample(with_pag(model, scale=s, layers=layers, batched=batched), arch, steps=1, cfg=1.0,
                     positive=positive)  # fmt: skip
        assert rel_err(got, d_cond + s * (d_cond - d_pert)) < 1e-5


# ---------------------------------------------------------------- further DiT families


def sample_dit(model, name, steps=4, cfg=2.0, batch=1, positive=None):
    """Like `sample`, for tiny_models.TINY_DITS; the negative is another prompt (Mochi's needs its text mask)."""
    latent = torch.zeros(tiny_models.tiny_dit_latent_shape(name, batch))
    positive = positive or tiny_models.tiny_dit_conditioning(name, 1)
    negative = tiny_models.tiny_dit_conditioning(name, 2)
    noise = comfy.sample.prepare_noise(latent, 0)
    return comfy.sample.sample(
        model, noise, steps, cfg, "euler", "normal", positive, negative, latent, seed=0, disable_pbar=True
    )


def dit_replaces(model):
    return set(model.model_options["transformer_options"].get("patches_replace", {}).get("dit", {}))


@pytest.mark.parametrize("name", tiny_models.TINY_DITS)
def test_further_dits_scale_zero_batched_and_auto(name):
    """Qwen-Image, HunyuanVideo, LTXV, AuraFlow and Mochi: scale 0 is the plain model bit for bit, PAG changes the
    output, batched equals unbatched with one call per step, and 'auto' is block 1 of the main stack."""
    model = tiny_models.build_tiny_dit(name)
    plain = sample_dit(model, name, batch=2)
    assert torch.equal(sample_dit(with_pag(model, scale=0.0), name, batch=2), plain)
    batched, batched_calls = count_calls(with_pag(model, batched=True))
    separate, separate_calls = count_calls(with_pag(model, batched=False))
    a, b = sample_dit(batched, name, batch=2), sample_dit(separate, name, batch=2)
    assert rel_err(a, plain) > 1e-3
    assert rel_err(a, b) < 1e-5  # float tolerance: only the batch composition differs
    assert batched_calls == [6] * 4 and separate_calls == [4, 2] * 4
    assert dit_replaces(batched) == {("double_block", 1)}  # LTXV's auto block 19 falls back to the tiny model's last


class BlockProbe:
    """Marks one network module as running through plain torch forward hooks (no ComfyUI patch involved)."""

    def __init__(self, module):
        self.inside = self.done = False
        self.handles = [module.register_forward_pre_hook(self.enter), module.register_forward_hook(self.leave)]

    def enter(self, *_):
        self.inside, self.done = True, False

    def leave(self, *_):
        self.inside = False

    def remove(self):
        for handle in self.handles:
            handle.remove()


FAMILY_REFERENCES = {  # name: (layers, perturbed module, text tokens its attention sees, text first, text mask)
    "hunyuan_video double": ("double1", "double_blocks.1", tiny_models.TOKENS, False, False),
    "hunyuan_video single": ("single1", "single_blocks.1", tiny_models.TOKENS, False, False),
    "hunyuan_video masked": ("double1", "double_blocks.1", tiny_models.TOKENS, False, True),
    "mochi": ("block1", "blocks.1", tiny_models.MOCHI_TEXT_TOKENS, False, False),  # the unpadded tokens only
    "qwen_image": ("block1", "transformer_blocks.1", tiny_models.TOKENS, True, False),
    "aura": ("single1", "single_layers.1", 8 + tiny_models.TOKENS, True, False),  # 8 register tokens lead the text
    "ltxv": ("block1", "transformer_blocks.1", 0, True, False),  # self-attention: the layer outputs V
}


@pytest.mark.parametrize("case", list(FAMILY_REFERENCES))
def test_further_dits_match_a_hand_computed_reference_at_one_step(case):
    """D = D_cond + s (D_cond - D_pert) at cfg 1, batched or not, with D_pert from an independent perturbation: a torch
    forward hook marks the chosen block, and an attention override replaces the first attention inside it with
    masked SDPA (image-to-image identity, text order and text length written out per family) on every row.
    HunyuanVideo's text padding mask reaches attention as a key-only bias [1, 1, L] and applies to the perturbed
    rows too; its forward cannot batch two masked rows, so batched PAG runs that conditioning's perturbed pass apart."""
    name = case.split(" ")[0]
    layers, module, text_tokens, text_first, masked = FAMILY_REFERENCES[case]
    s = 2.0
    model = tiny_models.build_tiny_dit(name)
    positive = tiny_models.tiny_dit_conditioning(name, 1)
    if masked:
        padding = torch.ones(1, tiny_models.TOKENS, dtype=torch.long)
        padding[:, -2:] = 0
        positive = [[positive[0][0], {**positive[0][1], "attention_mask": padding}]]
    probe = BlockProbe(model.model.diffusion_model.get_submodule(module))
    masks = []

    def override(func, q, k, v, heads, *args, **kwargs):
        if not probe.inside or probe.done:
            return func(q, k, v, heads, *args, **kwargs)
        probe.done = True
        mask = args[0] if args else kwargs.get("mask")
        masks.append(mask)
        if not kwargs.get("skip_reshape", False):  # [B, L, H * D] -> [B, H, L, D]
            q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k, v))
        out = masked_identity_reference(q, k, v, text_tokens, mask, text_first=text_first)
        return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)

    hooked = with_attention_override(model, override)
    try:
        d_cond = sample_dit(model, name, steps=1, cfg=1.0, positive=positive)
        d_pert = sample_dit(hooked, name, steps=1, cfg=1.0, positive=positive)
    finally:
        probe.remove()
    assert probe.done and rel_err(d_pert, d_cond) > 1e-4  # the reference perturbed the block, and it mattered
    assert (masks[0] is not None) == masked
    for batched in (True, False):
        got = sample_dit(with_pag(model, scale=s, layers=layers, batched=batched), name, steps=1, cfg=1.0,
                         positive=positive)  # fmt: skip
        assert rel_err(got, d_cond + s * (d_cond - d_pert)) < 1e-5
    if masked:  # batched falls back to a separate perturbed call for that conditioning, and only for it
        m, calls = count_calls(with_pag(model, scale=s, layers=layers))
        sample_dit(m, name, steps=1, cfg=1.0, positive=positive)
        assert calls == [1, 1]


def meta_model(config_class, unet_config):
    """A real-size ModelPatcher on the meta device (no memory, no weights): its block layout only."""
    model = getattr(comfy.supported_models, config_class)(dict(unet_config)).get_model({}, device="meta")
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


def test_auto_block_of_a_full_size_ltxv_is_19_and_hunyuan_dit_is_refused_with_the_reason():
    # LTX-Video 2B as ComfyUI detects it: 28 blocks; 'auto' is block 19, its own STG "attention_values" block.
    ltxv = meta_model("LTXV", {"image_model": "ltxv", "num_layers": 28, "attention_head_dim": 64,
                               "cross_attention_dim": 2048})  # fmt: skip
    assert dit_replaces(with_pag(ltxv)) == {("double_block", 19)}
    hydit = meta_model("HunyuanDiT", {"image_model": "hydit", "depth": 2, "hidden_size": 64, "num_heads": 2})
    with pytest.raises(ValueError, match="HunYuanDiT: ComfyUI calls its attention without transformer_options"):
        with_pag(hydit)


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


def diffusers_timestep(arch, ms, sigma):
    """The timestep diffusers' PAG pipelines feed the adaptive scale, from sigma, written out: SD1.x/SDXL use the
    integer DDPM timestep whose sigma (the model's own 1000-entry table) is nearest in log sigma; flow models
    (Flux) use 1000 sigma."""
    if arch == "flux":
        return 1000.0 * sigma
    return float((ms.sigmas.double().log() - math.log(sigma)).abs().argmin())


@pytest.mark.parametrize("arch", ["sd15", "flux"])
def test_adaptive_scale_applies_the_formula_per_step(monkeypatch, arch):
    s, a = 3.0, 0.004
    model = tiny_models.build_tiny_model(arch)
    ms = model.get_model_object("model_sampling")
    used = []
    original = pag.pag_guided

    def spy(x, sigma, cfg_denoised, cond, perturbed, scale, rescale):
        used.append((float(sigma[0]), scale))
        return original(x, sigma, cfg_denoised, cond, perturbed, scale, rescale)

    monkeypatch.setattr(pag, "pag_guided", spy)
    sample(with_pag(model, scale=s, adaptive=a), arch, steps=8)
    assert len(used) == 8
    for sigma, scale in used:
        assert scale == pytest.approx(max(0.0, s - a * (1000.0 - diffusers_timestep(arch, ms, sigma))), abs=1e-9)
    assert used[0][1] > 2.9 and used[-1][1] == 0.0  # full at high noise, off near the end


def test_rescale_moves_the_result_and_zero_is_off():
    arch = "sd15"
    model = tiny_models.build_tiny_model(arch)
    base = sample(with_pag(model), arch)
    assert torch.equal(sample(with_pag(model, rescale=0.0), arch), base)
    assert rel_err(sample(with_pag(model, rescale=0.7), arch), base) > 1e-3


@pytest.mark.parametrize("r", [0.7, 1.0])
def test_rescale_matches_a_hand_computed_reference_at_one_step(r):
    """Guidance rescale as diffusers' PAG does it (rescale_noise_cfg on the noise prediction): the CFG + PAG noise
    prediction eps is scaled to the per-sample std of the conditional one, eps_c, and blended with weight r:
    eps' = r * eps * std(eps_c) / std(eps) + (1 - r) * eps. Predictions from plain calls and an independent hook."""
    arch, cfg, s, batch = "sd15", 2.5, 3.0, 2
    model = tiny_models.build_tiny_model(arch)
    pos, neg = tiny_models.tiny_conditioning(arch, 1), tiny_models.tiny_conditioning(arch, 2)
    run = dict(steps=1, batch=batch, negative=neg)

    def denoised(m, **kwargs):  # sampling returns the latent scaled for the VAE: back to the model's space
        return model.model.process_latent_in(sample(m, arch, **run, **kwargs))

    d_cond = denoised(model, cfg=1.0, positive=pos)
    d_uncond = denoised(model, cfg=1.0, positive=neg)
    d_pert = denoised(middle_block_returns_v(model), cfg=1.0, positive=pos)
    x, sigma = first_step_input(model, arch, positive=pos, batch=batch, negative=neg)
    sigma = sigma.reshape(-1, 1, 1, 1)
    d_guided = d_uncond + cfg * (d_cond - d_uncond) + s * (d_cond - d_pert)
    eps, eps_cond = (x - d_guided) / sigma, (x - d_cond) / sigma
    ratio = eps_cond.std(dim=(1, 2, 3), keepdim=True) / eps.std(dim=(1, 2, 3), keepdim=True)
    assert (ratio - ratio.mean()).abs().max() > 1e-3  # the two samples are rescaled differently
    expected = x - sigma * (r * eps * ratio + (1 - r) * eps)
    got = denoised(with_pag(model, scale=s, rescale=r), cfg=cfg, positive=pos)
    assert rel_err(got, expected) < 1e-5 and rel_err(got, d_guided) > 1e-3


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


def attn1_replaces(model):
    return model.model_options["transformer_options"].get("patches_replace", {}).get("attn1", {})


def test_reapplying_with_other_layers_replaces_the_earlier_layers():
    sd15 = tiny_models.build_tiny_model("sd15")
    assert torch.equal(sample(with_pag(with_pag(sd15, layers="m0"), layers="u0"), "sd15"),
                       sample(with_pag(sd15, layers="u0"), "sd15"))  # fmt: skip
    assert set(attn1_replaces(with_pag(with_pag(sd15, layers="m0, d1"), layers="u0"))) == {("output", 0)}
    assert (
        "patches_replace" not in with_pag(with_pag(sd15, layers="m0"), scale=0.0).model_options["transformer_options"]
    )
    flux = tiny_models.build_tiny_model("flux")
    assert torch.equal(sample(with_pag(with_pag(flux, layers="double0, single1"), layers="double1"), "flux"),
                       sample(with_pag(flux, layers="double1"), "flux"))  # fmt: skip
    # Another pack's attn1 replace on the middle block, which our earlier patch chained to, is put back.
    other = sd15.clone()

    def other_attention(q, k, v, extra):
        return comfy.ldm.modules.attention.optimized_attention(1.5 * q, k, v, extra["n_heads"])

    other.set_model_attn1_replace(other_attention, "middle", 0)
    again = with_pag(with_pag(other, layers="m0"), layers="u0")
    assert attn1_replaces(again)[("middle", 0)] is other_attention
    assert torch.equal(sample(again, "sd15"), sample(with_pag(other, layers="u0"), "sd15"))
    assert rel_err(sample(again, "sd15"), sample(with_pag(sd15, layers="u0"), "sd15")) > 1e-3


# ---------------------------------------------------------------- other guiders


def one_step_with_guider(guider, arch="sd15"):
    """One Euler step to sigma 0 (returns D itself), with the same noise and sigmas as `sample(steps=1)`."""
    latent = torch.zeros(tiny_models.latent_shape(arch))
    ms = guider.model_patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", 1)
    noise = comfy.sample.prepare_noise(latent, 0)
    sampler = comfy.samplers.sampler_object("euler")
    return guider.sample(noise, latent, sampler, sigmas, seed=0, disable_pbar=True).cpu()


GUIDERS = {
    "DualCFG regular": lambda m, c1, c2, n: custom_sampler.DualCFGGuider.execute(m, c1, c2, n, 2.0, 1.5, "regular"),
    "DualCFG nested": lambda m, c1, c2, n: custom_sampler.DualCFGGuider.execute(m, c1, c2, n, 2.0, 1.5, "nested"),
    "PerpNeg": lambda m, c1, c2, n: perpneg.PerpNegGuider.execute(m, c1, c2, n, 2.0, 0.5),
}


@pytest.mark.parametrize("name", list(GUIDERS))
def test_guiders_with_their_own_combination_get_pag_on_their_positive(name):
    """DualCFGGuider and PerpNegGuider combine their predictions themselves: the result must be that guider's own
    result on the plain model + s (D_positive - D_pert), the first (positive) conditioning perturbed, with the
    perturbed pass in the same call as the guider's own conds (batched) or in one more call."""
    arch, s = "sd15", 3.0
    model = tiny_models.build_tiny_model(arch)
    cond1, cond2, negative = (tiny_models.tiny_conditioning(arch, seed) for seed in (1, 2, 3))

    def guided(m):
        return one_step_with_guider(GUIDERS[name](m, cond1, cond2, negative).result[0])

    d_pos = sample(model, arch, steps=1, cfg=1.0, positive=cond1)
    d_pert = sample(middle_block_returns_v(model), arch, steps=1, cfg=1.0, positive=cond1)
    expected = guided(model) + s * (d_pos - d_pert)
    for batched, calls in ((True, [4]), (False, [3, 1])):
        m, log = count_calls(with_pag(model, scale=s, batched=batched))
        assert rel_err(guided(m), expected) < 1e-5
        assert log == calls  # three conds of batch 1, plus the perturbed one


def test_a_guider_without_a_positive_conditioning_is_an_error():
    class NoPositive(comfy.samplers.CFGGuider):
        def set_conds(self, first):
            self.inner_set_conds({"first": first})

        def predict_noise(self, x, timestep, model_options={}, seed=None):  # noqa: B006 (ComfyUI's signature)
            return comfy.samplers.calc_cond_batch(self.inner_model, [self.conds["first"]], x, timestep,
                                                  model_options)[0]  # fmt: skip

    guider = NoPositive(with_pag(tiny_models.build_tiny_model("sd15")))
    guider.set_conds(tiny_models.tiny_conditioning("sd15", 1))
    with pytest.raises(ValueError, match="NoPositive has no 'positive' conditioning"):
        one_step_with_guider(guider)


# ---------------------------------------------------------------- UNet layer indexing


def meta_unet(unet_config, config_class):
    """A real-size UNet ModelPatcher on the meta device (no memory, no weights): its block layout only."""
    model = getattr(comfy.supported_models, config_class)(dict(unet_config)).get_model({}, device="meta")
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


# ComfyUI's own full-size configs (comfy/model_detection.py, unet_config_from_diffusers_unet).
_UNET = {
    "use_checkpoint": False,
    "image_size": 32,
    "out_channels": 4,
    "use_spatial_transformer": True,
    "legacy": False,
    "in_channels": 4,
    "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
SDXL_CONFIG = {
    **_UNET,
    "num_classes": "sequential",
    "adm_in_channels": 2816,
    "model_channels": 320,
    "num_res_blocks": [2, 2, 2],
    "transformer_depth": [0, 0, 2, 2, 10, 10],
    "channel_mult": [1, 2, 4],
    "transformer_depth_middle": 10,
    "use_linear_in_transformer": True,
    "context_dim": 2048,
    "num_head_channels": 64,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
}
SD15_CONFIG = {**_UNET, "adm_in_channels": None, "model_channels": 320, "num_res_blocks": [2, 2, 2, 2],
               "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
               "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
               "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]}  # fmt: skip


@pytest.mark.parametrize("config,config_class,spec,expected", [
    # sd-perturbed-attention's README example on SDXL: its third input block with attention is ComfyUI's input 7.
    (SDXL_CONFIG, "SDXL", "d2.2-9", {("input", 7, t) for t in range(2, 10)}),
    (SDXL_CONFIG, "SDXL", "d0, d3.9, m0.0, u0, u5", {("input", 4), ("input", 8, 9), ("middle", 0, 0), ("output", 0),
                                                     ("output", 5)}),
    (SDXL_CONFIG, "SDXL", "auto", {("middle", 0)}),
    (SD15_CONFIG, "SD15", "d0, d5, u0, u8", {("input", 1), ("input", 8), ("output", 3), ("output", 11)}),
])  # fmt: skip
def test_unet_blocks_count_only_blocks_with_attention(config, config_class, spec, expected):
    assert set(attn1_replaces(with_pag(meta_unet(config, config_class), layers=spec))) == expected


def test_unet_layer_errors_list_the_valid_layers_in_the_same_indexing():
    sdxl = meta_unet(SDXL_CONFIG, "SDXL")
    valid = "valid: d0-1 (depth 2), d2-3 (depth 10), m0 (depth 10), u0-2 (depth 10), u3-5 (depth 2)"
    with pytest.raises(ValueError, match=re.escape("there is no d4: this UNet has 4 input blocks") + ".*" +
                       re.escape(valid)):  # fmt: skip
        with_pag(sdxl, layers="d4")
    with pytest.raises(ValueError, match=re.escape("d1 has transformer indices 0..1, not 2; " + valid)):
        with_pag(sdxl, layers="d1.2")
    with pytest.raises(ValueError, match=re.escape("there is no u6")):
        with_pag(sdxl, layers="u6")


# ---------------------------------------------------------------- errors


def test_clear_errors():
    sd15 = tiny_models.build_tiny_model("sd15")
    with pytest.raises(ValueError, match=r"no u9: .*valid: d0-1 \(depth 1\), m0 \(depth 1\), u0-3 \(depth 1\)"):
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
