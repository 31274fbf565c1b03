"""The pack in the real ComfyUI frontend (comfyui-frontend-package) in headless Chromium.

Every example workflow is dropped onto the page (a drop event carrying the file), must load with every node
known and every widget value in place, and must give the frontend's prompt exactly the saved API copy. The
extension's timelines draw what the widgets say, the FKC sampler plots the ESS its events report after a run
queued from the page, and the demo workflows run from the page to images. Screenshots go to out/browser/.

Chromium must be installed (`make test` runs `scripts/browser_setup.sh` first): without it these tests fail.
"""

import json

import pytest
from browser import launch, open_comfyui
from comfy_host import PACK_ROOT
from example_workflow_builder import (
    API_DIR,
    BUILD_JS,
    EXAMPLES_DIR,
    FIT_VIEW_JS,
    QUEUE_JS,
    N,
    Workflow,
    custom_sampling,
    spec_json,
    workflows,
)

ARTIFACTS = PACK_ROOT / "out" / "browser"
NAMES = sorted(p.stem for p in EXAMPLES_DIR.glob("*.json"))
DEMO_NAMES = sorted(w.name for w in workflows() if w.demo)
TIMELINE_NODES = {
    "TL_PerturbedAttention", "TL_FKCSampler", "TL_VendiGuider", "TL_TStitchModel", "TL_TStitchGuider",
    "TL_TStitchChain",
}  # fmt: skip
# Console noise of the frontend itself on a closed network (the registry, the core template package).
IGNORED_ERRORS = ("Content Security Policy", "Failed to load resource", "Error loading core workflow templates")

DROP_JS = """
async ([name, text]) => {
  const app = window.app;
  // Start with no toast from earlier steps (closing one animates: wait until it is gone).
  for (let i = 0; i < 50 && document.querySelector(".p-toast-message"); i++) {
    document.querySelectorAll(".p-toast-close-button").forEach((b) => b.click());
    await new Promise((r) => setTimeout(r, 50));
  }
  // A real drop event on the canvas, carrying the file, as the browser sends when a user drops it.
  app.graph.clear();
  const expected = JSON.parse(text).nodes.length, files = new DataTransfer();
  files.items.add(new File([text], `${name}.json`, { type: "application/json" }));
  const canvas = document.querySelector("#graph-canvas");
  canvas.dispatchEvent(new DragEvent("drop", { dataTransfer: files, bubbles: true, cancelable: true }));
  for (let i = 0; i < 200 && app.graph.nodes.length !== expected; i++) await new Promise((r) => setTimeout(r, 50));
  await new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
  const registered = window.LiteGraph.registered_node_types;
  const dialogs = [...document.querySelectorAll(".p-dialog, .p-toast-message")].map((d) => d.innerText);
  const nodes = app.graph.nodes.map((node) => {
    const timeline = node.widgets?.find((w) => w.name === "trajectory_timeline");
    return {
      id: node.id, type: node.type, known: !!registered[node.type], errors: !!node.has_errors,
      widgets: node.widgets?.map((w) => w.name) ?? [],
      timeline: timeline ? { spans: timeline.timeline?.spans ?? null, draws: timeline.draws } : null,
    };
  });
  const saved = app.graph.serialize();
  const prompt = await app.graphToPrompt();
  return JSON.stringify({ nodes, dialogs, saved, api: prompt.output });
}
"""


BANK_LABEL_JS = """
() => window.app.graph.nodes.find((n) => n.type === "TL_VendiGuider")
  ?.widgets.find((w) => w.name.startsWith("clear memory bank"))?.name
"""
# Press the bank button (its confirm() accepted) and wait for its label to show the emptied bank.
CLEAR_BANK_JS = """
async () => {
  const node = window.app.graph.nodes.find((n) => n.type === "TL_VendiGuider");
  const button = node.widgets.find((w) => w.name.startsWith("clear memory bank"));
  const confirm = window.confirm;
  window.confirm = () => true;
  try { await button.callback(); } finally { window.confirm = confirm; }
  return button.name;
}
"""

