"""c-VSG in the real host: Vendi identities, exactness at scale 0, diversity and exemplar support on the exact GMM,
features with gradients through inference-mode weights, memory banks on disk and across a server restart."""

import json
import os
import uuid

import comfy.clip_vision
import comfy.sample
import comfy.samplers
import comfy.sd
import pytest
import tiny_models
import torch
from comfy.ldm.models.autoencoder import AutoencoderKL
from comfy_host import PACK_ROOT, PromptError, ServerHost
from harness import PACK_FOLDER, TEST_NODES_FOLDER, TESTS_DIR, pack

vn = pack("nodes.vendi")
core = pack("guidance.vendi")
MIX = tiny_models.gmm_preset("four_modes")  # modes 0..3 at 225, 315, 135, 45 degrees

# ---------------------------------------------------------------- Vendi score


def test_vendi_identities():
    e = torch.eye(6)
    assert core.vendi_score(torch.randn(1, 7).repeat(5, 1)).item() == pytest.approx(1.0, abs=1e-9)
    assert core.vendi_score(e[:4]).item() == pytest.approx(4.0, abs=1e-9)  # n orthogonal -> n
    two_clusters = torch.cat([e[[0] * 3], e[[1] * 3]])
    assert core.vendi_score(two_clusters).item() == pytest.approx(2.0, abs=1e-9)
    assert core.vendi_score(3.0 * two_clusters).item() == pytest.approx(2.0, abs=1e-9)  # cosine: scale-free
    assert core.vendi_score(torch.zeros(0, 3)).item() == 1.0


def reference_vendi(features: torch.Tensor) -> float:
    """Straight from the definition: the n x n kernel's eigenvalues."""
    f = torch.nn.functional.normalize(features.double(), dim=1)
    lam = torch.linalg.eigvalsh(f @ f.T / f.shape[0]).clamp_min(0)
    lam = lam[lam > 0]
    return float(torch.exp(-(lam * lam.log()).sum()))


def test_dual_form_matches_the_definition_and_never_gives_nan():
    g = torch.Generator().manual_seed(0)
    many = torch.randn(300, 3, generator=g, dtype=torch.float64)  # n > d: the official SVD route gives NaN here
    score = core.vendi_score(many).item()
    assert score == pytest.approx(reference_vendi(many), rel=1e-9) and 1.0 <= score <= 3.0
    for features in (many, torch.ones(50, 3, dtype=torch.float64), torch.zeros(4, 5, dtype=torch.float64)):
        x = features.clone().requires_grad_(True)
        core.vendi_score(x).backward()
        assert torch.isfinite(x.grad).all()
    # the naive entropy of the n x n spectrum is NaN once n > d (0 log 0): what the score must never do
    f = torch.nn.functional.normalize(many, dim=1)
    lam = torch.linalg.eigvalsh(f @ f.T / len(f)).clamp_min(0)
    assert torch.isnan(torch.exp(-(lam * lam.log()).sum()))


