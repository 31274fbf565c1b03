"""Trajectory Lab: inference-time diffusion research as ComfyUI nodes. Registration only.

Loaded by ComfyUI's custom-node loader from any folder name; everything inside uses relative imports.
"""

WEB_DIRECTORY = "./web"


async def comfy_entrypoint():
    # Imported here so that the pure cores (samplers/, guidance/) import without ComfyUI present.
    from .nodes import TrajectoryLabExtension

    return TrajectoryLabExtension()