FKC_STATE_JS = """
() => window.app.graph.nodes.filter((n) => n.type === "TL_FKCSampler").map((node) => {
  const widget = node.widgets.find((w) => w.name === "trajectory_timeline");
  return { id: node.id, draws: widget.draws, height: widget.computeSize(node.size[0])[1], size: node.size };
})
"""


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        context = launch(p)  # fails (not skips) without Chromium: the message says how to install it
        page, errors = open_comfyui(context, server.url)
        page.console_errors = errors
        yield page
        context.close()


def frontend_errors(page) -> list[str]:
    return [e for e in page.console_errors if not any(noise in e for noise in IGNORED_ERRORS)]


def expected_spans(class_type: str, inputs: dict, linked: set[str]) -> list[tuple[float, float]]:
    """The trajectory spans a node's timeline must show, from its widget values (0 = first step, 1 = last)."""
    windows = {
        "TL_PerturbedAttention": ("start_percent", "end_percent"),
        "TL_FKCSampler": ("resample_start_percent", "resample_end_percent"),
        "TL_VendiGuider": ("start_percent", "end_percent"),
    }
    if class_type in windows:
        start, end = (inputs[name] for name in windows[class_type])
        return [(start, end)] if end > start else []
    if class_type == "TL_TStitchChain":
        models = 2 + ("model_3" in linked) + ("model_3" in linked and "model_4" in linked)
        switches = [inputs[f"switch_{i}"] for i in range(1, models)]
    else:
        switches = [inputs["small_fraction"]]
    edges = [0.0, *switches, 1.0]
    return [(a, b) for a, b in zip(edges, edges[1:], strict=False) if b > a]


def test_extension_is_registered_without_errors(page):
    assert "trajectory_lab.core" in page.evaluate("() => window.app.extensions.map((e) => e.name)")
    assert not [e for e in frontend_errors(page) if "trajectory_lab" in e], frontend_errors(page)


TEMPLATES_JS = """
async (expected) => {
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
  await window.app.extensionManager.command.execute("Comfy.BrowseTemplates");
  const dialog = () => document.querySelector(".p-dialog");
  const listed = () => expected.filter((name) => dialog()?.innerText.split("\\n").includes(name));
  for (let i = 0; i < 300 && listed().length < expected.length; i++) await sleep(50);
  // Cards load their thumbnails as they scroll into view: scroll through them until all have loaded.
  const loaded = new Set();
  const record = () => dialog().querySelectorAll("img").forEach((img) => {
    if (img.complete && img.naturalWidth > 0) loaded.add(img.alt);
  });
  for (let i = 0; i < 150 && loaded.size < expected.length; i++) {
    record();
    // Scroll the card grid down by half a view at a time, wrapping to the top.
    const scroller = [...dialog().querySelectorAll("*")].find((el) => el.scrollHeight > el.clientHeight + 10
      && ["auto", "scroll"].includes(getComputedStyle(el).overflowY));
    if (scroller) {
      const end = scroller.scrollTop + scroller.clientHeight >= scroller.scrollHeight - 2;
      scroller.scrollTop = end ? 0 : scroller.scrollTop + scroller.clientHeight / 2;
    }
    await sleep(100);
  }
  record();
  return { listed: listed(), thumbnails: [...loaded] };
}
"""


CLOSE_DIALOGS_JS = """
async () => {
  for (let i = 0; i < 100 && document.querySelector(".p-dialog"); i++) {
    document.querySelectorAll(".p-dialog .p-dialog-close-button, .p-dialog button:has(> i.pi-times)")
      .forEach((button) => button.click());
    await new Promise((r) => setTimeout(r, 50));
  }
  return !document.querySelector(".p-dialog");
}
"""


