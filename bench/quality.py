"""Quality of each technique against its baseline on the demo world: attribute accuracy, Fréchet distance in the
demo classifier's feature space, Vendi score, over several seeds (mean ± sd).

The harness works on any MODEL: a `World` says how to load a model by role, encode a prompt, judge images and
draw real reference images. `DemoWorld` uses the pack's demo models (TL_LoadDemoModel, TL_DemoTextEncode,
TL_DemoFeatures); `TinyWorld` uses the test suite's tiny random-weight models and checks the pipeline end to end
(its figures carry no meaning about quality). A row whose demo model or classifier is missing says
"pending demo models". Run alone: python bench/quality.py [--tiny] [--seeds N] [experiment ...]
"""

from __future__ import annotations

import os
import re

os.environ.setdefault("OMP_NUM_THREADS", "1")

import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
import zlib  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment_line, start_comfyui  # noqa: E402

PENDING = "pending demo models"
STEPS = 15  # sampler steps of every image experiment unless it says otherwise (the run must fit ~10 minutes)

# ---------------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------------


def _sqrt_psd(m: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh((m + m.T) / 2)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [n, d] and b [m, d] (float64):
    |mu_a - mu_b|² + tr(C_a + C_b - 2 (C_a^½ C_b C_a^½)^½)."""
    a, b = a.double().flatten(1), b.double().flatten(1)
    mu_a, mu_b = a.mean(0), b.mean(0)
    c_a, c_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrt_psd(c_a)
    cross = _sqrt_psd(root_a @ c_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + torch.trace(c_a) + torch.trace(c_b) - 2 * torch.trace(cross))


def vendi(features: torch.Tensor) -> float:
    from harness import pack

    return float(pack("guidance.vendi").vendi_score(features))


REFERENCE_SIZE, PCA_DIMS = 512, 16


class FeatureSpace:
    """Features centred on a real reference set, projected on its top principal axes and whitened (unit variance
    per axis), so Fréchet distances are unitless and comparable across experiments: one over 32 images in 128
    raw dimensions would measure mostly its own small-sample bias."""

    def __init__(self, reference: torch.Tensor, dims: int = PCA_DIMS) -> None:
        reference = reference.double().flatten(1)
        self.mean = reference.mean(0)
        _, singular, vt = torch.linalg.svd(reference - self.mean, full_matrices=False)
        scale = singular[:dims] / (reference.shape[0] - 1) ** 0.5  # each axis in units of the real set's spread
        self.basis = vt[:dims].T / scale.clamp_min(1e-12)
        self.reference = self.project(reference)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return (features.double().flatten(1) - self.mean) @ self.basis


@dataclass
class Spread:
    """A figure over seeds: mean ± sample standard deviation."""

    values: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.values.append(float(value))

    @property
    def mean(self) -> float:
        return statistics.mean(self.values) if self.values else float("nan")

    def format(self, digits: int = 3) -> str:
        if not self.values:
            return "—"
        if len(self.values) == 1:
            return f"{self.values[0]:.{digits}f}"
        return f"{self.mean:.{digits}f} ± {statistics.stdev(self.values):.{digits}f}"


# ---------------------------------------------------------------------------------------------------------------
# Judges: what an image shows
# ---------------------------------------------------------------------------------------------------------------


class SceneJudge:
    """Reads shapes-world scenes without any trained model: the pixels that differ from the border's median colour
    are the objects (connected components); the largest one's mean colour, centroid, area and fill of its bounding
    box give colour, position, size and shape. Its own accuracy on real scenes is measured (judge_check). Objects
    are counted on a blurred image by colour instead (count_objects), which holds on noisy generations."""

    def __init__(self, world_module) -> None:
        self.world = world_module
        self.colours = {k: np.asarray(v) for k, v in world_module.COLOURS.items()}
        circle_small = np.pi * world_module.SIZES["small"] ** 2
        circle_large = np.pi * world_module.SIZES["large"] ** 2
        self.size_split = float(np.sqrt(circle_small * circle_large))  # geometric mean of the two areas

    def _components(self, image: np.ndarray):
        import scipy.ndimage

        h, w, _ = image.shape
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        background = np.median(border, axis=0)
        mask = np.abs(image - background).sum(-1) > 0.3
        labels, count = scipy.ndimage.label(mask)
        areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        keep = [i + 1 for i, a in enumerate(areas) if a >= max(3, 0.004 * h * w)]
        return labels, keep, areas

    def count_objects(self, images: torch.Tensor) -> list[int]:
        """Blobs of a shape colour: the image box-blurred over 1/16 of its side (generated images are noisy), pixels
        within 0.3 (RGB distance) of a world colour, connected components of at least 1% of the image."""
        import scipy.ndimage

        palette = np.stack(list(self.colours.values()))  # [K, 3]
        counts = []
        for img in images.float().cpu().numpy():
            h, w, _ = img.shape
            smooth = scipy.ndimage.uniform_filter(img, size=(max(3, h // 16), max(3, w // 16), 1), mode="nearest")
            near = (np.linalg.norm(smooth[:, :, None, :] - palette, axis=-1) < 0.3).any(-1)
            labels, count = scipy.ndimage.label(near)
            areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
            counts.append(int((areas >= 0.01 * h * w).sum()))
        return counts

    def attributes(self, images: torch.Tensor) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {key: [] for key in self.world.ATTRIBUTES}
        for img in images.float().cpu().numpy():
            h, w, _ = img.shape
            labels, keep, areas = self._components(img)
            if not keep:
                for key in out:
                    out[key].append("none")
                continue
            main = max(keep, key=lambda i: areas[i - 1])
            ys, xs = np.nonzero(labels == main)
            rgb = img[ys, xs].mean(0)
            out["colour"].append(min(self.colours, key=lambda c: float(((self.colours[c] - rgb) ** 2).sum())))
            cx = (xs.mean() + 0.5) / w
            out["position"].append(min(self.world.POSITIONS, key=lambda p: abs(self.world.POSITIONS[p] - cx)))
            area = len(xs) / (h * w)
            out["size"].append("large" if area > self.size_split else "small")
            fill = len(xs) / ((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
            out["shape"].append("triangle" if fill < 0.66 else "circle" if fill < 0.9 else "square")
        return out


class ClassifierJudge:
    """The demo world's trained attribute classifier (TL_DemoFeatures): its embedding and its predictions."""

    def __init__(self, extractor) -> None:
        self.extractor = extractor

    def features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.extractor.embed(images).double()

    def attributes(self, images: torch.Tensor) -> dict[str, list[str]]:
        with torch.no_grad():
            return self.extractor.classifier.predict(images[..., :3].movedim(-1, 1).float())


def adherence(predicted: dict[str, list[str]], wanted: list[dict[str, str]]) -> float:
    """Fraction of images whose every prompted attribute is what the judge sees."""
    hits = [all(predicted[key][i] == value for key, value in want.items()) for i, want in enumerate(wanted)]
    return sum(hits) / max(len(hits), 1)


# ---------------------------------------------------------------------------------------------------------------
# Worlds: models by role, prompts, judges, reference images
# ---------------------------------------------------------------------------------------------------------------


class World:
    name = "world"
    note = ""
    pixels = 32  # generated image side
    roles: dict[str, str] = {}

    def generate(self, model, vae, positive, negative, **options) -> torch.Tensor:
        return generate(model, vae, positive, negative, **{"pixels": self.pixels, **options})

    def load(self, role: str):  # -> (MODEL, VAE)
        raise NotImplementedError

    def encode(self, text: str, role: str) -> list:
        raise NotImplementedError

    def features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def attributes(self, images: torch.Tensor) -> dict[str, list[str]]:
        raise NotImplementedError

    def count_objects(self, images: torch.Tensor) -> list[int]:
        raise NotImplementedError

    def video_shape(self) -> tuple[int, ...]:
        raise NotImplementedError

    reference_size = REFERENCE_SIZE

    def real_scenes(self, wanted: list[dict[str, str]], seed: int) -> torch.Tensor:
        """Real images (IMAGE) drawn like `wanted`, one per entry."""
        raise NotImplementedError

    def reference_features(self, wanted: list[dict[str, str]], seed: int) -> torch.Tensor:
        return self.features(self.real_scenes(wanted, seed))

    def reference_space(self, wanted: list[dict[str, str]]) -> FeatureSpace:
        """The PCA space of REFERENCE_SIZE real images distributed like `wanted` (cached per distinct prompt set)."""
        key = tuple(sorted({tuple(sorted(w.items())) for w in wanted}))
        cache = self.__dict__.setdefault("_spaces", {})
        if key not in cache:
            kinds = [dict(k) for k in key]
            drawn = [kinds[i % len(kinds)] for i in range(self.reference_size)]
            cache[key] = FeatureSpace(self.reference_features(drawn, seed=4321))
        return cache[key]

    def floor_row(self, experiment: str, wanted: list[dict[str, str]], seeds) -> Row:
        """Fresh real images scored like a variant: what a perfect generator would score at this batch size."""
        row = Row(experiment, "real scenes (floor)")
        for seed in seeds:
            score(self, row, self.real_scenes(wanted, seed=1000 + seed), wanted)
        return row


class DemoWorld(World):
    name = "demo shapes world"
    roles = {"unet_small": "shapes_unet_small", "unet_large": "shapes_unet_large", "dit_flow": "shapes_dit_flow",
             "video": "shapes_video_wan"}  # fmt: skip

    def __init__(self) -> None:
        from harness import pack

        self.models = pack("nodes.demo_models")
        self.world = pack("demo.shapes_world")
        self.scene = SceneJudge(self.world)
        self._judge: ClassifierJudge | None = None
        try:
            self._judge = ClassifierJudge(pack("nodes.demo_features").DemoClassifierExtractor("shapes_attributes"))
            self.note = "judge: the demo attribute classifier (TL_DemoFeatures shapes_attributes)"
        except (FileNotFoundError, ImportError, AttributeError) as error:
            self.note = f"judge: classifier-free scene reader (demo classifier unavailable: {error})"

    def load(self, role):
        return self.models.load_demo_model(self.roles[role])

    def encode(self, text, role):
        return self.models.demo_conditioning(text)

    def features(self, images):
        if self._judge is not None:
            return self._judge.features(images)
        return torch.nn.functional.adaptive_avg_pool2d(images.movedim(-1, 1).double(), 8).flatten(1)

    def attributes(self, images):
        return (self._judge or self.scene).attributes(images)

    def count_objects(self, images):
        return self.scene.count_objects(images)

    def real_images(self, n: int, seed: int = 12345) -> tuple[torch.Tensor, dict[str, list[str]]]:
        batch = self.world.sample_images(np.random.default_rng(seed), n)
        labels = {k: [self.world.ATTRIBUTES[k][i] for i in v] for k, v in batch.labels.items()}
        return torch.from_numpy(batch.images).movedim(1, -1), labels

    def real_scenes(self, wanted, seed):
        rng = np.random.default_rng(seed)
        scenes = [self.world.render([self.world.random_shape(rng, **want)], self.world.random_background(rng))
                  for want in wanted]  # fmt: skip
        return torch.from_numpy(np.stack(scenes)).movedim(1, -1)

    def video_shape(self) -> tuple[int, ...]:
        return (1, *self.models.DEMO_MODELS[self.roles["video"]].shape)


class TinyWorld(World):
    """The test suite's tiny random-weight models: the pipeline runs, the numbers mean nothing."""

    name = "tiny random-weight models (pipeline check)"
    pixels = 64
    reference_size = 96
    note = "judge: scene reader on random images; reference = the large model's own unguided samples"
    roles = {"unet_small": "sd15", "unet_large": "sd15", "dit_flow": "sd3", "video": "wan21"}

    def __init__(self) -> None:
        import tiny_models
        from harness import pack

        self.tiny = tiny_models
        self.scene = SceneJudge(pack("demo.shapes_world"))

    def load(self, role):
        arch = self.roles[role]
        if role == "video":
            import video_models

            return self.tiny.build_tiny_model(arch), video_models.build_wan_vae(8)
        seed = 5 if role == "unet_small" else 0
        latent_channels = self.tiny.latent_shape(arch)[1]
        return self.tiny.build_tiny_model(arch, seed=seed), self.tiny.build_tiny_vae(latent_channels)

    def encode(self, text, role):
        if not text:
            cond = self.tiny.tiny_conditioning(self.roles[role], 0)
            return [[torch.zeros_like(cond[0][0]), {k: torch.zeros_like(v) for k, v in cond[0][1].items()}]]
        return self.tiny.tiny_conditioning(self.roles[role], zlib.crc32(text.encode()) % 10_000 + 1)

    def features(self, images):
        return torch.nn.functional.adaptive_avg_pool2d(images.movedim(-1, 1).double(), 8).flatten(1)

    def attributes(self, images):
        return self.scene.attributes(images)

    def count_objects(self, images):
        return self.scene.count_objects(images)

    def video_shape(self) -> tuple[int, ...]:
        return (1, 16, 3, 8, 8)  # 9 frames of 64x64 through the tiny Wan VAE

    def real_scenes(self, wanted, seed):
        """No real data for random weights: the large model's own unconditional samples stand in."""
        model, vae = self.load("unet_large")
        empty = self.encode("", "unet_large")
        return self.generate(model, vae, empty, empty, seed=seed, batch=len(wanted), cfg=1.0)


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------


def latent_for(model, vae, batch: int, pixels: int = 32) -> torch.Tensor:
    import comfy.latent_formats  # noqa: F401

    channels = model.get_model_object("latent_format").latent_channels
    ratio = vae.downscale_ratio if isinstance(vae.downscale_ratio, int) else 8
    return torch.zeros(batch, channels, pixels // ratio, pixels // ratio)


def generate(model, vae, positive, negative, *, seed: int, batch: int, steps: int = STEPS, cfg: float = 4.0,
             sampler: str = "euler", scheduler: str = "normal", pixels: int = 32, guider=None, sampler_obj=None,
             sigmas=None) -> torch.Tensor:  # fmt: skip
    """IMAGE [B, H, W, 3] from noise: ComfyUI's KSampler path, or a GUIDER / SAMPLER object when given."""
    import comfy.sample
    import comfy.samplers

    latent = latent_for(model, vae, batch, pixels)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.inference_mode():
        if guider is None and sampler_obj is None:
            out = comfy.sample.sample(model, noise, steps, cfg, sampler, scheduler, positive, negative, latent,
                                      seed=seed, disable_pbar=True)  # fmt: skip
        else:
            if sigmas is None:
                sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), scheduler, steps)
            if guider is None:
                guider = comfy.samplers.CFGGuider(model)
                guider.set_conds(positive, negative)
                guider.set_cfg(cfg)
            sampler_obj = sampler_obj or comfy.samplers.sampler_object(sampler)
            out = guider.sample(noise, latent, sampler_obj, sigmas, seed=seed, disable_pbar=True)
        return vae.decode(out).clamp(0, 1).float()


