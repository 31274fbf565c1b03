"""FlowTurbo: the plan's accuracy on the exact GMM flow, refiners (oracle, trained) and the nodes in the host."""

import json
import logging
import sys

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import numpy as np
import pytest
import tiny_models
import torch
from gmm_exact import GaussianMixture, flow_alpha
from harness import pack
from probes import count_calls
from test_steppers import reference_ode

ft = pack("samplers.flowturbo")

GMM = GaussianMixture(means=[[-2.0], [0.5], [2.5]], weights=[0.3, 0.2, 0.5], stds=[0.4, 0.3, 0.5])


def denoise(x, sigma):
    return GMM.denoise(x, sigma, flow_alpha)


def exact_velocity(x, sigma):
    return (x - denoise(x, sigma)) / sigma.reshape(-1, *([1] * (x.ndim - 1)))


def oracle_refiner(x, sigma, v):
    return exact_velocity(x, sigma) - v


def schedule(n, shift=1.0):
    """A flow schedule from 0.97 to 0 (shift > 1: SD3-style time shift, more steps at high noise)."""
    t = torch.linspace(0.97, 0.0, n + 1, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


X_START = torch.linspace(-3, 3, 16, dtype=torch.float64)[:, None] * 0.97


def counted():
    calls = [0]

    def d(x, s):
        calls[0] += 1
        return denoise(x, s)

    return d, calls


def solve(plan_fn, n, refiner=None, update="consistent", shift=1.0):
    sigmas = schedule(n, shift)
    d, calls = counted()
    out = ft.sample_flowturbo(d, X_START, sigmas, plan_fn(n), refiner, update)
    # The reference stops at the last nonzero sigma; the final Euler step to 0 then maps it exactly like ours.
    return out, calls[0], sigmas


def errors(plan_fn, ns, refiner=None, update="consistent", shift=1.0):
    errs = []
    for n in ns:
        sigmas = schedule(n, shift)
        out = ft.sample_flowturbo(denoise, X_START, sigmas, plan_fn(n), refiner, update)
        ref = reference_ode(X_START, sigmas[:-1], flow_alpha)
        # Exact last step: from the reference at sigma_{N-1} with a fresh-velocity Euler step, as the plan does.
        s = sigmas[-2].reshape(1)
        ref_final = ref - s * exact_velocity(ref, s.expand(ref.shape[0]))
        errs.append((out - ref_final).abs().max().item())
    return errs


def slope(ns, errs):
    return -np.polyfit(np.log(ns), np.log(errs), 1)[0]


NS = [16, 32, 64, 128]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_orders_heun_two_pseudo_corrector_two(shift):
    heun = errors(lambda n: ft.make_plan(n, n, 0), NS, shift=shift)
    pseudo = errors(lambda n: ft.make_plan(n, 1, 0), NS, shift=shift)
    assert 1.8 < slope(NS, heun) < 2.3, heun
    assert 1.7 < slope(NS, pseudo) < 2.3, pseudo


def test_pseudo_corrector_beats_heun_at_equal_model_calls():
    # Heun with n steps costs 2n - 1 calls; H1 P(m-1) costs m + 1 (Heun 2, each P 1, the final Euler 1 instead).
    for n in (8, 16, 32):
        heun, heun_calls, _ = solve(lambda k: ft.make_plan(k, k, 0), n)
        m = 2 * n - 2
        pseudo, pseudo_calls, _ = solve(lambda k: ft.make_plan(k, 1, 0), m)
        assert heun_calls == pseudo_calls == 2 * n - 1
        ref = reference_ode(X_START, schedule(4 * n)[:-1], flow_alpha)
        s = schedule(4 * n)[-2].reshape(1)
        exact = ref - s * exact_velocity(ref, s.expand(ref.shape[0]))
        assert (pseudo - exact).abs().max() < (heun - exact).abs().max()


def test_oracle_refiner_reproduces_heun_and_the_released_update_loses_an_order():
    n = 24
    heun, _, _ = solve(lambda k: ft.make_plan(k, k, 0), n)
    refined, calls, _ = solve(lambda k: ft.make_plan(k, 1, k - 1), n, oracle_refiner)
    assert calls == 2  # one Heun step; the refiner steps call no model
    torch.testing.assert_close(refined, heun, rtol=1e-10, atol=1e-10)
    consistent = errors(lambda k: ft.make_plan(k, 1, k - 1), NS, oracle_refiner)
    released = errors(lambda k: ft.make_plan(k, 1, k - 1), NS, oracle_refiner, "released")
    assert 1.8 < slope(NS, consistent) < 2.3 and 0.7 < slope(NS, released) < 1.3, (consistent, released)


@pytest.mark.parametrize("heun,refine", [(3, 0), (2, 3), (0, 0), (5, 5)])
def test_model_calls_per_plan_are_exact(heun, refine):
    n = 10
    _, calls, _ = solve(lambda k: ft.make_plan(k, heun, refine), n, oracle_refiner)
    plan = ft.make_plan(n, heun, refine)
    # H: 2, P: 1 (the very first step, lacking a cache, evaluates d0 fresh: +1), R: 0; the final step is Euler.
    expected = 2 * heun + plan.pseudo + (1 if heun == 0 and plan.pseudo else 0)
    last = plan.kind(n - 1)
    expected += {"H": -1, "P": 0, "R": 0}[last]
    assert calls == expected


def test_plan_errors():
    with pytest.raises(ValueError, match="exceed the 10 steps"):
        ft.make_plan(10, 6, 5)
    with pytest.raises(ValueError, match="needs a refiner"):
        ft.sample_flowturbo(denoise, X_START, schedule(4), ft.make_plan(4, 1, 2))


def test_refine_steps_need_a_model_step_before_them():
    """A refiner step updates a cached model velocity: heun_steps 0 with refine_steps = every step has none to update
    (it used to stop on a bare assert in the middle of sampling). The plan refuses it up front, naming the inputs;
    one pseudo-corrector step first (its velocity evaluated fresh) is enough."""
    with pytest.raises(ValueError, match=r"refine_steps \(4\) needs at least one Heun or pseudo-corrector step"):
        ft.make_plan(4, 0, 4)
    assert str(ft.make_plan(4, 0, 3)) == "H0P1R3"
    out = ft.sample_flowturbo(denoise, X_START, schedule(4), ft.make_plan(4, 0, 3), oracle_refiner)
    heun = ft.sample_flowturbo(denoise, X_START, schedule(4), ft.make_plan(4, 4, 0))
    torch.testing.assert_close(out, heun, rtol=1e-10, atol=1e-10)  # an exact refiner after P1 is Heun


# ---------------------------------------------------------------- the nodes in the real host

ftn = pack("nodes.flowturbo")


def train(model, cond, shape, name, **overrides):
    settings = dict(cfg=1.0, steps=20, samples=64, batch_size=8, learning_rate=1e-3, ema_decay=0.9, hidden=16,
                    resume=True)  # fmt: skip
    settings.update(overrides)
    iterations = settings.pop("iterations", 5)
    latent = {"samples": torch.zeros(shape)}
    with torch.inference_mode():  # as ComfyUI runs nodes
        return ftn.TrainVelocityRefiner.execute(model, cond, cond, latent, iterations, 0, name, **settings).result[0]


def sample_with(model, sampler, steps, cond, latent, seed=5, cfg=1.0):
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", steps)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample_custom(model, noise, cfg, sampler, sigmas, cond, cond, latent, seed=0, disable_pbar=True)


def flowturbo(heun, refine, refiner=None, update="consistent"):
    return ftn.FlowTurboSampler.execute(heun, refine, refiner, update).result[0]


def test_refiner_trained_by_the_node_beats_the_pseudo_corrector_at_equal_calls():
    """1-D two-mode GMM flow model; refiner distilled by TL_TrainVelocityRefiner from 2000 model samples (800
    iterations). H1P3R4 (8 steps) and H1P3 (4 steps) both cost 5 model calls; error = mean |x - x_ref| over 512
    samples against Heun with 200 steps from the same noise."""
    model = tiny_models.build_gmm_model("flow", "two_modes_1d")
    cond = tiny_models.gmm_conditioning([0, 0])
    shape = tiny_models.gmm_latent_shape("two_modes_1d", 1)
    refiner = train(model, cond, shape, "gmm_refiner", iterations=800, samples=2000, batch_size=256,
                    learning_rate=1e-2, hidden=64, resume=False)  # fmt: skip
    latent = torch.zeros(tiny_models.gmm_latent_shape("two_modes_1d", 512))
    reference = sample_with(model, comfy.samplers.sampler_object("heun"), 200, cond, latent)
    refined = (sample_with(model, flowturbo(1, 4, refiner), 8, cond, latent) - reference).abs().mean()
    plain = (sample_with(model, flowturbo(1, 0), 4, cond, latent) - reference).abs().mean()
    assert refined < 0.8 * plain, (refined, plain)


def test_training_resumes_and_cancel_keeps_progress(monkeypatch):
    model = tiny_models.build_tiny_model("flux")
    cond = tiny_models.tiny_conditioning("flux", 1)
    shape = tiny_models.latent_shape("flux")
    train(model, cond, shape, "resume_me", iterations=3, samples=2, steps=2, resume=False)
    refiner = train(model, cond, shape, "resume_me", iterations=5, samples=2, steps=2)
    assert refiner.metadata["iteration"] == 5
    calls = {"n": 0}
    original = comfy.model_management.throw_exception_if_processing_interrupted

    def cancel_after_two():  # Cancel pressed during the second training iteration
        if sys._getframe(1).f_code.co_name == "on_iteration":
            calls["n"] += 1
        if calls["n"] == 2:
            raise comfy.model_management.InterruptProcessingException()
        original()

    monkeypatch.setattr(comfy.model_management, "throw_exception_if_processing_interrupted", cancel_after_two)
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        train(model, cond, shape, "resume_me", iterations=50, samples=2, steps=2)
    monkeypatch.undo()
    _, _, _, metadata = ftn.load_refiner_file(ftn.refiner_path("resume_me"))
    assert metadata["iteration"] == "7"  # 5 before, then 2 more before Cancel: saved, resumable
    with pytest.raises(ValueError, match="holds a refiner for Flux"):
        train(tiny_models.build_tiny_model("sd3"), tiny_models.tiny_conditioning("sd3", 1),
              tiny_models.latent_shape("sd3"), "resume_me")  # fmt: skip
    with pytest.raises(ValueError, match="name: '../x' must be"):
        train(model, cond, shape, "../x")


@pytest.mark.parametrize("arch", ["sd3", "flux", "wan21"])
def test_train_save_load_sample_end_to_end(host, arch):
    """Through ComfyUI's graph: train a few iterations, then load the saved file by name and sample with it."""
    name = f"e2e_{arch}"
    prompt = {
        "model": {"class_type": "TLTest_TinyModel", "inputs": {"arch": arch, "seed": 0}},
        "pos": {"class_type": "TLTest_TinyConditioning", "inputs": {"arch": arch, "seed": 1, "batch": 1}},
        "neg": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["pos", 0]}},
        "latent": {"class_type": "TLTest_TinyLatent", "inputs": {"arch": arch, "batch": 1}},
        "train": {"class_type": "TL_TrainVelocityRefiner", "inputs": {
            "model": ["model", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent": ["latent", 0],
            "iterations": 3, "seed": 0, "name": name, "samples": 2, "steps": 2, "hidden": 8, "resume": False}},
        "sampler": {"class_type": "TL_FlowTurboSampler", "inputs": {"heun_steps": 1, "refine_steps": 3,
                                                                    "refiner": ["train", 0]}},
        "sigmas": {"class_type": "BasicScheduler", "inputs": {"model": ["model", 0], "scheduler": "simple",
                                                              "steps": 6, "denoise": 1.0}},
        "sample": {"class_type": "SamplerCustom", "inputs": {
            "model": ["model", 0], "add_noise": True, "noise_seed": 0, "cfg": 2.0, "positive": ["pos", 0],
            "negative": ["neg", 0], "sampler": ["sampler", 0], "sigmas": ["sigmas", 0],
            "latent_image": ["latent", 0]}},
    }  # fmt: skip
    out = host.run(prompt)["sample"][0]["samples"]
    assert tuple(out.shape) == tiny_models.latent_shape(arch) and torch.isfinite(out).all()
    loaded = ftn.LoadVelocityRefiner.execute(f"{name}.safetensors").result[0]
    assert loaded.base.model_config == type(tiny_models.build_tiny_model(arch).model.model_config).__name__
    model = tiny_models.build_tiny_model(arch)
    cond = tiny_models.tiny_conditioning(arch, 1)
    latent = torch.zeros(tiny_models.latent_shape(arch))
    a = sample_with(model, flowturbo(1, 3, loaded), 6, cond, latent)
    assert torch.equal(a, sample_with(model, flowturbo(1, 3, loaded), 6, cond, latent))  # deterministic
    other = "sd3" if arch != "sd3" else "flux"
    with pytest.raises(ValueError, match="refiner: trained for"):
        sample_with(tiny_models.build_tiny_model(other), flowturbo(1, 3, loaded), 6,
                    tiny_models.tiny_conditioning(other, 1), torch.zeros(tiny_models.latent_shape(other)))  # fmt: skip


