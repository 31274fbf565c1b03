"""Pure torch guidance terms (no ComfyUI imports), shared by the nodes."""