@dataclass
class Row:
    experiment: str
    variant: str
    figures: dict[str, Spread] = field(default_factory=dict)
    note: str = ""

    def add(self, key: str, value: float) -> None:
        self.figures.setdefault(key, Spread()).add(value)


def score(world: World, row: Row, images: torch.Tensor, wanted: list[dict[str, str]]) -> None:
    row.add("adherence", adherence(world.attributes(images), wanted))
    feats = world.features(images)
    space = world.reference_space(wanted)
    row.add("FD", frechet_distance(space.project(feats), space.reference))
    row.add("Vendi", vendi(feats))


# ---------------------------------------------------------------------------------------------------------------
# Experiments: each returns rows (one per variant), figures over seeds
# ---------------------------------------------------------------------------------------------------------------

PROMPTS = [("red circle", {"colour": "red", "shape": "circle"}), ("blue square", {"colour": "blue", "shape": "square"}),
           ("green triangle", {"colour": "green", "shape": "triangle"}),
           ("yellow circle", {"colour": "yellow", "shape": "circle"})]  # fmt: skip
PER_PROMPT = 6


def prompt_batch(world: World, role: str, variant_fn, seed: int) -> tuple[torch.Tensor, list[dict], float]:
    """Images for every prompt (PER_PROMPT each) from variant_fn(positive, negative, seed) and the seconds spent."""
    images, wanted, seconds = [], [], 0.0
    negative = world.encode("", role)
    for k, (text, want) in enumerate(PROMPTS):
        started = time.perf_counter()
        images.append(variant_fn(world.encode(text, role), negative, seed * 100 + k))
        seconds += time.perf_counter() - started
        wanted += [want] * PER_PROMPT
    return torch.cat(images), wanted, seconds