def test_node_model_calls_and_eps_models():
    """Calls per plan through ComfyUI (H2P5R3: 2+2+5+0, final step R: Euler on the refined velocity), and the
    VE velocity on an EPS model: the GMM EPS model with H1P(n-1) lands close to Heun with many steps."""
    model = tiny_models.build_gmm_model("flow", "two_modes_1d")
    cond = tiny_models.gmm_conditioning([0, 0])
    latent = torch.zeros(tiny_models.gmm_latent_shape("two_modes_1d", 64))
    zero_refiner = ftn.VelocityRefiner(ftn.new_refiner(1, True, 8)[1], ftn.BaseModelInfo.of(model.model))
    calls = []
    counted = model.clone()
    counted.set_model_unet_function_wrapper(lambda apply, args: calls.append(1) or apply(args["input"],
                                            args["timestep"], **args["c"]))  # fmt: skip
    sample_with(counted, flowturbo(2, 3, zero_refiner), 10, cond, latent)
    assert len(calls) == 2 * 2 + 5
    eps = tiny_models.build_gmm_model("eps", "two_modes_1d")
    reference = sample_with(eps, comfy.samplers.sampler_object("heun"), 200, cond, latent)
    pseudo = sample_with(eps, flowturbo(1, 0), 30, cond, latent)
    euler = sample_with(eps, comfy.samplers.sampler_object("euler"), 30, cond, latent)
    assert (pseudo - reference).abs().mean() < 0.5 * (euler - reference).abs().mean()


