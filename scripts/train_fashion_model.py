"""Train (and measure) the Fashion-MNIST demo model and its classifier: real photos through the demo nodes.

    .venv/bin/python scripts/train_fashion_model.py dit          # demo/weights/fashion_dit_flow.safetensors
    .venv/bin/python scripts/train_fashion_model.py classifier   # demo/weights/fashion_classifier.safetensors
    .venv/bin/python scripts/train_fashion_model.py measure      # accuracy / Frechet distance, 500 samples each

Needs Debian's `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist). Seeded; one thread by default, so a
rerun on the same machine gives the same weights. Each file's sha256, the command that made it and its training time
are recorded in demo/weights/MANIFEST.json (the suite checks the shipped files against it). The suite never trains;
retraining is this optional slow path. Times on a shared 2-core CPU are in the manifest; the measured figures are
in demo/weights/fashion_quality.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from demo_training import TrainSettings, pack, save_weights, train  # noqa: E402
from train_demo_models import WEIGHTS_DIR, update_manifest  # noqa: E402

MODEL_NAME = "fashion_dit_flow"
CLASSIFIER_FILE = WEIGHTS_DIR / "fashion_classifier.safetensors"
DATASET = "Fashion-MNIST train split (60,000 images; Debian dataset-fashion-mnist)"


def command_line() -> str:
    return shlex.join(["python", "scripts/train_fashion_model.py", *sys.argv[1:]])


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def to_latent(images: np.ndarray) -> torch.Tensor:
    """uint8 photos [N, 28, 28] -> demo latents [N, 48, 8, 8] (what VAEEncode makes of the 32x32 RGB image)."""
    fashion = pack("demo.fashion_mnist")
    folded = pack("nodes.demo_models")
    pixels = torch.from_numpy(fashion.to_rgb32(images)) * 2.0 - 1.0
    return torch.nn.functional.pixel_unshuffle(pixels, folded.FOLD)


def train_dit(args) -> None:
    fashion = pack("demo.fashion_mnist")
    demo_models = pack("nodes.demo_models")
    images, labels = fashion.load("train")

    def sample(rng: np.random.Generator, n: int):
        index = rng.integers(0, len(images), n)
        return to_latent(images[index]), [fashion.caption(int(label)) for label in labels[index]]

    settings = TrainSettings(steps=args.steps, batch=args.batch, lr=args.lr, ema=args.ema, seed=args.seed, warmup=200)
    model = demo_models.build_network(MODEL_NAME, seed=args.seed)
    params = sum(p.numel() for p in model.diffusion_model.parameters())
    print(f"{MODEL_NAME}: {params / 1e6:.2f}M parameters, {settings}", flush=True)
    result = train(model, "sd3", sample, settings, log=lambda line: print(line, flush=True))
    summary = result["summary"]
    path = demo_models.weights_path(MODEL_NAME)
    record = {"command": command_line(), "seed": args.seed, "steps": settings.steps, "batch": settings.batch,
              "lr": settings.lr, "ema": settings.ema, "seconds": summary["seconds"],
              "final_loss": round(summary["final_loss"], 5), "parameters": params,
              "cfg_dropout": settings.cfg_dropout, "dataset": DATASET}  # fmt: skip
    save_weights(path, result["state_dict"], record)
    update_manifest(path, {**record, "trained_at": now()})
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB) in {summary['seconds']} s", flush=True)


def train_fashion_classifier(args) -> None:
    fashion = pack("demo.fashion_mnist")
    classifier = pack("demo.classifier")
    train_images, train_labels = fashion.load("train")
    test_images, test_labels = fashion.load("test")
    torch.manual_seed(args.seed)
    # one grey plane per image, expanded to RGB on indexing: a quarter of the memory
    images = torch.from_numpy(fashion.to_rgb32(train_images)[:, :1]).expand(-1, 3, -1, -1)
    with torch.inference_mode(False):
        model = classifier.AttributeClassifier({"class": fashion.CLASS_NAMES})
    summary = classifier.train_classifier(
        model, images, {"class": torch.from_numpy(train_labels)}, steps=args.steps, batch=args.batch, seed=args.seed
    )
    test = classifier.accuracy(
        model, torch.from_numpy(fashion.to_rgb32(test_images)), {"class": torch.from_numpy(test_labels)}
    )
    record = {"command": command_line(), "seed": args.seed, "steps": args.steps, "batch": args.batch,
              "seconds": summary["seconds"], "final_loss": summary["final_loss"], "dataset": DATASET,
              "test_accuracy": {"class": test["class"]}}  # fmt: skip
    classifier.save_classifier(CLASSIFIER_FILE, model, record)
    update_manifest(CLASSIFIER_FILE, {**record, "trained_at": now()})
    print(f"wrote {CLASSIFIER_FILE}: test accuracy {test['class']:.4f}, {summary['seconds']} s", flush=True)


def generate(host, class_name: str, count: int, seed: int, steps: int, cfg: float, pag: float) -> torch.Tensor:
    """`count` images [count, 3, 32, 32] of one class through the real nodes (KSampler, euler, simple schedule)."""
    prompt = fashion_prompt(class_name, count, seed, steps, cfg, pag)
    images = host.run(prompt)["decode"][0]
    return images.movedim(-1, 1).float()


def fashion_prompt(class_name: str, batch: int, seed: int, steps: int, cfg: float, pag: float = 0.0) -> dict:
    """TL_LoadDemoModel -> [TL_PerturbedAttention] -> KSampler -> VAEDecode for one prompted class."""
    model = ["load", 0]
    prompt = {
        "load": {"class_type": "TL_LoadDemoModel", "inputs": {"model_name": MODEL_NAME}},
        "pos": {"class_type": "TL_DemoTextEncode", "inputs": {"text": class_name}},
        "neg": {"class_type": "TL_DemoTextEncode", "inputs": {"text": ""}},
        "latent": {"class_type": "TL_EmptyDemoLatent", "inputs": {"width": 32, "height": 32, "batch_size": batch}},
    }
    if pag:
        pag_inputs = {"scale": pag, "adaptive_scale": 0.0, "layers": "auto", "start_percent": 0.0,
                      "end_percent": 1.0, "rescale": 0.0, "batched": True}  # fmt: skip
        prompt["pag"] = {"class_type": "TL_PerturbedAttention", "inputs": {"model": model, **pag_inputs}}
        model = ["pag", 0]
    prompt["sample"] = {"class_type": "KSampler",
                        "inputs": {"model": model, "positive": ["pos", 0], "negative": ["neg", 0],
                                   "latent_image": ["latent", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                   "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}}  # fmt: skip
    prompt["decode"] = {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["load", 1]}}
    return prompt


def measure(args) -> None:
    import demo_training

    sys.path.insert(0, str(WEIGHTS_DIR.parent.parent / "bench"))  # the quality harness's metric and writer
    from common import write_atomically
    from quality import frechet_distance

    fashion = pack("demo.fashion_mnist")
    classifier = pack("demo.classifier").load_classifier(CLASSIFIER_FILE)
    host = demo_training._host
    test_images, test_labels = fashion.load("test")
    per_class = args.samples // len(fashion.CLASS_NAMES)
    rng = np.random.default_rng(args.seed)
    real_a = rng.permutation(len(test_images))[: per_class * 10]
    real_b = rng.permutation(len(test_images))[: per_class * 10]

    def features(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return classifier.features(images)

    real = torch.from_numpy(fashion.to_rgb32(test_images))
    real_features = features(real[real_a])
    real_accuracy = (classifier(real)["class"].argmax(1).numpy() == test_labels).mean()
    results = {"samples": per_class * 10, "steps": args.sampling_steps,
               "classifier_test_accuracy": float(real_accuracy),
               "real_vs_real_fd": frechet_distance(real_features, features(real[real_b]))}  # fmt: skip
    for cfg, pag in [(1.0, 0.0), (2.0, 0.0), (3.0, 0.0), (1.0, 0.5), (2.0, 0.5)]:
        started = time.monotonic()
        generated, hits = [], 0
        for label, name in enumerate(fashion.CLASS_NAMES):
            images = generate(host, name, per_class, args.seed + label, args.sampling_steps, cfg, pag)
            hits += int((classifier(images)["class"].argmax(1) == label).sum())
            generated.append(images)
        fd = frechet_distance(features(torch.cat(generated)), real_features)
        key = f"cfg{cfg:g}_pag{pag:g}"
        results[key] = {"accuracy": hits / (per_class * 10), "fd": fd, "seconds": round(time.monotonic() - started)}
        print(key, results[key], flush=True)
    print(json.dumps(results, indent=2))
    if args.out:  # one entry per seed, so runs with other seeds add to the same file
        out = Path(args.out)
        runs = json.loads(out.read_text()) if out.is_file() else {}
        runs[f"seed {args.seed}"] = {"command": command_line(), "measured_at": now(), **results}
        write_atomically(out, json.dumps(runs, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("dit", "classifier", "measure"))
    parser.add_argument("--steps", type=int, default=None, help="training steps (dit 2000, classifier 1000)")
    parser.add_argument("--batch", type=int, default=None, help="batch size (dit 64, classifier 128)")
    parser.add_argument("--lr", type=float, default=8e-4, help="dit: AdamW learning rate")
    parser.add_argument("--ema", type=float, default=0.998, help="dit: EMA decay of the saved weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=500, help="measure: generated images per setting")
    parser.add_argument("--sampling-steps", type=int, default=20, help="measure: Euler steps")
    parser.add_argument("--out", default="", help="measure: write the figures to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pack("nodes.demo_models")  # starts ComfyUI with the pack
    if args.what == "dit":
        args.steps, args.batch = args.steps or 2000, args.batch or 64
        train_dit(args)
    elif args.what == "classifier":
        args.steps, args.batch = args.steps or 1000, args.batch or 128
        train_fashion_classifier(args)
    else:
        measure(args)


if __name__ == "__main__":
    main()