def run_variants(world: World, experiment: str, role: str, variants: dict[str, Callable], seeds,
                 extra: Callable | None = None) -> list:  # fmt: skip
    """Variants over the PROMPTS: variants[name](positive, negative, seed) -> images; extra(row, images, seed)
    adds figures of its own."""
    rows = {name: Row(experiment, name) for name in variants}
    wanted: list[dict] = []
    for seed in seeds:
        for name, fn in variants.items():
            images, wanted, seconds = prompt_batch(world, role, fn, seed)
            score(world, rows[name], images, wanted)
            rows[name].add("s per image", seconds / len(wanted))
            if extra is not None:
                extra(rows[name], images, seed)
    return [*rows.values(), world.floor_row(experiment, wanted, seeds)]


UNET_WIDE_LAYERS = "m0,u0,u1,u2,u3,u4,u5"


def exp_pag(world: World, seeds, role: str = "unet_large") -> list[Row]:
    """CFG 3 alone, with our PAG (scale 3, default layer) and with ComfyUI's built-in PAG node (scale 3)."""
    import comfy_extras.nodes_pag
    from harness import pack

    pag = pack("nodes.perturbed_attention")
    model, vae = world.load(role)
    builtin = comfy_extras.nodes_pag.PerturbedAttentionGuidance  # patches UNet attention only: on DiTs a no-op
    variants = {"CFG only": model,
                "ours PAG 3.0": pag.apply_perturbed_attention(model, 3.0, 0.0, "auto", 0.0, 1.0, 0.0, True),
                "built-in PAG 3.0": builtin.execute(model, 3.0).result[0]}  # fmt: skip
    if role != "dit_flow":  # the layers make demo uses: the middle block alone barely moves these small UNets
        variants[f"ours PAG 3.0, layers {UNET_WIDE_LAYERS}"] = pag.apply_perturbed_attention(
            model, 3.0, 0.0, UNET_WIDE_LAYERS, 0.0, 1.0, 0.0, True
        )

    def fn(m):
        return lambda pos, neg, seed: world.generate(m, vae, pos, neg, seed=seed, batch=PER_PROMPT, cfg=3.0)

    label = "PAG (DiT)" if role == "dit_flow" else "PAG (UNet)"
    return run_variants(world, label, role, {k: fn(m) for k, m in variants.items()}, seeds)