def test_sampler_errors():
    with pytest.raises(ValueError, match="refiner: refine_steps = 2 needs a refiner"):
        flowturbo(1, 2)
    model = tiny_models.build_gmm_model("flow", "two_modes_1d")
    zero_refiner = ftn.VelocityRefiner(ftn.new_refiner(1, True, 8)[1], ftn.BaseModelInfo.of(model.model))
    with pytest.raises(ValueError, match=r"refine_steps \(4\) needs at least one Heun or pseudo-corrector step"):
        sample_with(model, flowturbo(0, 4, zero_refiner), 4, tiny_models.gmm_conditioning([0, 0]),
                    torch.zeros(tiny_models.gmm_latent_shape("two_modes_1d", 2)))  # fmt: skip


# ---------------------------------------------------------------- devices, chunked data, exact resume, training cfg


def test_refiner_runs_on_the_latents_device_and_is_not_moved_itself():
    """Trained and loaded refiners sit on CPU; sampling runs where the latents are. The "meta" device stands in for a
    GPU here: a CPU weight meeting a meta tensor raises "Tensor on device cpu is not on the expected device meta!",
    as a CPU refiner meets CUDA latents. The refiner's own network (a node output other graphs share) stays on
    CPU; the copy for the device is made once. A float64 latent gets float64 corrections computed in float32."""
    _, ema = random_refiner(pooled_dim=4)
    refiner = ftn.VelocityRefiner(ema.eval(), ftn.BaseModelInfo("Flux", 16, True))
    g = torch.Generator().manual_seed(0)
    x, v, pooled = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g), torch.randn(1, 4)
    sigma = torch.tensor([0.5, 0.25])
    refine = refiner.function(False, pooled)
    for _ in range(2):
        out = refine(x.double().to("meta"), sigma.to("meta"), v.double().to("meta"))
        assert out.device.type == "meta" and out.shape == x.shape and out.dtype == torch.float64
    assert list(refiner._placed) == [torch.device("meta")]
    assert all(p.device.type == "cpu" for p in refiner.net.parameters())
    by_hand = ema(x, sigma, v, pooled.repeat(2, 1))
    torch.testing.assert_close(refine(x.double(), sigma.double(), v.double()), by_hand.double(), rtol=0, atol=0)