@pytest.mark.parametrize("shape", [(3, 5), (6, 3), (4, 4)])
def test_gradient_matches_finite_differences(shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(core.vendi_score, (x,))


@pytest.mark.parametrize("memory_rows", [3, 40])  # Gram form and d x d moment form
def test_memory_scores_equal_the_score_of_the_union(memory_rows):
    g = torch.Generator().manual_seed(2)
    memory, candidates = torch.randn(memory_rows, 6, generator=g), torch.randn(4, 6, generator=g)
    got = core.VendiMemory(memory).score_with(candidates)
    want = torch.stack([core.vendi_score(torch.cat([memory, c[None]])) for c in candidates])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("flow", [False, True])
def test_kick_makes_an_euler_step_land_on_the_papers_update(flow):
    """Paper: x_t += g with the step's eps kept, then a DDIM step. Ours: D + c g into the sampler's Euler step."""
    g_ = torch.Generator().manual_seed(3)
    x0, eps, g = (torch.randn(5, generator=g_, dtype=torch.float64) for _ in range(3))
    sigma, sigma_next = (0.7, 0.4) if flow else (3.0, 1.2)
    alpha, alpha_next = (1 - sigma, 1 - sigma_next) if flow else (1.0, 1.0)
    x = alpha * x0 + sigma * eps
    shifted_x0 = (x + g - sigma * eps) / alpha
    paper = alpha_next * shifted_x0 + sigma_next * eps
    c = core.kick_factor(sigma, sigma_next, flow)
    ours = x + (sigma_next - sigma) * (x - (x0 + c * g)) / sigma
    torch.testing.assert_close(ours, paper, rtol=1e-12, atol=1e-12)
    assert core.kick_factor(1.0, 0.9, True) is None and core.kick_factor(1.0, 1.0, False) is None


def test_rescale_rows():
    grad = torch.tensor([[3.0, 4.0], [0.0, 0.0], [float("nan"), 1.0]])
    x = torch.tensor([[1.0, 0.0], [5.0, 5.0], [2.0, 0.0]])
    out = core.rescale_rows(grad, x, 0.5)
    torch.testing.assert_close(out, torch.tensor([[0.3, 0.4], [0.0, 0.0], [0.0, 1.0]]))


# ---------------------------------------------------------------- helpers


class GMMPoints(vn.PooledLatentExtractor):
    """Features = identity of the GMM latent ([B, 2, 1, 1] pooled is the point itself). Exemplar IMAGEs carry
    their point in the first pixel: channels 0, 1 = (point + 5) / 10."""

    def embed_images(self, images, vae=None, pixel_size=None):
        return images[:, 0, 0, :2].float() * 10 - 5


def point_images(points: torch.Tensor) -> torch.Tensor:
    images = torch.zeros(len(points), 8, 12, 3)
    images[..., :2] = ((points.float() + 5) / 10)[:, None, None, :]
    return images


def fresh_bank() -> str:
    return f"test {uuid.uuid4().hex[:12]}"


def guider(model, positive, negative, cfg, scale, bank, **kwargs):
    options = {"contextual_weight": 2.0, "every_n_steps": 1, **kwargs}
    weight, every = options.pop("contextual_weight"), options.pop("every_n_steps")
    return vn.VendiGuider.execute(model, positive, negative, cfg, scale, weight, every, bank, **options).result[0]


def plain_guider(model, positive, negative, cfg):
    g = comfy.samplers.CFGGuider(model)
    g.set_conds(positive, negative)
    g.set_cfg(cfg)
    return g


def run(g, latent_shape, steps=20, seed=0, sampler="euler", scheduler="karras"):
    latent = torch.zeros(latent_shape)
    sigmas = comfy.samplers.calculate_sigmas(g.model_patcher.get_model_object("model_sampling"), scheduler, steps)
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return g.sample(
            comfy.sample.prepare_noise(latent, seed), latent, comfy.samplers.sampler_object(sampler), sigmas,
            seed=seed, disable_pbar=True,
        )  # fmt: skip


def gmm_batch(scale, weights, n, seed=0, flavour="eps", bank=None, **kwargs):
    model = tiny_models.build_gmm_model(flavour, "four_modes")
    cond = tiny_models.gmm_conditioning(weights)
    own_bank = bank is None
    bank = bank or fresh_bank()
    try:
        g = guider(model, cond, cond, 1.0, scale, bank, features=GMMPoints(), **kwargs)
        out = run(g, tiny_models.gmm_latent_shape("four_modes", n), steps=12, seed=seed,
                  scheduler="karras" if flavour == "eps" else "simple")  # fmt: skip
    finally:
        if own_bank:
            vn.MemoryBank(bank).clear()
    return out.reshape(n, 2).double()


# ---------------------------------------------------------------- exactness


@pytest.mark.parametrize("case", ["gmm_eps", "gmm_flow", "sd15_cfg"])
def test_scale_zero_is_bit_identical_to_the_plain_guider(case):
    if case == "sd15_cfg":
        model, shape, cfg = tiny_models.build_tiny_model("sd15"), tiny_models.latent_shape("sd15", 2), 2.0
        positive = tiny_models.tiny_conditioning("sd15", 1)
        negative = [[torch.zeros_like(positive[0][0]), {}]]
        features = None
    else:
        model = tiny_models.build_gmm_model(case.split("_")[1], "four_modes")
        shape, cfg, features = tiny_models.gmm_latent_shape("four_modes", 3), 1.5, GMMPoints()
        positive, negative = tiny_models.gmm_conditioning([0, 1, 1, 0]), tiny_models.gmm_conditioning([0, 0, 0, 0])
    bank = fresh_bank()
    try:
        exemplars = point_images(MIX.means[[1, 2]])
        ours = run(guider(model, positive, negative, cfg, 0.0, bank, features=features, exemplars=exemplars), shape)
        assert torch.equal(ours, run(plain_guider(model, positive, negative, cfg), shape))
        assert sum(vn.MemoryBank(bank).sizes().values()) == shape[0]  # still recorded in the bank
    finally:
        vn.MemoryBank(bank).clear()


def test_first_generation_of_an_empty_bank_is_unguided_and_the_bank_then_guides():
    model = tiny_models.build_gmm_model("eps", "four_modes")
    cond = tiny_models.gmm_conditioning([0.05, 0.45, 0.45, 0.05])
    shape = tiny_models.gmm_latent_shape("four_modes", 1)
    bank = fresh_bank()
    try:
        plain = run(plain_guider(model, cond, cond, 1.0), shape)
        first = run(guider(model, cond, cond, 1.0, 0.3, bank, features=GMMPoints()), shape)
        assert torch.equal(first, plain)
        second = run(guider(model, cond, cond, 1.0, 0.3, bank, features=GMMPoints()), shape)
        assert not torch.equal(second, plain)
        assert vn.MemoryBank(bank).sizes() == {"latent_pool4|GMMLatentFormat": 2}
    finally:
        vn.MemoryBank(bank).clear()


def test_guided_steps_follow_every_n_steps_and_the_window():
    model = tiny_models.build_gmm_model("eps", "four_modes")
    cond = tiny_models.gmm_conditioning([1, 1, 1, 1])
    model_sampling = model.get_model_object("model_sampling")

    def guided_sigmas(steps=10, sampler="euler", **kwargs):
        g = guider(model, cond, cond, 1.0, 0.1, fresh_bank(), features=GMMPoints(), update_bank=False,
                   batch_mode="joint", **kwargs)  # fmt: skip
        seen: list[float] = []
        inner = g.diversity_gradient

        def spy(x, denoised, sigma, run_state):
            seen.append(sigma)
            return inner(x, denoised, sigma, run_state)

        g.diversity_gradient = spy
        out = run(g, tiny_models.gmm_latent_shape("four_modes", 2), steps=steps, sampler=sampler)
        assert torch.isfinite(out).all()
        return seen

    sigmas = comfy.samplers.calculate_sigmas(model_sampling, "karras", 10).tolist()
    assert guided_sigmas(every_n_steps=3) == pytest.approx([sigmas[i] for i in (0, 3, 6, 9)])
    windowed = guided_sigmas(every_n_steps=1, start_percent=0.5)
    start_sigma = model_sampling.percent_to_sigma(0.5)
    assert windowed == pytest.approx([s for s in sigmas[:-1] if s <= start_sigma]) and len(windowed) < 10
    # heun evaluates twice per step (its corrector at the next sigma first): each scheduled sigma is guided once
    heun_sigmas = comfy.samplers.calculate_sigmas(model_sampling, "karras", 6).tolist()
    assert guided_sigmas(steps=6, sampler="heun") == pytest.approx(heun_sigmas[:-1])


# ---------------------------------------------------------------- behaviour on the exact GMM


def test_vendi_of_a_sequential_batch_rises_with_scale():
    """Mode weights 0.05/0.05/0.05/0.85: unguided samples mostly share one direction. Each row is guided against
    the rows before it (batch_mode sequential); 24 rows, euler, 12 Karras steps, guidance every step, seeds 0-1."""
    scales = (0.0, 0.02, 0.1)
    for seed in (0, 1):
        scores = [core.vendi_score(gmm_batch(s, [0.05, 0.05, 0.05, 0.85], 24, seed)).item() for s in scales]
        assert scores == sorted(scores) and scores[-1] > scores[0] + 0.3, (seed, scores)


def test_exemplars_keep_generations_on_their_modes():
    """Weights 0.05/0.45/0.45/0.05, exemplars from modes 1 and 2. With beta = 2 the share of samples outside the
    exemplars' modes is no higher than unguided; plain VSG (beta = 0) drifts out to the other modes."""
    weights, n, exemplars = [0.05, 0.45, 0.45, 0.05], 32, point_images(MIX.means[[1, 2, 1, 2]])

    def outside(points):
        return float(((MIX.nearest_mode(points) == 0) | (MIX.nearest_mode(points) == 3)).double().mean())

    for seed in (0, 1):
        unguided = outside(gmm_batch(0.0, weights, n, seed))
        contextual = outside(gmm_batch(0.1, weights, n, seed, exemplars=exemplars, contextual_weight=2.0))
        plain_vsg = outside(gmm_batch(0.1, weights, n, seed, exemplars=exemplars, contextual_weight=0.0))
        assert contextual <= unguided < plain_vsg - 0.15, (seed, contextual, unguided, plain_vsg)


def test_joint_batch_mode_and_flow_models_diversify_too():
    weights = [0.05, 0.05, 0.05, 0.85]
    unguided = core.vendi_score(gmm_batch(0.0, weights, 24)).item()
    assert core.vendi_score(gmm_batch(0.1, weights, 24, batch_mode="joint")).item() > unguided + 0.3
    flow_unguided = core.vendi_score(gmm_batch(0.0, weights, 24, flavour="flow")).item()
    assert core.vendi_score(gmm_batch(0.1, weights, 24, flavour="flow")).item() > flow_unguided + 0.3


# ---------------------------------------------------------------- features


def tiny_clip_vision(tmp_path, seed=3):
    """A real comfy ClipVisionModel (ViT, 2 layers, width 32, 32 px), built in inference mode like a loader node."""
    config = {
        "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32, "intermediate_size": 64,
        "layer_norm_eps": 1e-5, "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3,
        "num_hidden_layers": 2, "patch_size": 8, "projection_dim": 16,
    }  # fmt: skip
    path = tmp_path / "tiny_clip_vision.json"
    path.write_text(json.dumps(config))
    with torch.inference_mode():
        clip_vision = comfy.clip_vision.ClipVisionModel(str(path))
        tiny_models.fill_seeded_(clip_vision.model, seed)
    return clip_vision


def tiny_vae_in_inference_mode():
    config = tiny_models.tiny_vae_config(4)
    with torch.inference_mode():
        donor = tiny_models.fill_seeded_(AutoencoderKL(**config["params"]), 0)
        return comfy.sd.VAE(sd=donor.state_dict(), config=config)


def test_clip_vision_features_match_comfyui_and_pass_gradients(tmp_path):
    clip_vision = tiny_clip_vision(tmp_path)
    assert next(clip_vision.model.parameters()).is_inference()
    features = vn.CLIPVisionFeatures.execute(clip_vision, True).result[0]
    images = torch.rand(2, 48, 40, 3, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        reference = clip_vision.encode_image(images)["image_embeds"].float()
        ours = features.embed_images(images)
        # ComfyUI's preprocessing rounds to 8 bit; ours does not: nearly equal embeddings
        assert torch.nn.functional.cosine_similarity(ours, reference).min() > 0.999
        with torch.inference_mode(False), torch.enable_grad(), vn.autograd_ready_weights(features.modules()):
            pixels = images.clone().requires_grad_(True)
            features.embed(pixels).square().sum().backward()
    assert torch.isfinite(pixels.grad).all() and pixels.grad.abs().sum() > 0
    assert next(clip_vision.model.parameters()).is_inference()  # weights restored


def test_guider_with_clip_features_decodes_through_the_vae(tmp_path):
    """Tiny SD1.5 UNet + tiny VAE + tiny CLIP vision, both loaded in inference mode: gradients flow through
    decode and CLIP, the result changes, and the bank stores CLIP embeddings."""
    model = tiny_models.build_tiny_model("sd15")
    positive = tiny_models.tiny_conditioning("sd15", 1)
    negative = [[torch.zeros_like(positive[0][0]), {}]]
    vae, features = tiny_vae_in_inference_mode(), vn.CLIPVisionFeatures.execute(tiny_clip_vision(tmp_path), True)
    features = features.result[0]
    shape, bank = tiny_models.latent_shape("sd15", 2), fresh_bank()
    exemplars = torch.rand(3, 40, 52, 3, generator=torch.Generator().manual_seed(1))
    try:
        plain = run(plain_guider(model, positive, negative, 2.0), shape, steps=6)
        g = guider(model, positive, negative, 2.0, 0.2, bank, vae=vae, features=features, exemplars=exemplars)
        guided = run(g, shape, steps=6)
        assert torch.isfinite(guided).all() and not torch.equal(guided, plain)
        first_row = run(plain_guider(model, positive, negative, 2.0), tiny_models.latent_shape("sd15", 1), steps=6)
        assert torch.equal(guided[:1], first_row)  # row 0 met an empty bank: unguided (sampled alone)
        ((key, rows),) = vn.MemoryBank(bank).sizes().items()
        assert key.startswith("clip_vision:") and rows == 2 and vn.MemoryBank(bank).read(key).shape == (2, 16)
        assert not model.get_additional_models_with_key(vn.ADDITIONAL_MODELS_KEY)  # input MODEL untouched
    finally:
        vn.MemoryBank(bank).clear()
    with pytest.raises(ValueError, match="vae: clip_vision.* features work on images"):
        guider(model, positive, negative, 2.0, 0.2, bank, features=features)


def test_latent_features_encode_exemplars_of_any_size_with_the_vae():
    vae = tiny_models.build_tiny_vae()
    features = vn.LatentFeatures.execute(4, vae).result[0]
    with torch.inference_mode():
        embedded = features.embed_images(torch.rand(2, 50, 70, 3), pixel_size=(64, 64))
    assert embedded.shape == (2, 4 * 4 * 4)
    with pytest.raises(ValueError, match="features: latent features embed images by encoding them"):
        vn.LatentFeatures.execute(4).result[0].embed_images(torch.rand(1, 64, 64, 3))


def test_vendi_score_node():
    g = torch.Generator().manual_seed(0)
    same = torch.rand(1, 32, 32, 3, generator=g).repeat(4, 1, 1, 1)
    assert vn.VendiScore.execute(same).result[0] == pytest.approx(1.0, abs=1e-6)
    # four images that are each one flat colour pattern in a different quadrant: orthogonal pixel features
    quadrants = torch.full((4, 32, 32, 3), 0.5)
    for i, (r, c) in enumerate(((0, 0), (0, 16), (16, 0), (16, 16))):
        quadrants[i, r : r + 16, c : c + 16] = 1.0
    assert vn.VendiScore.execute(quadrants).result[0] == pytest.approx(4.0, abs=1e-6)
    pixels = vn.PixelFeatures.execute(8).result[0]
    assert vn.VendiScore.execute(quadrants, pixels).result[0] == pytest.approx(4.0, abs=1e-6)


# ---------------------------------------------------------------- memory banks


def test_bank_persists_across_executions_clears_and_changes_guidance():
    weights, bank = [0.05, 0.45, 0.45, 0.05], fresh_bank()
    try:
        before = vn.VendiGuider.fingerprint_inputs(memory_bank=bank)
        first = gmm_batch(0.1, weights, 3, bank=bank)
        assert vn.MemoryBank(bank).sizes() == {"latent_pool4|GMMLatentFormat": 3}
        assert vn.VendiGuider.fingerprint_inputs(memory_bank=bank) != before  # the guider node re-runs
        second = gmm_batch(0.1, weights, 3, bank=bank)  # a second, separate execution with the same seed
        stored = vn.MemoryBank(bank).read("latent_pool4|GMMLatentFormat")
        assert stored.shape == (6, 2)
        torch.testing.assert_close(stored[:3].double(), first, rtol=0, atol=1e-6)  # appended after generation
        assert not torch.equal(first[0], second[0])  # row 0 now meets a non-empty bank
        assert vn.VendiClearBank.execute(bank).result[0] == bank
        assert vn.MemoryBank(bank).sizes() == {} and not vn.MemoryBank(bank).path.exists()
        assert torch.equal(gmm_batch(0.1, weights, 3, bank=bank), first)  # cleared: as at the start
        assert not list(pack("nodes.vendi_bank").bank_directory().glob("*.partial"))
    finally:
        vn.MemoryBank(bank).clear()


@pytest.mark.parametrize("bad", ["", "../escape", "a/b", "a\\b", ".hidden", "trailing.", "CON", "nul.txt", "x" * 65])
def test_bad_bank_names_are_rejected_with_a_clear_error(bad):
    message = f"memory_bank: {bad!r} is not a valid bank name"
    assert vn.VendiGuider.validate_inputs(memory_bank=bad).startswith(message)
    assert vn.VendiClearBank.validate_inputs(memory_bank=bad).startswith(message)
    with pytest.raises(ValueError, match="is not a valid bank name"):
        guider(tiny_models.build_gmm_model(), [], [], 1.0, 0.1, bad)
    assert vn.VendiGuider.validate_inputs(memory_bank="my bank_2.v-1") is True


def test_a_failed_write_leaves_the_bank_intact(monkeypatch):
    bank = vn.MemoryBank(fresh_bank())
    try:
        bank.append("k", torch.ones(2, 3))

        def broken_replace(src, dst):
            raise OSError("disk full")

        monkeypatch.setattr(os, "replace", broken_replace)
        with pytest.raises(OSError, match="disk full"):
            bank.append("k", torch.zeros(5, 3))
        monkeypatch.undo()
        assert bank.sizes() == {"k": 2} and not list(bank.path.parent.glob("*.partial"))
        with pytest.raises(ValueError, match="holds 3-dim features"):
            bank.append("k", torch.zeros(1, 4))
    finally:
        bank.clear()


# ---------------------------------------------------------------- server: restart, graph clear, HTTP routes


def vendi_prompt(bank, clear_first=False, batch=3):
    prompt = {
        "model": {"class_type": "TLTest_GMMModel", "inputs": {"flavour": "eps", "preset": "four_modes"}},
        "pos": {"class_type": "TLTest_GMMConditioning", "inputs": {"weights": "0.05,0.45,0.45,0.05"}},
        "latent": {"class_type": "TLTest_GMMLatent", "inputs": {"preset": "four_modes", "batch": batch}},
        "guider": {"class_type": "TL_VendiGuider", "inputs": {
            "model": ["model", 0], "positive": ["pos", 0], "negative": ["pos", 0], "cfg": 1.0, "scale": 0.1,
            "contextual_weight": 2.0, "every_n_steps": 1, "memory_bank": bank}},
        "noise": {"class_type": "RandomNoise", "inputs": {"noise_seed": 0}},
        "sampler": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {
            "model": ["model", 0], "scheduler": "karras", "steps": 10, "denoise": 1.0}},
        "sample": {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["noise", 0], "guider": ["guider", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0], "filename_prefix": "vendi"}},
    }  # fmt: skip
    if clear_first:
        prompt["clear"] = {"class_type": "TL_VendiClearBank", "inputs": {"memory_bank": bank}}
        prompt["guider"]["inputs"]["memory_bank"] = ["clear", 0]
    return prompt