def exp_tstitch(world: World, seeds, ratios=(0.0, 0.2, 0.4, 0.6, 1.0)) -> list[Row]:
    from harness import pack

    ts = pack("nodes.trajectory_stitching")
    small, vae = world.load("unet_small")
    large, _ = world.load("unet_large")
    variants = {}
    for r in ratios:
        model = ts.TStitchModel.execute(small, large, r, "steps").result[0]
        name = "large only (r = 0)" if r == 0 else "small only (r = 1)" if r == 1 else f"T-Stitch r = {r:g}"
        variants[name] = lambda pos, neg, seed, m=model: world.generate(m, vae, pos, neg, seed=seed, batch=PER_PROMPT)
    return run_variants(world, "T-Stitch", "unet_large", variants, seeds)


def run_fixed(world: World, experiment: str, variants: dict[str, Callable], want: dict, seeds,
              extra: Callable | None = None) -> list:  # fmt: skip
    """Variants that each make one batch for a fixed prompt: variants[name](seed) -> (images, seconds);
    extra(row, images) adds figures of its own."""
    rows = {name: Row(experiment, name) for name in variants}
    for seed in seeds:
        for name, fn in variants.items():
            images, seconds = fn(seed)
            rows[name].add("s per image", seconds / images.shape[0])
            score(world, rows[name], images, [want] * images.shape[0])
            if extra is not None:
                extra(rows[name], images)
    floor = world.floor_row(experiment, [want] * images.shape[0], seeds)
    if extra is not None:
        for seed in seeds:
            extra(floor, world.real_scenes([want] * images.shape[0], seed=1000 + seed))
    return [*rows.values(), floor]


def timed_images(fn) -> tuple[torch.Tensor, float]:
    started = time.perf_counter()
    images = fn()
    return images, time.perf_counter() - started


def exp_fkc_and(world: World, seeds, particles: int = 8) -> list[Row]:
    """'red' AND 'circle' as a product of two prompts (TL_FKCGuider positive + positive_2, cfg w each): the
    plain composed CFG (the same guider with euler_ancestral) vs FKC with `particles` per image."""
    import comfy.samplers
    from harness import pack

    fk = pack("nodes.feynman_kac")
    role = "unet_large"
    model, vae = world.load(role)
    red, circle, empty = world.encode("red", role), world.encode("circle", role), world.encode("", role)
    guider = fk.FKCGuider.execute(model, red, empty, 3.0, 1.0, circle, None).args[0]
    samplers = {
        "composed CFG, euler_ancestral (no correction)": comfy.samplers.sampler_object("euler_ancestral"),
        f"FKC, {particles} particles per image": fk.FKCSampler.execute(particles, "target", "every_step", 0.5,
                                                                       "best").args[0],
    }  # fmt: skip
    batch = 2 * PER_PROMPT

    def run(sampler):
        return lambda seed: timed_images(
            lambda: world.generate(model, vae, None, None, seed=seed, batch=batch, guider=guider, sampler_obj=sampler)
        )

    variants = {name: run(sampler) for name, sampler in samplers.items()}
    return run_fixed(world, "FKC AND", variants, {"colour": "red", "shape": "circle"}, seeds)


def exp_fkc_anneal(world: World, seeds, particles: int = 8) -> list[Row]:
    """'red circle' at cfg 3 annealed with beta 2 (target (q_u^-2 q_c^3)^2): plain CFG 3, the annealed score without
    correction (euler_ancestral), and FKC."""
    import comfy.samplers
    from harness import pack

    fk = pack("nodes.feynman_kac")
    role = "unet_large"
    model, vae = world.load(role)
    positive, empty = world.encode("red circle", role), world.encode("", role)
    annealed = fk.FKCGuider.execute(model, positive, empty, 3.0, 2.0, None, None).args[0]
    ancestral = comfy.samplers.sampler_object("euler_ancestral")
    fkc = fk.FKCSampler.execute(particles, "target", "every_step", 0.5, "best").args[0]
    batch = 2 * PER_PROMPT

    def run(**options):
        return lambda seed: timed_images(lambda: world.generate(model, vae, positive, empty, seed=seed, batch=batch,
                                                                **options))  # fmt: skip

    variants = {
        "CFG 3, euler_ancestral (beta 1)": run(cfg=3.0, sampler="euler_ancestral"),
        "beta 2, euler_ancestral (no correction)": run(guider=annealed, sampler_obj=ancestral),
        f"beta 2, FKC {particles} particles": run(guider=annealed, sampler_obj=fkc),
    }
    return run_fixed(world, "FKC annealing", variants, {"colour": "red", "shape": "circle"}, seeds)


def exp_flowturbo(world: World, seeds) -> list[Row]:
    """The flow DiT at cfg 4 with 15 model calls per image each way (Euler 15, Heun 8, FlowTurbo H1P13), and
    Euler 30 (twice the calls); 'simple' schedule. 'error vs converged' = mean |pixel − the same sample solved with
    Heun 50 steps (99 calls)|: the solver's own error, which the model's quality does not hide."""
    import comfy.samplers
    from harness import pack

    ftn = pack("nodes.flowturbo")
    role = "dit_flow"
    model, vae = world.load(role)

    def solver(sampler, steps):
        obj = comfy.samplers.sampler_object(sampler) if isinstance(sampler, str) else sampler
        return lambda pos, neg, seed: world.generate(model, vae, pos, neg, seed=seed, batch=PER_PROMPT, steps=steps,
                                                     cfg=4.0, sampler_obj=obj, scheduler="simple")  # fmt: skip

    variants = {"Euler 15 steps": solver("euler", 15), "Heun 8 steps (15 calls)": solver("heun", 8),
                "FlowTurbo H1P13 (15 calls)": solver(ftn.FlowTurboSampler.execute(1, 0).result[0], 14),
                "Euler 30 steps (2× calls)": solver("euler", 30)}  # fmt: skip
    converged: dict[int, torch.Tensor] = {}

    def error_vs_converged(row, images, seed):
        if seed not in converged:
            converged[seed] = prompt_batch(world, role, solver("heun", 50), seed)[0]
        row.add("error vs converged", float((images - converged[seed]).abs().mean()))

    return run_variants(world, "FlowTurbo", role, variants, seeds, error_vs_converged)