def test_training_batches_are_built_on_the_training_device():
    """The training draws come from a CPU generator while ComfyUI's sigmas, the samples and the model live on the
    sampling device. With the samples on "meta" (a stand-in for a GPU) every tensor the base model's velocity sees
    and every returned tensor must be there; the same with CPU samples and device="meta" (how the node keeps its
    samples on CPU and trains on the model's device). A mix raises on any cross-device operation."""
    vr = pack("samplers.velocity_refiner")
    seen = []

    def velocity(x, sigma):
        seen.append((x.device.type, sigma.device.type))
        return torch.zeros_like(x)

    sigmas = torch.linspace(1.0, 0.0, 11)
    for data, device in ((torch.zeros(12, 4, 2, 2, device="meta"), None), (torch.zeros(12, 4, 2, 2), "meta")):
        seen.clear()
        out = vr.sample_training_pair(velocity, data, sigmas, True, 8, 0.12, torch.Generator().manual_seed(0),
                                      device=device)  # fmt: skip
        assert [t.device.type for t in out] == ["meta"] * 4 and [t.shape[0] for t in out] == [8] * 4
        assert seen == [("meta", "meta")] * 2


def capture_training_data(monkeypatch):
    """Record the samples TL_TrainVelocityRefiner hands to training."""
    captured = []
    train_fn = ftn.train_velocity_refiner

    def recording(net, ema, velocity, data, *args, **kwargs):
        captured.append(data.clone())
        return train_fn(net, ema, velocity, data, *args, **kwargs)

    monkeypatch.setattr(ftn, "train_velocity_refiner", recording)
    return captured