def test_template_browser_shows_every_example_with_its_thumbnail(page):
    shown = page.evaluate(TEMPLATES_JS, NAMES)
    page.screenshot(path=str(ARTIFACTS / "template_browser.png"))
    assert page.evaluate(CLOSE_DIALOGS_JS), "the template browser did not close"
    assert sorted(shown["listed"]) == NAMES
    assert set(NAMES) <= set(shown["thumbnails"]), set(NAMES) - set(shown["thumbnails"])


@pytest.mark.parametrize("name", NAMES)
def test_dropped_workflow_loads_completely_and_prompts_as_saved(page, name):
    text = (EXAMPLES_DIR / f"{name}.json").read_text()
    saved_file = json.loads(text)
    result = json.loads(page.evaluate(DROP_JS, [name, text]))
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))

    # No missing-nodes dialog, no schema or loading alert.
    assert not result["dialogs"], result["dialogs"]
    unknown = [n["type"] for n in result["nodes"] if not n["known"] or n["errors"]]
    assert not unknown, f"{name}: nodes the frontend does not know: {unknown}"
    # Every widget value lands on a widget: saving again gives the file's values back.
    values = {n["id"]: n.get("widgets_values") or [] for n in saved_file["nodes"]}
    assert {n["id"]: n.get("widgets_values") or [] for n in result["saved"]["nodes"]} == values
    # And the prompt the frontend would send is the API-format copy.
    assert result["api"] == json.loads((API_DIR / f"{name}.json").read_text())

    links = {(link[3], link[4]) for link in saved_file["links"]}
    for node in result["nodes"]:
        if node["type"] not in TIMELINE_NODES:
            assert node["timeline"] is None
            continue
        assert node["timeline"] and node["timeline"]["draws"] > 0, f"{node['type']}: timeline not drawn"
        file_node = next(n for n in saved_file["nodes"] if n["id"] == node["id"])
        linked = {slot["name"] for i, slot in enumerate(file_node.get("inputs", [])) if (node["id"], i) in links}
        want = expected_spans(node["type"], result["api"][str(node["id"])]["inputs"], linked)
        got = [edge for s in node["timeline"]["spans"] for edge in (s["from"], s["to"])]
        assert got == pytest.approx([edge for span in want for edge in span]), f"{name}: {node['type']} timeline"
    if any(n["type"] == "TL_VendiGuider" for n in result["nodes"]):
        # The c-VSG bank button asked the server for the bank's size (an empty bank in this fresh server).
        page.wait_for_function(f"({BANK_LABEL_JS})() === 'clear memory bank (0 stored)'", timeout=10_000)


def fkc_test_graph() -> Workflow:
    arch = {"arch": "sd15"}
    return Workflow(
        "fkc_tiny",
        "",
        [
            N(1, "TLTest_TinyModel", {**arch, "seed": 0}),
            N(2, "TLTest_TinyConditioning", {**arch, "seed": 1, "batch": 1}),
            N(3, "TLTest_TinyConditioning", {**arch, "seed": 2, "batch": 1}),
            N(4, "TL_FKCGuider", {"cfg": 3.0}, {"model": (1, 0), "positive": (2, 0), "negative": (3, 0)}),
            N(5, "TL_FKCSampler", {"particles": 4, "resample": "ess", "ess_threshold": 0.9}),
            N(6, "RandomNoise", {"noise_seed": 3, "control_after_generate": "fixed"}),
            N(7, "BasicScheduler", {"scheduler": "normal", "steps": 6}, {"model": (1, 0)}),
            N(8, "TLTest_TinyLatent", {**arch, "batch": 2}),
            custom_sampling(9, noise=6, guider=4, sampler=5, sigmas=7, latent=8),
            N(10, "TLTest_TinyVAE", {"latent_channels": 4}),
            N(11, "VAEDecode", inputs={"samples": (9, 0), "vae": (10, 0)}),
            N(12, "PreviewImage", inputs={"images": (11, 0)}),
        ],
    )