def exp_cvsg(world: World, seeds) -> list[Row]:
    """'red circle' x 2·PER_PROMPT generated one after another (batch_mode sequential) with TL_VendiGuider at cfg 3,
    every 5th step, demo-classifier features, a fresh memory bank per run: plain CFG, VSG (no exemplars) and c-VSG
    with 4 real 'red circle' scenes as exemplars (contextual weight 2, the paper's beta, and 0.5): diversity vs
    adherence."""
    from harness import pack

    vn, bank = pack("nodes.vendi"), pack("nodes.vendi_bank")
    features = pack("nodes.demo_features").DemoClassifierExtractor("shapes_attributes")
    role = "unet_large"
    want = {"colour": "red", "shape": "circle"}
    model, vae = world.load(role)
    positive, empty = world.encode("red circle", role), world.encode("", role)
    exemplars = world.real_scenes([want] * 4, seed=2024)
    batch = 2 * PER_PROMPT

    def run(scale, with_exemplars, weight=2.0):
        def one(seed):
            name = f"evidence_{seed}_{scale:g}_{int(with_exemplars)}_{weight:g}"
            bank.MemoryBank(name).clear()
            guider = vn.VendiGuider.execute(model, positive, empty, 3.0, scale, weight, 5, name, features=features,
                                            vae=vae, exemplars=exemplars if with_exemplars else None,
                                            update_bank=False).result[0]  # fmt: skip
            return timed_images(lambda: world.generate(model, vae, None, None, seed=seed, batch=batch, guider=guider))

        return one

    variants = {
        "plain CFG 3 (scale 0)": run(0.0, False),
        "VSG scale 0.05 (no exemplars)": run(0.05, False),
        "c-VSG scale 0.05 (4 exemplars)": run(0.05, True),
        "c-VSG scale 0.05 (4 exemplars, contextual weight 0.5)": run(0.05, True, 0.5),
    }
    return run_fixed(world, "c-VSG", variants, want, seeds)


def exp_diffusehigh(world: World, seeds) -> list[Row]:
    """'red circle' at twice the training size (64²): direct sampling at 64², plain upscale + img2img (ComfyUI's
    VAEDecode → ImageScale bicubic → VAEEncode → KSampler, denoise 0.3) of a 32² base, and TL_DiffuseHigh from the
    same base. duplicates = fraction of images with more than one object."""
    import diffusehigh_speed as dhs
    from harness import pack

    dh = pack("nodes.diffusehigh")
    role = "unet_large"
    model, vae = world.load(role)
    positive, empty = world.encode("red circle", role), world.encode("", role)
    batch = 2 * PER_PROMPT
    big = world.pixels * 2

    def base(seed):
        with torch.inference_mode():
            return vae.encode(world.generate(model, vae, positive, empty, seed=seed, batch=batch, cfg=dhs.CFG))

    def direct(seed):
        return world.generate(model, vae, positive, empty, seed=seed, batch=batch, cfg=dhs.CFG, pixels=big)

    def plain(seed):
        with torch.inference_mode():
            return vae.decode(dhs.plain_chain(model, vae, positive, empty, {"samples": base(seed)}, 1)).clamp(0, 1)

    def diffusehigh(seed, space="image"):
        with torch.inference_mode():
            out = dh.DiffuseHigh.execute(model=model, positive=positive, negative=empty, vae=vae,
                                         latent={"samples": base(seed)}, scale_factor=2.0, stages=1,
                                         denoise=dhs.DENOISE, dwt_steps=dhs.DWT_STEPS, wavelet="db4", sharpen=1.0,
                                         seed=seed, steps=dhs.STEPS, cfg=dhs.CFG, sampler_name="euler",
                                         scheduler="normal", guidance_space=space).result[0]["samples"]  # fmt: skip
            return vae.decode(out).clamp(0, 1)

    variants = {f"direct {big}² sampling": direct, "plain upscale + img2img": plain, "DiffuseHigh": diffusehigh,
                "DiffuseHigh, latent-space guidance": lambda seed: diffusehigh(seed, "latent")}  # fmt: skip

    def duplicates(row, images):
        counts = world.count_objects(images)
        row.add("duplicates", sum(c > 1 for c in counts) / len(counts))

    timed = {name: (lambda seed, f=f: timed_images(lambda: f(seed))) for name, f in variants.items()}
    return run_fixed(world, "DiffuseHigh", timed, {"colour": "red", "shape": "circle"}, seeds, duplicates)


VIDEO_SEEDS = 6
DIRECTIONS = {"right": (1, 0), "left": (-1, 0), "down": (0, 1), "up": (0, -1)}


def motion_adherence(world: World, segments, texts) -> float:
    """Fraction of segments whose shape's centroid (shapes_world.centroid) moves mostly in the prompted direction."""
    from harness import pack

    centroid = pack("demo.shapes_world").centroid
    hits = []
    for frames, text in zip(segments, texts, strict=True):
        direction = DIRECTIONS[text.split()[-1]]
        (x0, y0), (x1, y1) = (centroid(f.movedim(-1, 0).double().numpy()) for f in (frames[0], frames[-1]))
        along = (x1 - x0) * direction[0] + (y1 - y0) * direction[1]
        across = abs((x1 - x0) * direction[1]) + abs((y1 - y0) * direction[0])
        hits.append(along > 0.02 and along > across)
    return sum(hits) / len(hits)


