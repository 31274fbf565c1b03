"""What every benchmark shares: the in-process ComfyUI, full-size random-weight models, the environment line
that heads every table, the command line and the atomic writer."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2-core CPU machines: threads make small convs ~100x slower

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from atomic import write_atomically  # noqa: E402, F401  (the benchmarks import it from here)

# fmt: off
_UNET = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
         "legacy": False, "in_channels": 4, "model_channels": 320, "use_temporal_attention": False,
         "use_temporal_resblock": False}
# name: (comfy.supported_models class, dtype, the full unet_config that comfy.model_detection derives from a real
# checkpoint, latent [C, H, W], text tokens, context width, pooled width)
FULL_SIZE = {
    "SD1.5 512²": ("SD15", torch.float16, {**_UNET, "adm_in_channels": None, "num_res_blocks": [2, 2, 2, 2],
                   "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
                   "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
                   "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0]},
                   (4, 64, 64), 77, 768, None),
    "SDXL 1024²": ("SDXL", torch.float16, {**_UNET, "num_classes": "sequential", "adm_in_channels": 2816,
                   "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10], "channel_mult": [1, 2, 4],
                   "transformer_depth_middle": 10, "use_linear_in_transformer": True, "context_dim": 2048,
                   "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10]},
                   (4, 128, 128), 77, 2048, 1280),
    "Flux-dev 1024²": ("Flux", torch.bfloat16, {"image_model": "flux", "in_channels": 16, "out_channels": 16,
                       "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0,
                       "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56],
                       "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True},
                       (16, 128, 128), 256, 4096, 768),
}
# fmt: on


def start_comfyui(device: str):
    """The test harness's in-process ComfyUI with the pack loaded; returns (pack's PAG module, built-in node)."""
    sys.path[:0] = [str(REPO / "tests"), str(REPO / "scripts")]
    if device == "cuda":
        # The harness pins ComfyUI to the CPU (args.cpu) before importing model_management; importing it first
        # with default arguments keeps ComfyUI's own GPU set-up (device, attention backend).
        from comfyui_tree import comfyui_tree

        sys.path.insert(0, str(comfyui_tree()))
        import comfy.model_management  # noqa: F401
    from harness import in_process_host, pack

    in_process_host()
    import comfy_extras.nodes_pag

    return pack("nodes.perturbed_attention"), comfy_extras.nodes_pag.PerturbedAttentionGuidance


def random_conditioning(seed: int, tokens: int, width: int, pooled: int | None) -> list:
    gen = torch.Generator().manual_seed(seed)
    extras = {"pooled_output": torch.randn(1, pooled, generator=gen)} if pooled else {}
    return [[torch.randn(1, tokens, width, generator=gen), extras]]


@torch.no_grad()
def build_full_size(cls_name: str, dtype: torch.dtype, unet_config: dict):
    """The real ComfyUI model class at full size, built on the GPU, weights filled like tiny_models.fill_seeded_."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    config = getattr(comfy.supported_models, cls_name)(dict(unet_config))
    config.set_inference_dtype(dtype, None)
    device = mm.get_torch_device()
    model = config.get_model({}, device=device)
    gen = torch.Generator(device).manual_seed(0)
    for name, p in model.diffusion_model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, p[0].numel() ** -0.5, generator=gen)
        else:
            p.normal_(1.0 if name.endswith(("weight", "scale")) else 0.0, 0.02, generator=gen)
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def processor_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {torch.get_num_threads()} thread(s)"
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment_line(device: str) -> str:
    """Processor or card, torch, ComfyUI and Python versions, and today's date (UTC): the line under every table."""
    sys.path.insert(0, str(REPO / "scripts"))
    import comfyui_version

    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    load = ""
    if device == "cpu" and hasattr(os, "getloadavg"):  # shared CPUs: a busy machine stretches every timing
        load = f"; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    return (f"{processor_name(device)}; torch {torch.__version__}; ComfyUI {comfyui_version.__version__}; "
            f"Python {platform.python_version()}; {today}{load}")  # fmt: skip


def bench_arguments(doc: str, out_name: str, cpu_repeats: int, cuda_repeats: int) -> argparse.Namespace | None:
    """The benchmarks' shared command line (--device, --out, --repeats); None when CUDA is asked for but absent."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / out_name)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help=f"timed repeats per variant after a warm-up (cpu {cpu_repeats}, cuda {cuda_repeats})",
    )
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"error: --device cuda needs a CUDA GPU, and torch {torch.__version__} (CUDA {torch.version.cuda}) "
            "sees none; run with --device cpu for the tiny models",
            file=sys.stderr,
        )
        return None
    if args.device == "cpu":
        torch.set_num_threads(1)
    args.repeats = args.repeats or (cpu_repeats if args.device == "cpu" else cuda_repeats)
    return args  # fmt: skip


def run_benchmark(doc: str, out_name: str, cpu_repeats: int, cuda_repeats: int, produce) -> int:
    """A benchmark's main(): parse the shared command line, start ComfyUI, write produce(device, repeats)."""
    args = bench_arguments(doc, out_name, cpu_repeats, cuda_repeats)
    if args is None:
        return 2
    start_comfyui(args.device)
    text = produce(args.device, args.repeats)
    write_atomically(args.out, text)
    print(text)
    return 0
