"""The node contract of shared/DESIGN.md, as ComfyUI sees the registered nodes: IDs, key inputs, defaults, outputs.

Exported workflows store these: a rename or a changed default breaks users' saved graphs, so this test pins them.
"""

import pytest

REQUIRED = object()  # an input that must exist, whatever its default
# node ID -> ({input: default or REQUIRED}, optional inputs that must exist, output types)
CONTRACT = {
    "TL_PerturbedAttention": ({"model": REQUIRED, "scale": 3.0, "adaptive_scale": 0.0, "layers": "auto",
                               "start_percent": 0.0, "end_percent": 1.0, "rescale": 0.0, "batched": True}, [],
                              ["MODEL"]),
    "TL_TStitchModel": ({"small_model": REQUIRED, "large_model": REQUIRED, "small_fraction": 0.4,
                         "switch_by": "steps"}, [], ["MODEL"]),
    "TL_TStitchGuider": ({k: REQUIRED for k in ("small_model", "large_model", "small_positive", "small_negative",
                                                "large_positive", "large_negative", "small_cfg", "large_cfg")}
                         | {"small_fraction": 0.4}, [], ["GUIDER"]),
    # Not in DESIGN.md's table (the issue allowed an extra node): pinned because saved workflows store it too.
    "TL_TStitchChain": ({"model_1": REQUIRED, "model_2": REQUIRED, "switch_1": 0.4, "switch_2": 0.8, "switch_3": 0.9,
                         "switch_by": "steps"},
                        ["model_3", "model_4", "history", "release_after_switch"]
                        + [f"{kind}_{k}" for k in range(1, 5) for kind in ("positive", "negative", "cfg")],
                        ["MODEL"]),
    "TL_FKCGuider": ({"model": REQUIRED, "positive": REQUIRED, "negative": REQUIRED, "cfg": 4.0, "beta": 1.0},
                     ["positive_2", "positive_3"], ["GUIDER"]),
    "TL_FKCSampler": ({"particles": 8, "noise": REQUIRED, "resample": REQUIRED, "ess_threshold": 0.5,
                       "output": REQUIRED}, [], ["SAMPLER"]),
    "TL_FlowTurboSampler": ({"heun_steps": 1, "refine_steps": 0}, ["refiner"], ["SAMPLER"]),
    "TL_TrainVelocityRefiner": ({k: REQUIRED for k in ("model", "positive", "negative", "latent", "iterations",
                                                       "seed", "name")}, [], ["TL_VELOCITY_REFINER"]),
    "TL_LoadVelocityRefiner": ({"refiner_name": REQUIRED}, [], ["TL_VELOCITY_REFINER"]),
    "TL_VendiGuider": ({"model": REQUIRED, "positive": REQUIRED, "negative": REQUIRED, "cfg": REQUIRED,
                        "scale": 0.05, "contextual_weight": 2.0, "every_n_steps": 5, "memory_bank": "default"},
                       ["exemplars", "vae", "features"], ["GUIDER"]),
    "TL_VendiScore": ({"images": REQUIRED}, ["features"], ["FLOAT"]),
    "TL_DiffuseHigh": ({"model": REQUIRED, "positive": REQUIRED, "negative": REQUIRED, "vae": REQUIRED,
                        "latent": REQUIRED, "scale_factor": 2.0, "stages": 1, "denoise": 0.3, "dwt_steps": 5,
                        "wavelet": REQUIRED, "sharpen": 1.0, "seed": REQUIRED, "steps": REQUIRED,
                        "cfg": 10.0,  # ALGORITHMS.md §6 and the official code
                        "sampler_name": REQUIRED, "scheduler": REQUIRED}, [], ["LATENT"]),
    # clip is optional so that a sequence of conditioning inputs alone needs no CLIP; stored links still connect.
    "TL_PromptSequence": ({"text": REQUIRED}, ["clip"], ["TL_PROMPT_SEQUENCE"]),
    "TL_MultiTextVideo": ({k: REQUIRED for k in ("model", "vae", "prompts", "negative", "latent", "seed", "steps",
                                                 "cfg")}
                          | {"last_frame_inversion": 0.5, "dynamic_noise": True, "structure_guidance": 7.0}, [],
                          ["LATENT"]),
}  # fmt: skip
COMBOS = {("TL_TStitchModel", "switch_by"): ["steps", "sigma"], ("TL_FKCSampler", "noise"): ["target", "tempered"],
          ("TL_FKCSampler", "resample"): ["every_step", "ess"], ("TL_FKCSampler", "output"): ["best", "sample", "all"],
          ("TL_DiffuseHigh", "wavelet"): ["db4", "haar"]}  # fmt: skip


@pytest.mark.parametrize("node_id", sorted(CONTRACT))
def test_registered_node_keeps_its_contract(host, node_id):
    required, optional, outputs = CONTRACT[node_id]
    cls = host.nodes.NODE_CLASS_MAPPINGS.get(node_id)
    assert cls is not None, f"{node_id} is not registered"
    spec = cls.INPUT_TYPES()
    inputs = {**spec.get("required", {}), **spec.get("optional", {})}
    for name, default in required.items():
        assert name in spec.get("required", {}), f"{node_id}: required input {name!r} missing"
        if default is not REQUIRED:
            assert inputs[name][1].get("default") == default, f"{node_id}.{name}: default changed"
    for name in optional:
        assert name in inputs, f"{node_id}: optional input {name!r} missing"
    for (node, name), options in COMBOS.items():
        if node == node_id:
            kind, settings = inputs[name][0], inputs[name][1]
            listed = settings.get("options") if kind == "COMBO" else list(kind)  # V3 and V1 combo forms
            assert listed == options, f"{node_id}.{name}: options changed"
    assert list(cls.RETURN_TYPES) == outputs
    assert cls.CATEGORY.startswith("trajectory_lab/")