def exp_video(world: World, seeds) -> list[Row]:
    """Three prompts, one segment each ('red circle moves right', 'red circle moves down', 'red circle moves
    left'), T frames per segment. TL_MultiTextVideo returns T + 2(T − 1) frames (a later segment's frame 0 repeats
    the previous last frame and is dropped); the baseline samples each segment alone (same seeds) and is assembled
    the same way. boundary jump = mean |frame change| across the two boundaries / mean |frame change| inside
    segments (1 = as smooth as inside a segment); motion adherence = share of segments whose shape moves the
    prompted way (centroid from the segment's first to last frame, each segment's own T frames: for
    TL_MultiTextVideo its frame 0 is the previous last frame); adherence = frames read as a red circle; FD =
    frames against real red-circle scenes at the frame size; Vendi = variety of the video's frames (a continuous
    video has less than three unrelated clips)."""
    from harness import pack

    mtv = pack("nodes.multitext_video")
    role = "video"
    model, vae = world.load(role)
    texts = ("red circle moves right", "red circle moves down", "red circle moves left")
    conds = tuple(world.encode(t, role) for t in texts)
    empty = world.encode("", role)
    shape = world.video_shape()
    steps, cfg = 20, 4.0
    red_circle = {"colour": "red", "shape": "circle"}

    def frames(latent):
        with torch.no_grad():
            video = vae.decode(latent.detach()).clamp(0, 1).float()  # [T, H, W, 3] or [1, T, H, W, 3]
        return video.reshape(-1, *video.shape[-3:])

    def at_frame_size(images, side):
        resized = torch.nn.functional.interpolate(images.movedim(-1, 1).float(), size=(side, side), mode="area")
        return resized.movedim(1, -1)

    def multitext(seed):
        prompts = mtv.PromptSequence(conds, texts)
        out = mtv.MultiTextVideo.execute(model, vae, prompts, empty, {"samples": torch.zeros(shape)}, seed, steps,
                                         cfg, 0.5, True, 7.0).result[0]["samples"]  # fmt: skip
        video = frames(out)
        per_segment = video.shape[0] // len(texts) + 1  # T, from T + (n − 1)(T − 1) frames
        starts = [k * (per_segment - 1) for k in range(len(texts))]  # a later segment starts at its frame 0
        return video, [video[a : a + per_segment] for a in starts]

    def independent(seed):
        import comfy.sample

        clips = []
        for k, cond in enumerate(conds):
            latent = torch.zeros(shape)
            noise = comfy.sample.prepare_noise(latent, seed + k)
            with torch.inference_mode():
                sampled = comfy.sample.sample(model, noise, steps, cfg, "euler", "simple", cond, empty, latent,
                                              seed=seed + k, disable_pbar=True)  # fmt: skip
            clips.append(frames(sampled))
        # assembled like TL_MultiTextVideo's output; each segment judged on its own clip
        return torch.cat([clip[1 if k else 0 :] for k, clip in enumerate(clips)]), clips

    seeds = list(range(max(len(seeds), VIDEO_SEEDS)))  # cheap: more seeds for a steadier motion figure
    rows = []
    space = None
    for name, fn in (("independent segments", independent), ("TL_MultiTextVideo", multitext)):
        row = Row("multi-text video", name)
        for seed in seeds:
            started = time.perf_counter()
            video, segments = fn(seed)
            row.add("s per image", (time.perf_counter() - started) / video.shape[0])
            per_segment = segments[0].shape[0]
            boundaries = [per_segment + k * (per_segment - 1) for k in range(len(texts) - 1)]  # first new frames
            change = (video[1:] - video[:-1]).abs().mean((1, 2, 3))  # change[i]: frame i -> i + 1
            at_boundary = torch.zeros_like(change, dtype=torch.bool)
            at_boundary[[b - 1 for b in boundaries]] = True
            row.add("boundary jump", float(change[at_boundary].mean() / change[~at_boundary].mean().clamp_min(1e-8)))
            row.add("motion adherence", motion_adherence(world, segments, texts))
            row.add("adherence", adherence(world.attributes(video), [red_circle] * video.shape[0]))
            if space is None:
                real = world.real_scenes([red_circle] * world.reference_size, seed=4321)
                space = FeatureSpace(world.features(at_frame_size(real, video.shape[1])))
            feats = world.features(video)
            row.add("FD", frechet_distance(space.project(feats), space.reference))
            row.add("Vendi", vendi(feats))
        rows.append(row)
    return rows


EXPERIMENTS: dict[str, tuple[Callable, str]] = {
    "pag": (exp_pag, f"PAG on the UNet vs CFG only vs ComfyUI's built-in PAG (cfg 3, scale 3, euler {STEPS} steps)"),
    "pag_dit": (
        lambda world, seeds: exp_pag(world, seeds, "dit_flow"),
        f"PAG on the flow DiT vs CFG only vs the built-in node (a no-op on DiTs): cfg 3, scale 3, euler {STEPS}",
    ),
    "tstitch": (exp_tstitch, f"T-Stitch: small model for the first r of {STEPS} euler steps, then the large one"),
    "fkc_and": (exp_fkc_and, "FKC AND-composition 'red' AND 'circle' (cfg 3 per prompt): adherence = success rate"),
    "fkc_anneal": (exp_fkc_anneal, "FKC annealing: 'red circle', cfg 3, beta 2 (the sharpened CFG target)"),
    "flowturbo": (exp_flowturbo, "FlowTurbo vs Euler / Heun at equal model calls (equal wall time) on the flow DiT"),
    "cvsg": (exp_cvsg, "c-VSG: diversity (Vendi) vs adherence as the guidance scale grows"),
    "diffusehigh": (exp_diffusehigh, "DiffuseHigh vs direct high-res sampling and vs plain upscale + img2img"),
    "video": (exp_video, f"Multi-text video: boundary continuity and per-segment adherence ({VIDEO_SEEDS} seeds)"),
}


PRECISE = ("s per image", "error vs converged")  # small figures: four decimals