def test_fkc_sampler_plots_the_ess_of_a_run_queued_from_the_page(page):
    page.evaluate(BUILD_JS, spec_json(fkc_test_graph()))
    before = page.evaluate(FKC_STATE_JS)[0]
    run = page.evaluate(QUEUE_JS, [60_000])
    page.wait_for_timeout(200)
    after = page.evaluate(FKC_STATE_JS)[0]
    page.screenshot(path=str(ARTIFACTS / "fkc_ess_plot.png"), clip=page.evaluate(FIT_VIEW_JS, [after["id"]]))

    raw = run["raw"]
    assert [e["step"] for e in raw] == list(range(6)) and all(len(e["ess"]) == 2 for e in raw)  # 6 steps, 2 images
    plotted = page.evaluate(
        "(id) => window.app.graph.getNodeById(id).widgets.find((w) => w.name === 'trajectory_timeline').run",
        after["id"],
    )
    # What the plot shows per step: the mean ESS over the images as a fraction of the particles, and whether
    # any image's particles were resampled.
    assert [p["step"] for p in plotted] == list(range(6))
    assert [p["essFraction"] for p in plotted] == pytest.approx([sum(e["ess"]) / 2 / 4 for e in raw])
    assert [p["resampled"] for p in plotted] == [any(e["resampled"]) for e in raw]
    assert all(0 < p["essFraction"] <= 1 for p in plotted) and any(p["resampled"] for p in plotted)
    # The plot took room and was drawn again after the run.
    assert after["height"] > before["height"] and after["draws"] > before["draws"]
    assert after["size"][1] >= before["size"][1] + (after["height"] - before["height"])
    assert run["outputs"], "the preview image never reached the page"


def expected_outputs(prompt: dict) -> tuple[int, tuple[int, int], int]:
    """(images, (width, height), frames) a demo workflow must save, from its own widget values."""
    latent = next(n["inputs"] for n in prompt.values() if n["class_type"] == "TL_EmptyDemoLatent")
    scale = next((n["inputs"]["scale_factor"] for n in prompt.values() if n["class_type"] == "TL_DiffuseHigh"), 1)
    size = (round(latent["width"] * scale), round(latent["height"] * scale))
    video = next((n["inputs"] for n in prompt.values() if n["class_type"] == "TL_MultiTextVideo"), None)
    if video is None:
        return latent["batch_size"], size, 1
    prompts = next(n["inputs"]["text"] for n in prompt.values() if n["class_type"] == "TL_DemoPromptSequence")
    segments = len([line for line in prompts.splitlines() if line.strip()])
    return 1, size, 1 + segments * (latent["frames"] - 1)  # segments share their boundary frame


@pytest.mark.parametrize("name", DEMO_NAMES)
def test_demo_workflow_runs_from_the_page_to_its_images(page, server, name):
    import io
    import urllib.parse
    import urllib.request

    from PIL import Image

    text = (EXAMPLES_DIR / f"{name}.json").read_text()
    page.evaluate(DROP_JS, [name, text])
    run = page.evaluate(QUEUE_JS, [120_000])
    page.screenshot(path=str(ARTIFACTS / f"{name}_run.png"))
    files = [image for images in run["outputs"].values() for image in images]
    count, size, frames = expected_outputs(json.loads((API_DIR / f"{name}.json").read_text()))
    assert len(files) == count, f"{name}: {files}"
    for file in files:
        with urllib.request.urlopen(f"{server.url}/api/view?{urllib.parse.urlencode(file)}", timeout=10) as r:
            image = Image.open(io.BytesIO(r.read()))
        assert image.size == size and getattr(image, "n_frames", 1) == frames, (name, image.size, image.n_frames)
    if "TL_VendiGuider" in text:  # the run stored its images in the memory bank; the node's button empties it
        page.wait_for_function(f"({BANK_LABEL_JS})() === 'clear memory bank ({count} stored)'", timeout=10_000)
        assert page.evaluate(CLEAR_BANK_JS) == "clear memory bank (0 stored)"