def test_training_samples_are_generated_batch_size_rows_at_a_time_equal_to_one_batch(monkeypatch):
    """All `samples` rows in one model call would not fit at full size (up to 100k samples): the node generates them
    batch_size rows per call (the batch training runs the model at). The result must be the one-batch result:
    reference = ComfyUI's own euler sampler over the same noise (torch.randn seeded with the node's seed) and the
    node's sigmas in one 5-row batch, on the tiny Flux model (real batched kernels), to 1e-5."""
    captured = capture_training_data(monkeypatch)
    flux = tiny_models.build_tiny_model("flux")
    model, calls = count_calls(flux)
    cond = tiny_models.tiny_conditioning("flux", 1)
    shape = tiny_models.latent_shape("flux", 5)
    train(model, cond, tiny_models.latent_shape("flux"), "chunked", iterations=1, samples=5, steps=3, batch_size=2,
          resume=False)  # fmt: skip
    assert calls == [2] * 6 + [1] * 3 + [2, 2]  # 3 chunks x 3 Euler steps, then one training batch (2 calls)
    sigmas = comfy.samplers.calculate_sigmas(flux.get_model_object("model_sampling"), "normal", 3)
    assert sigmas[0] == 1.0  # the flow start x = sigma_0 * noise, whatever the latent
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    one_batch = comfy.sample.sample_custom(flux, noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas, cond,
                                           cond, torch.zeros(shape), seed=0, disable_pbar=True)  # fmt: skip
    # sample_custom returns latents through the Flux latent format; the node keeps model-space samples
    torch.testing.assert_close(captured[0], flux.model.process_latent_in(one_batch), rtol=1e-5, atol=1e-5)


# What a refiner file's metadata held before the optimizer state and the training settings were saved.
METADATA_BEFORE_OPTIMIZER_STATE = {"format", "model_config", "latent_channels", "flow", "latent_shape", "hidden",
                                   "iteration", "pooled_dim"}  # fmt: skip


def refiner_tensors(name):
    import safetensors.torch

    return safetensors.torch.load_file(ftn.refiner_path(name))