def table(rows: list[Row]) -> list[str]:
    """One experiment's rows: a column per figure, the experiment's label only when it has several (PAG)."""
    keys = list(dict.fromkeys(k for r in rows for k in r.figures))
    labelled = len({r.experiment for r in rows}) > 1
    head = ["experiment"] * labelled + ["variant", *keys] + (["note"] if any(r.note for r in rows) else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * (labelled + 1) + "--:|" * len(keys)
             + "---|" * (head[-1] == "note")]  # fmt: skip
    for r in rows:
        cells = [r.experiment] * labelled + [r.variant]
        cells += [r.figures[k].format(4 if k in PRECISE else 3) if k in r.figures else "—" for k in keys]
        cells += [r.note] * (head[-1] == "note")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# (EXPERIMENTS key, experiment, technique variant, baseline variant, figure, higher is better, the claim)
CLAIMS = [
    ("pag", "PAG (UNet)", "ours PAG 3.0", "CFG only", "FD", False,
     "PAG moves samples closer to real scenes (paper: lower FID)"),
    ("pag", "PAG (UNet)", f"ours PAG 3.0, layers {UNET_WIDE_LAYERS}", "CFG only", "FD", False,
     "... on the middle and output blocks"),
    ("pag", "PAG (UNet)", "ours PAG 3.0", "built-in PAG 3.0", "FD", False,
     "same layer (middle block) as the built-in node: the same images"),
    ("pag_dit", "PAG (DiT)", "ours PAG 3.0", "CFG only", "FD", False, "PAG helps a DiT too (the built-in node cannot)"),
    ("tstitch", "T-Stitch", "T-Stitch r = 0.4", "large only (r = 0)", "FD", False,
     "40% of the steps on the small model cost no quality (paper: no FID loss at 40%)"),
    ("fkc_and", "FKC AND", "FKC, 8 particles per image", "composed CFG, euler_ancestral (no correction)",
     "adherence", True,
     "FKC makes 'red' AND 'circle' succeed more often than plain composed CFG"),
    ("fkc_anneal", "FKC annealing", "beta 2, FKC 8 particles", "beta 2, euler_ancestral (no correction)",
     "adherence", True,
     "the corrected annealed target adheres more than the uncorrected annealed score"),
    ("flowturbo", "FlowTurbo", "FlowTurbo H1P13 (15 calls)", "Heun 8 steps (15 calls)", "error vs converged", False,
     "at equal model calls FlowTurbo's solution is closer to the converged one than Heun's"),
    ("flowturbo", "FlowTurbo", "FlowTurbo H1P13 (15 calls)", "Euler 15 steps", "error vs converged", False,
     "... and than Euler's"),
    ("flowturbo", "FlowTurbo", "FlowTurbo H1P13 (15 calls)", "Heun 8 steps (15 calls)", "FD", False,
     "paper: better FID at equal latency (here: FD at equal calls)"),
    ("cvsg", "c-VSG", "c-VSG scale 0.05 (4 exemplars)", "plain CFG 3 (scale 0)", "Vendi", True,
     "c-VSG raises diversity (paper: coverage up)"),
    ("cvsg", "c-VSG", "c-VSG scale 0.05 (4 exemplars)", "plain CFG 3 (scale 0)", "adherence", True,
     "... while prompt adherence holds"),
    ("cvsg", "c-VSG", "c-VSG scale 0.05 (4 exemplars)", "VSG scale 0.05 (no exemplars)", "FD", False,
     "exemplars keep the guided images nearer real scenes than VSG without them (paper: contextualisation)"),
    ("diffusehigh", "DiffuseHigh", "DiffuseHigh", "direct 64² sampling", "duplicates", False,
     "fewer duplicated objects than sampling directly at 2× the training size"),
    ("diffusehigh", "DiffuseHigh", "DiffuseHigh", "plain upscale + img2img", "FD", False,
     "closer to real scenes than plain upscale"),
    ("diffusehigh", "DiffuseHigh", "DiffuseHigh, latent-space guidance", "plain upscale + img2img", "FD", False,
     "the cheaper latent-space guidance is also closer to real scenes than plain upscale"),
    ("video", "multi-text video", "TL_MultiTextVideo", "independent segments", "boundary jump", False,
     "segments join smoothly (lower jump at the boundary)"),
    ("video", "multi-text video", "TL_MultiTextVideo", "independent segments", "motion adherence", True,
     "each segment still follows its own prompt"),
    ("video", "multi-text video", "TL_MultiTextVideo", "independent segments", "adherence", True,
     "... and still shows the prompted red circle"),
]  # fmt: skip


def claims_table(per_experiment: dict[str, list[Row]]) -> list[str]:
    """Technique vs baseline per claim: better / worse when the means differ by more than the two spreads together
    (sd over seeds), else 'within spread'; agreement with the claim is the verdict."""
    found = {(r.experiment, r.variant): r for rows in per_experiment.values() for r in rows}
    lines = ["| experiment | claim | technique | baseline | verdict |", "|---|---|--:|--:|---|"]
    for name, experiment, variant, baseline, key, higher, claim in CLAIMS:
        if name not in per_experiment:
            continue
        a, b = found.get((experiment, variant)), found.get((experiment, baseline))
        if a is None or b is None or key not in a.figures or key not in b.figures:
            notes = [r.note for r in per_experiment[name] if r.note]
            lines.append(f"| {experiment} | {claim} | — | — | {notes[0] if notes else 'not measured'} |")
            continue
        fa, fb = a.figures[key], b.figures[key]
        sd = sum(statistics.stdev(f.values) if len(f.values) > 1 else 0.0 for f in (fa, fb))
        diff = fa.mean - fb.mean
        if "same images" in claim:
            verdict = "agrees" if abs(diff) <= 1e-6 + 1e-3 * abs(fb.mean) else "**disagrees**"
        elif abs(diff) <= sd * (1 + 1e-9):  # a tie with the spread (e.g. 1/12 vs 1/12) is not a difference
            verdict = "within spread" + (" (agrees)" if "cost no quality" in claim or "holds" in claim else "")
        else:
            better = diff > 0 if higher else diff < 0
            verdict = "agrees" if better else "**disagrees**"
        lines.append(f"| {experiment} | {claim} | {key} {fa.format()} | {fb.format()} | {verdict} |")
    return lines


