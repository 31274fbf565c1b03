"""Pure torch sampler cores (no ComfyUI imports): conventions, steppers and the samplers built on them."""