@pytest.mark.server
def test_bank_survives_a_server_restart_and_clears_from_graph_and_http(tmp_path):
    """Needs TL_VendiGuider and TL_VendiClearBank registered in nodes/__init__.py. Two servers, one base dir."""
    custom_nodes = {PACK_FOLDER: PACK_ROOT, TEST_NODES_FOLDER: TESTS_DIR / TEST_NODES_FOLDER}
    bank = "restart test"

    def total(server):
        return server.get_json(f"/trajectory_lab/vendi/banks/{bank.replace(' ', '%20')}")["total"]

    with ServerHost(custom_nodes, extra_pythonpath=[TESTS_DIR], base=tmp_path) as first:
        registered = first.get_json("/object_info/TL_VendiGuider")
        assert registered, "TL_VendiGuider is not registered: add nodes.vendi.NODES to nodes/__init__.py"
        assert total(first) == 0
        first.run(vendi_prompt(bank))
        assert total(first) == 3
        first.run(vendi_prompt(bank))  # the same prompt again: the bank changed, so ComfyUI's cache must not hit
        assert total(first) == 6
    assert (tmp_path / "user" / "trajectory_lab" / "vendi_banks" / f"{bank}.safetensors").is_file()
    with ServerHost(custom_nodes, extra_pythonpath=[TESTS_DIR], base=tmp_path) as second:
        assert total(second) == 6  # persisted in the user directory across the restart
        banks = second.get_json("/api/trajectory_lab/vendi/banks")["banks"]
        assert banks == {bank: {"latent_pool4|GMMLatentFormat": 6}}
        second.run(vendi_prompt(bank))
        assert total(second) == 9
        second.run(vendi_prompt(bank, clear_first=True))  # TL_VendiClearBank ahead of the guider
        assert total(second) == 3
        assert second.post_json("/trajectory_lab/vendi/clear", {"name": bank}) == {"name": bank, "cleared": 3}
        assert total(second) == 0
        with pytest.raises(PromptError, match=r"400: .*is not a valid bank name"):
            second.post_json("/trajectory_lab/vendi/clear", {"name": "../user"})
        with pytest.raises(PromptError, match="is not a valid bank name"):
            second.run(vendi_prompt("../escape"))