def test_resume_continues_exactly_and_files_without_optimizer_state_still_load_and_resume():
    """3 iterations, then resuming to 5, equals 5 in one go (weights, EMA, AdamW moments and step, random stream; to
    1e-7): the file keeps AdamW's state and the training draws' stream. A file as saved before that (no optimizer
    state, stream or training settings) still loads and samples, and resumes as such files always did (a fresh
    optimizer, the stream restarted at seed + 3): its weights then land measurably elsewhere (3.6e-2 measured; bar
    1e-4), which shows the comparison can tell the two apart."""
    import safetensors.torch

    model = tiny_models.build_tiny_model("flux")
    cond = tiny_models.tiny_conditioning("flux", 1)
    shape = tiny_models.latent_shape("flux")
    settings = dict(samples=4, steps=2, learning_rate=1e-2)
    train(model, cond, shape, "straight", iterations=5, resume=False, **settings)
    train(model, cond, shape, "resumed", iterations=3, resume=False, **settings)
    path = ftn.refiner_path("resumed")
    with safetensors.safe_open(path, "pt") as f:
        metadata = {k: v for k, v in f.metadata().items() if k in METADATA_BEFORE_OPTIMIZER_STATE}
    old = {k: v for k, v in refiner_tensors("resumed").items() if k.startswith(("net.", "ema."))}
    safetensors.torch.save_file(old, ftn.refiner_path("old_format_3"), metadata=metadata)
    loaded = ftn.LoadVelocityRefiner.execute("old_format_3.safetensors").result[0]
    assert loaded.training_cfg is None and loaded.metadata["iteration"] == "3"
    sample_with(model, flowturbo(1, 3, loaded), 6, cond, torch.zeros(shape))

    train(model, cond, shape, "resumed", iterations=5, **settings)
    straight, resumed = refiner_tensors("straight"), refiner_tensors("resumed")
    assert straight.keys() == resumed.keys() and any(k.startswith("optimizer.") for k in straight)
    for key, value in straight.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-7, msg=key)
    train(model, cond, shape, "old_format_3", iterations=5, **settings)
    fresh = refiner_tensors("old_format_3")
    apart = max((fresh[k] - straight[k]).abs().max().item() for k in straight if k.startswith("net."))
    print(f"fresh optimizer after 3 iterations: weights {apart:.2e} from the uninterrupted run")
    assert apart > 1e-4
    train(model, cond, shape, "resumed", iterations=6, **{**settings, "learning_rate": 5e-3})
    _, _, _, metadata = ftn.load_refiner_file(ftn.refiner_path("resumed"))
    assert json.loads(metadata["optimizer_param_groups"])[0]["lr"] == 5e-3  # a resumed run takes the new rate


def test_training_cfg_is_recorded_and_sampling_at_another_cfg_warns(caplog):
    """The file records the cfg of the training samples (and how they were made); a loaded or freshly trained
    refiner warns when sampled at another cfg, and only then."""
    model = tiny_models.build_tiny_model("flux")
    cond = tiny_models.tiny_conditioning("flux", 1)
    shape = tiny_models.latent_shape("flux")
    trained = train(model, cond, shape, "cfg_2_5", iterations=1, samples=2, steps=2, cfg=2.5, resume=False)
    _, _, _, metadata = ftn.load_refiner_file(ftn.refiner_path("cfg_2_5"))
    assert (metadata["cfg"], metadata["seed"], metadata["sample_steps"], metadata["samples"]) == ("2.5", "0", "2", "2")
    loaded = ftn.LoadVelocityRefiner.execute("cfg_2_5.safetensors").result[0]
    assert loaded.training_cfg == trained.training_cfg == 2.5
    latent = torch.zeros(shape)

    def warnings_at(refiner, cfg):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            sample_with(model, flowturbo(1, 3, refiner), 6, cond, latent, cfg=cfg)
        return [r.getMessage() for r in caplog.records if "trained at cfg" in r.getMessage()]

    assert warnings_at(loaded, 2.5) == [] and warnings_at(trained, 2.5) == []
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # resuming at another cfg is allowed, and said
        train(model, cond, shape, "cfg_2_5_more", iterations=1, samples=2, steps=2, cfg=2.5, resume=False)
        train(model, cond, shape, "cfg_2_5_more", iterations=2, samples=2, steps=2, cfg=3.0)
    assert [r.getMessage() for r in caplog.records if "resuming at cfg" in r.getMessage()] == [
        "TL_TrainVelocityRefiner: cfg_2_5_more was trained at cfg 2.5; resuming at cfg 3"
    ]
    assert warnings_at(loaded, 4.0) == ["TL_FlowTurboSampler: the refiner was trained at cfg 2.5 but this run samples "
                                        "at cfg 4; its corrections fit the training cfg (train it with cfg 4 for this "
                                        "run)"]  # fmt: skip