def quality_section(seeds: int = 3, world: World | None = None, names=None) -> str:
    """Markdown for the quality experiments on `world` (default: the demo world)."""
    world = world or DemoWorld()
    seed_list = list(range(seeds))
    started = time.perf_counter()
    lines = [
        f"### {world.name}",
        "",
        f"{environment_line('cpu')}. {world.note}. Seeds {seed_list}: mean ± sd over seeds, each seed a batch of "
        f"{len(PROMPTS) * PER_PROMPT} images (4 prompts × {PER_PROMPT}) or {2 * PER_PROMPT} of one prompt. adherence "
        "= fraction of images showing every prompted attribute; FD = Fréchet distance to real scenes of the same "
        f"prompts, in the judge's feature space projected on its top {PCA_DIMS} principal axes, whitened (lower is "
        "closer; the 'real scenes (floor)' row is what fresh real images of the same count score); Vendi = Vendi "
        "score of the set (higher is more diverse); s per image = wall time on this CPU.",
        "",
    ]
    if isinstance(world, DemoWorld):
        lines += ["Judges on 256 real scenes with known labels (the ceiling of every adherence figure):", "",
                  judge_check(world), "", *metric_checks(), "", *manifest_lines(), ""]  # fmt: skip
    per_experiment: dict[str, list[Row]] = {}
    for name in names or EXPERIMENTS:
        fn, description = EXPERIMENTS[name]
        t0 = time.perf_counter()
        try:
            per_experiment[name] = fn(world, seed_list)
        except (FileNotFoundError, KeyError) as error:  # weights not trained yet, or the model not defined yet
            missing = re.search(r"demo model '(\w+)'", str(error))
            what = f"{missing.group(1)} is not trained yet" if missing else str(error)[:90]
            per_experiment[name] = [Row(name, "—", note=f"{PENDING}: {what}")]
        except Exception as error:  # noqa: BLE001  (one broken experiment must not lose the others' figures)
            traceback.print_exc()
            per_experiment[name] = [Row(name, "—", note=f"failed: {type(error).__name__}: {str(error)[:90]}")]
        print(f"quality {name}: {time.perf_counter() - t0:.1f} s", flush=True)
    lines += ["#### Claims against baselines", "",
              "Verdict: better or worse only when the means differ by more than the two seed spreads together. A "
              "disagreement here can come from a weak demo model (see the training record above) as much as from "
              "the technique; the exactness section is the ground truth for each algorithm.", "",
              *claims_table(per_experiment), ""]  # fmt: skip
    for name, rows in per_experiment.items():
        lines += [f"#### {EXPERIMENTS[name][1]}", "", *table(rows), ""]
    lines.append(f"({time.perf_counter() - started:.0f} s for this section)")
    return "\n".join(lines) + "\n"


def metric_checks() -> list[str]:
    """The metrics against closed forms: Fréchet distance of two Gaussians (|Δμ|² + tr(A + B − 2(AB)^½) with
    A = I, B = 4I in 8 dims: |Δμ|² + 8), and the Vendi score of identical (1) and orthogonal (n) rows."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 8, generator=gen, dtype=torch.float64)
    b = 2 * torch.randn(20000, 8, generator=gen, dtype=torch.float64) + torch.tensor([1.0] + [0.0] * 7)
    fd = frechet_distance(a, b)
    same = frechet_distance(a, a)
    ones = vendi(torch.ones(5, 3))
    eye = vendi(torch.eye(6))
    ok = abs(fd - 9.0) < 0.3 and abs(same) < 1e-9 and abs(ones - 1) < 1e-9 and abs(eye - 6) < 1e-9
    return [f"Metric self-check ({'passes' if ok else '**fails**'}): FD(N(0, I), N(e₁, 4I)) in 8 dims from 20,000 "
            f"samples each = {fd:.3f} (exact 9); FD(a, a) = {same:.1e}; Vendi of 5 identical rows = {ones:.6f} "
            f"(exact 1), of 6 orthogonal rows = {eye:.6f} (exact 6)."]  # fmt: skip


def manifest_lines() -> list[str]:
    """The demo weights' training record (demo/weights/MANIFEST.json): how much training each model had."""
    import json

    from common import REPO

    path = REPO / "demo" / "weights" / "MANIFEST.json"
    if not path.is_file():
        return ["No demo/weights/MANIFEST.json: the demo models' training is not recorded."]
    lines = ["Demo weights used (demo/weights/MANIFEST.json):", "",
             "| file | steps | training s | final loss | trained at |", "|---|--:|--:|--:|---|"]  # fmt: skip
    for name, entry in sorted(json.loads(path.read_text()).items()):
        lines.append(f"| {name} | {entry.get('steps', '—')} | {entry.get('seconds', '—')} "
                     f"| {entry.get('final_loss', '—')} | {entry.get('trained_at', '—')} |")  # fmt: skip
    return lines


def judge_check(world: DemoWorld, n: int = 256) -> str:
    """Accuracy of the judges on real scenes with known labels: the ceiling of every adherence figure."""
    images, labels = world.real_images(n, seed=777)
    lines = ["| judge | " + " | ".join(labels) + " |", "|---|" + "--:|" * len(labels)]
    judges = {"scene reader (no training)": world.scene}
    if world._judge is not None:
        judges["demo classifier"] = world._judge
    for name, judge in judges.items():
        got = judge.attributes(images)
        acc = [sum(a == b for a, b in zip(got[k], labels[k], strict=True)) / n for k in labels]
        lines.append(f"| {name} | " + " | ".join(f"{a:.3f}" for a in acc) + " |")
    counts = world.count_objects(images)
    big = world.count_objects(torch.nn.functional.interpolate(images.movedim(-1, 1), scale_factor=2.0,
                                                              mode="bicubic").clamp(0, 1).movedim(1, -1))  # fmt: skip
    lines += [
        "",
        f"Object counter on the same one-shape scenes: exactly 1 object in {counts.count(1) / n:.3f} of them "
        f"at 32², {big.count(1) / n:.3f} after a 2× bicubic upscale (the false-alarm floor of 'duplicates').",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny random-weight models (pipeline check)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("experiments", nargs="*", help=f"any of {', '.join(EXPERIMENTS)} (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start_comfyui("cpu")
    chosen = TinyWorld() if args.tiny else DemoWorld()
    print(quality_section(args.seeds, chosen, args.experiments or None))