def test_the_drop_check_sees_a_missing_node_and_a_lost_widget_value(page):
    # The checks above can fail: a node type the server lacks, and a widget value with no widget to land on.
    workflow = json.loads((EXAMPLES_DIR / "pag_sdxl.json").read_text())
    pag = next(n for n in workflow["nodes"] if n["type"] == "TL_PerturbedAttention")
    pag["type"] = "TL_NoSuchNode"
    sampler = next(n for n in workflow["nodes"] if n["type"] == "KSampler")
    sampler["widgets_values"].append("stray value")
    result = json.loads(page.evaluate(DROP_JS, ["broken", json.dumps(workflow)]))
    page.evaluate(CLOSE_DIALOGS_JS)
    assert any("TL_NoSuchNode" in d for d in result["dialogs"]), result["dialogs"]
    assert [n["type"] for n in result["nodes"] if not n["known"]] == ["TL_NoSuchNode"]
    saved = next(n for n in result["saved"]["nodes"] if n["type"] == "KSampler")
    assert saved["widgets_values"] != sampler["widgets_values"]


TIMELINES_JS = """
() => Object.fromEntries(window.app.graph.nodes
  .filter((n) => n.widgets?.some((w) => w.name === "trajectory_timeline"))
  .map((n) => [n.id, n.widgets.find((w) => w.name === "trajectory_timeline").timeline.spans])
  .map(([id, spans]) => [id, spans.map((s) => [s.from, s.to])]))
"""


def test_stitching_timelines_follow_widgets_and_links(page):
    # A chain draws one span per connected model; the guider its switch point; edits redraw.
    tiny = {"arch": "sd15"}
    graph = Workflow(
        "stitch_timelines",
        "",
        [
            N(1, "TLTest_TinyModel", {**tiny, "seed": 0}),
            N(2, "TLTest_TinyModel", {**tiny, "seed": 1}),
            N(3, "TLTest_TinyModel", {**tiny, "seed": 2}),
            N(
                4,
                "TL_TStitchChain",
                {"switch_1": 0.3, "switch_2": 0.7, "switch_3": 0.9},
                {"model_1": (1, 0), "model_2": (2, 0), "model_3": (3, 0)},
            ),  # fmt: skip
            N(5, "TLTest_TinyConditioning", {**tiny, "seed": 3}),
            N(
                6,
                "TL_TStitchGuider",
                {"small_fraction": 0.25},
                {
                    "small_model": (1, 0),
                    "large_model": (2, 0),
                    "small_positive": (5, 0),
                    "small_negative": (5, 0),
                    "large_positive": (5, 0),
                    "large_negative": (5, 0),
                },
            ),  # fmt: skip
        ],
    )
    page.evaluate(BUILD_JS, spec_json(graph))
    page.wait_for_timeout(300)
    spans = page.evaluate(TIMELINES_JS)
    assert [edge for span in spans["4"] for edge in span] == pytest.approx([0, 0.3, 0.3, 0.7, 0.7, 1])
    assert [edge for span in spans["6"] for edge in span] == pytest.approx([0, 0.25, 0.25, 1])
    page.evaluate("""() => {
      const chain = window.app.graph.getNodeById(4);
      chain.disconnectInput(chain.findInputSlot("model_3"));
      chain.widgets.find((w) => w.name === "switch_1").value = 0.5;
      chain.setDirtyCanvas(true, true);
    }""")
    page.wait_for_timeout(300)
    assert [edge for span in page.evaluate(TIMELINES_JS)["4"] for edge in span] == pytest.approx([0, 0.5, 0.5, 1])
    page.screenshot(path=str(ARTIFACTS / "stitch_timelines.png"), clip=page.evaluate(FIT_VIEW_JS, [4, 6]))