# ---------------------------------------------------------------- pooled conditioning, old files, compilation


def test_refiner_sees_the_positive_prompts_pooled_conditioning_in_training_and_sampling(monkeypatch):
    """Tiny Flux (pooled_output: CLIP-L style vector): the trained refiner has a pooled projection, and every refiner
    call, in training and in FlowTurbo's R steps, gets the positive prompt's pooled vector for each row."""
    seen = []
    forward = ftn.VelocityRefinerNet.forward

    def recording(self, x, sigma, v, pooled=None):
        if x.ndim == 4:
            seen.append(pooled)
        return forward(self, x, sigma, v, pooled)

    monkeypatch.setattr(ftn.VelocityRefinerNet, "forward", recording)
    model = tiny_models.build_tiny_model("flux")
    cond = tiny_models.tiny_conditioning("flux", 1, batch=2)  # two prompts: rows alternate between them
    pooled = cond[0][1]["pooled_output"]
    refiner = train(model, cond, tiny_models.latent_shape("flux"), "pooled_flux", iterations=3, samples=4, steps=2,
                    resume=False)  # fmt: skip
    assert refiner.net.pooled_dim == pooled.shape[-1]
    assert len(seen) == 3 and all(torch.equal(p, pooled.repeat(4, 1)) for p in seen)  # batch_size 8 rows
    assert ftn.load_refiner_file(ftn.refiner_path("pooled_flux"))[3]["pooled_dim"] == str(pooled.shape[-1])
    seen.clear()
    sample_with(model, flowturbo(1, 3, refiner), 6, cond, torch.zeros(tiny_models.latent_shape("flux", 2)))
    assert len(seen) == 2 * 3 - 1  # R steps: d0 and d1 refined, the final one Euler on d0 only
    assert all(torch.equal(p, pooled) for p in seen)
    x, v, sigma = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), torch.tensor([0.5, 0.5])
    assert not torch.equal(refiner.function(False, pooled)(x, sigma, v), refiner.function(False, -pooled)(x, sigma, v))
    with pytest.raises(ValueError, match=r"refiner: trained with a \d+-feature pooled conditioning .* has none"):
        refiner.function(False, None)
    with pytest.raises(ValueError, match=r"refiner: .* but the positive conditioning has 3 features"):
        refiner.function(False, torch.zeros(1, 3))


def test_training_rows_draw_samples_of_their_own_prompt():
    """With P prompts, data row i was generated with prompt i % P, and ComfyUI gives training row j prompt j % P:
    row j must draw from data rows = j (mod P). Data row i holds the value i % 3; at sigma ~ 0 x is the data."""
    vr = pack("samplers.velocity_refiner")
    data = (torch.arange(12) % 3).float()[:, None, None, None].expand(12, 1, 2, 2).clone()
    sigmas = torch.tensor([1e-6, 5e-7, 0.0])
    x, _, _, _ = vr.sample_training_pair(lambda x, s: torch.zeros_like(x), data, sigmas, True, 10, 0.12,
                                         torch.Generator().manual_seed(0), prompts=3)  # fmt: skip
    torch.testing.assert_close(x.mean((1, 2, 3)), (torch.arange(10) % 3).float(), atol=1e-4, rtol=0)
    one_prompt, *_ = vr.sample_training_pair(lambda x, s: torch.zeros_like(x), data, sigmas, True, 64, 0.12,
                                             torch.Generator().manual_seed(0))  # fmt: skip
    assert set(one_prompt.mean((1, 2, 3)).round().tolist()) == {0.0, 1.0, 2.0}  # one prompt: any row
    with pytest.raises(ValueError, match="samples: 12 model samples cannot cover 13 prompts"):
        vr.sample_training_pair(lambda x, s: x, data, sigmas, True, 4, 0.12, torch.Generator(), prompts=13)


def random_refiner(pooled_dim=0):
    """(net, ema) for the tiny Flux latents with seeded random EMA weights, so the refiner changes samples."""
    net, ema = ftn.new_refiner(16, True, 8, pooled_dim)
    with torch.no_grad():
        for p in ema.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.1)
    return net, ema


