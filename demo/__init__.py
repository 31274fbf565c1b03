"""The demo world: a procedural shapes world, a fixed text encoding of its vocabulary, and the small models trained
on it (weights under demo/weights). Pure numpy/torch: ComfyUI is touched only in nodes/demo_models.py."""