def test_refiners_saved_before_pooled_conditioning_still_load_and_sample():
    """A file as the first release wrote it (no pooled_dim in the metadata, no pooled weights) loads, ignores the
    model's pooled conditioning, and samples exactly like the network it was saved from."""
    import safetensors.torch

    model = tiny_models.build_tiny_model("flux")
    net, ema = random_refiner()
    path = ftn.refiner_path("old_format")
    ftn.save_refiner(path, net, ema, ftn.BaseModelInfo.of(model.model), (16, 8, 8), 10)
    with safetensors.safe_open(path, "pt") as f:
        metadata = f.metadata()
    del metadata["pooled_dim"]
    safetensors.torch.save_file(safetensors.torch.load_file(path), path, metadata=metadata)
    loaded = ftn.LoadVelocityRefiner.execute("old_format.safetensors").result[0]
    assert loaded.net.pooled_dim == 0 and not hasattr(loaded.net, "pooled")
    cond = tiny_models.tiny_conditioning("flux", 1)
    latent = torch.zeros(tiny_models.latent_shape("flux"))
    direct = ftn.VelocityRefiner(ema.eval(), ftn.BaseModelInfo.of(model.model))
    assert loaded.training_cfg is None  # not recorded then: sampling at any cfg stays silent
    assert torch.equal(sample_with(model, flowturbo(1, 3, loaded), 6, cond, latent),
                       sample_with(model, flowturbo(1, 3, direct), 6, cond, latent))  # fmt: skip


def test_compiled_refiner_matches_the_eager_one():
    """compile_refiner on CPU: H1P1R4 on the tiny Flux model with a refiner of random weights (and a pooled
    projection) gives the eager samples to float tolerance, and the refiner is compiled once and reused. The backend
    is aot_eager: Dynamo capture and AOT tracing of the refiner as the node runs them, without inductor's C++ code
    generation, which takes 38-50 s from a cold cache on this CPU (17 s warm) - too slow for the suite."""
    model = tiny_models.build_tiny_model("flux")
    _, ema = random_refiner(pooled_dim=tiny_models.COND_DIMS["flux"][1])
    refiner = ftn.VelocityRefiner(ema.eval(), ftn.BaseModelInfo.of(model.model), compile_backend="aot_eager")
    cond = tiny_models.tiny_conditioning("flux", 1)
    latent = torch.zeros(tiny_models.latent_shape("flux", 2))

    def run(compile_):
        sampler = ftn.FlowTurboSampler.execute(1, 4, refiner, "consistent", compile_).result[0]
        return sample_with(model, sampler, 6, cond, latent)

    eager = run(False)
    compiled = run(True)
    assert list(refiner._compiled) == [torch.device("cpu")]
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
    assert not torch.equal(eager, sample_with(model, flowturbo(1, 0), 6, cond, latent))  # the refiner acts
    assert torch.equal(run(True), compiled)  # reused, deterministic


def test_a_model_compiled_by_comfyui_runs_the_heun_and_pseudo_corrector_steps():
    """The H and P blocks' cost is the model: ComfyUI's own TorchCompileModel wrapper (set_torch_compile_wrapper,
    here with the aot_eager backend for CPU speed) compiles it, and FlowTurbo runs through it to float tolerance of
    the eager model, with every model call going through the compiled module."""
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    model = tiny_models.build_tiny_model("flux")
    cond = tiny_models.tiny_conditioning("flux", 1)
    latent = torch.zeros(tiny_models.latent_shape("flux", 2))
    compiled_model = model.clone()
    set_torch_compile_wrapper(compiled_model, backend="aot_eager")
    calls = []
    compiled_model.add_wrapper_with_key(
        comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.count",
        lambda executor, *args, **kwargs: calls.append(1) or executor(*args, **kwargs),
    )  # fmt: skip
    from torch._dynamo.utils import counters

    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        eager = sample_with(model, flowturbo(2, 0), 6, cond, latent)
        counters.clear()
        compiled = sample_with(compiled_model, flowturbo(2, 0), 6, cond, latent)
    assert counters["stats"]["unique_graphs"] >= 1  # Dynamo really captured the network
    assert len(calls) == 2 * 2 + 4  # H2: two calls a step, P4: one
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
