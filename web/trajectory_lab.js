// Trajectory Lab frontend extension (served through WEB_DIRECTORY).
// - A timeline on the nodes that act on part of the sampling trajectory (noisy start on the left, clean end on
//   the right): the PAG window, the T-Stitch switch points, the FKC resampling window, the c-VSG guided steps.
// - After a run, TL_FKCSampler plots each step's effective sample size (ESS) and marks the steps that resampled,
//   from the sampler's `trajectory_lab.fkc_step` events.
// - c-VSG memory banks: a button on the nodes that name a bank shows how many generations it holds and clears
//   it through the pack's server route (the bank name is validated server-side; no file path leaves the page).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const BANK_NODES = new Set(["TL_VendiGuider", "TL_VendiClearBank"]);
const BANK_ROUTE = "/trajectory_lab/vendi/banks/";
const CLEAR_ROUTE = "/trajectory_lab/vendi/clear";
const FKC_EVENT = "trajectory_lab.fkc_step";

const COLORS = { active: "#4f9de8", other: "#7a5ac8", idle: "#3a3a3a", text: "#ddd", ess: "#e8b04f", resample: "#e85a5a" };

function value(node, name, fallback) {
  const widget = node.widgets?.find((w) => w.name === name);
  return typeof widget?.value === "number" ? widget.value : fallback;
}

function linked(node, name) {
  return node.inputs?.some((input) => input.name === name && input.link != null) ?? false;
}

function clamp01(x) {
  return Math.min(1, Math.max(0, x));
}

// Each describes the trajectory as spans over [0, 1] (0 = first step, 1 = last) with labels.
const TIMELINES = {
  TL_PerturbedAttention: (node) => window_(node, "start_percent", "end_percent", "PAG"),
  TL_FKCSampler: (node) => window_(node, "resample_start_percent", "resample_end_percent", "resampling"),
  TL_VendiGuider: (node) =>
    window_(node, "start_percent", "end_percent", `guided every ${value(node, "every_n_steps", 5)} steps`),
  TL_TStitchModel: (node) => stitch([value(node, "small_fraction", 0.4)], ["small", "large"]),
  TL_TStitchGuider: (node) => stitch([value(node, "small_fraction", 0.4)], ["small", "large"]),
  TL_TStitchChain: (node) => {
    const models = 2 + (linked(node, "model_3") ? 1 : 0) + (linked(node, "model_3") && linked(node, "model_4") ? 1 : 0);
    const switches = ["switch_1", "switch_2", "switch_3"].slice(0, models - 1).map((name) => value(node, name, 0.5));
    return stitch(switches, ["model 1", "model 2", "model 3", "model 4"]);
  },
};

const percent = (x) => `${Math.round(x * 100)}%`;

function window_(node, startName, endName, label) {
  const start = clamp01(value(node, startName, 0)), end = clamp01(value(node, endName, 1));
  const text = `${label} ${percent(start)}-${percent(end)}`;
  return { spans: end > start ? [{ from: start, to: end, color: COLORS.active, label: text }] : [], empty: `no ${label}` };
}

function stitch(switches, labels) {
  const edges = [0, ...switches.map(clamp01), 1];
  const spans = [];
  for (let i = 0; i + 1 < edges.length; i++) {
    const from = Math.max(edges[i], spans.at(-1)?.to ?? 0), to = Math.max(edges[i + 1], from);
    const label = `${labels[i]} ${percent(from)}-${percent(to)}`;
    if (to > from) spans.push({ from, to, color: i % 2 ? COLORS.other : COLORS.active, label });
  }
  return { spans, empty: "" };
}

function drawTimeline(ctx, timeline, x, y, width, height) {
  ctx.save();
  ctx.fillStyle = COLORS.idle;
  ctx.fillRect(x, y, width, height);
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "middle";
  for (const span of timeline.spans) {
    const left = x + span.from * width, w = (span.to - span.from) * width;
    ctx.fillStyle = span.color;
    ctx.fillRect(left, y, w, height);
    ctx.fillStyle = COLORS.text;
    ctx.fillText(span.label, left + 3, y + height / 2, Math.max(w - 6, 0));
  }
  if (!timeline.spans.length) {
    ctx.fillStyle = COLORS.text;
    ctx.fillText(timeline.empty, x + 3, y + height / 2);
  }
  ctx.restore();
}

// FKC: per-step records of the latest run, keyed by the TL_FKCSampler node that drew them.
const fkcRuns = new Map();

function drawEssPlot(ctx, steps, x, top, width, fullHeight) {
  ctx.save();
  const caption = 12, y = top + caption, height = fullHeight - caption; // the caption sits above the plot
  ctx.fillStyle = "#222";
  ctx.fillRect(x, y, width, height);
  const total = steps[0].steps, dx = width / Math.max(total, 1);
  for (const s of steps) {
    if (!s.resampled) continue;
    ctx.fillStyle = COLORS.resample;
    ctx.fillRect(x + s.step * dx, y, Math.max(dx - 1, 1), height);
  }
  ctx.strokeStyle = COLORS.ess;
  ctx.lineWidth = 1.5;
  ctx.beginPath();
  steps.forEach((s, i) => {
    const px = x + (s.step + 0.5) * dx, py = y + height - s.essFraction * height;
    i ? ctx.lineTo(px, py) : ctx.moveTo(px, py);
  });
  ctx.stroke();
  ctx.fillStyle = COLORS.text;
  ctx.font = "10px sans-serif";
  ctx.textBaseline = "top";
  const resampled = steps.filter((s) => s.resampled).length;
  ctx.fillText(`ESS / particles (line); resampled ${resampled} of ${total} steps (red)`, x, top, width);
  ctx.restore();
}

function fkcTargets(event) {
  const graph = app.graph, executing = graph.getNodeById(Number(event.node)) ?? graph.getNodeById(event.node);
  const samplerInput = executing?.inputs?.find((input) => input.name === "sampler" && input.link != null);
  const source = samplerInput ? graph.getLink?.(samplerInput.link) ?? graph.links[samplerInput.link] : null;
  const origin = source ? graph.getNodeById(source.origin_id) : null;
  if (origin?.type === "TL_FKCSampler") return [origin];
  return graph.nodes.filter((node) => node.type === "TL_FKCSampler"); // sampler reached through other nodes
}

function onFkcStep({ detail }) {
  const record = {
    step: detail.step,
    steps: detail.steps,
    essFraction: detail.ess.reduce((a, b) => a + b, 0) / detail.ess.length / detail.particles,
    resampled: detail.resampled.some(Boolean),
  };
  for (const node of fkcTargets(detail)) {
    const run = detail.step === 0 || !fkcRuns.has(node.id) ? [] : fkcRuns.get(node.id);
    run.push(record);
    fkcRuns.set(node.id, run);
    if (run.length === 1) node.setSize([node.size[0], Math.max(node.size[1], node.computeSize()[1])]); // room for the plot
    node.setDirtyCanvas(true, false);
  }
}

const TIMELINE_HEIGHT = 16, PLOT_HEIGHT = 64;

// One canvas widget per node: the timeline, and on TL_FKCSampler the ESS plot once a run reported.
function trajectoryWidget(node, describe) {
  return {
    name: "trajectory_timeline",
    type: "trajectory_lab.timeline",
    value: null,
    serialize: false, // a drawing, not an input: not saved in widgets_values, not sent with the prompt
    options: { serialize: false },
    draws: 0,
    get run() {
      return fkcRuns.get(node.id) ?? [];
    },
    computeSize(width) {
      return [width, TIMELINE_HEIGHT + 8 + (fkcRuns.get(node.id)?.length ? PLOT_HEIGHT + 6 : 0)];
    },
    draw(ctx, _node, width, y) {
      const margin = 15, inner = width - 2 * margin;
      this.timeline = describe(node);
      drawTimeline(ctx, this.timeline, margin, y + 4, inner, TIMELINE_HEIGHT);
      const run = fkcRuns.get(node.id);
      if (run?.length) drawEssPlot(ctx, run, margin, y + TIMELINE_HEIGHT + 10, inner, PLOT_HEIGHT);
      this.draws += 1;
    },
  };
}

async function bankSize(name) {
  const response = await api.fetchApi(BANK_ROUTE + encodeURIComponent(name));
  if (!response.ok) return null;
  return (await response.json()).total;
}

async function clearBank(name) {
  const response = await api.fetchApi(CLEAR_ROUTE, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name }),
  });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error ?? response.statusText);
  return body.cleared;
}

function bankWidget(node) {
  return node.widgets?.find((w) => w.name === "memory_bank");
}

async function refreshLabel(node, button) {
  const name = bankWidget(node)?.value;
  const size = name ? await bankSize(name).catch(() => null) : null;
  button.name = size === null ? "clear memory bank" : `clear memory bank (${size} stored)`;
  node.setDirtyCanvas(true, false);
}

function addBankButton(node) {
  const button = node.addWidget("button", "clear memory bank", null, async () => {
    const name = bankWidget(node)?.value;
    if (!name || !confirm(`Clear the c-VSG memory bank "${name}"?`)) return;
    try {
      await clearBank(name);
    } catch (error) {
      alert(`Could not clear "${name}": ${error.message}`);
    }
    await refreshLabel(node, button);
  }, { serialize: false }); // a button, not a value: not part of the prompt or the saved widget values
  refreshLabel(node, button);
  api.addEventListener("executed", () => refreshLabel(node, button));
}

app.registerExtension({
  name: "trajectory_lab.core",
  async setup() {
    api.addEventListener(FKC_EVENT, onFkcStep);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    const describe = TIMELINES[nodeData.name];
    if (!describe && !BANK_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (BANK_NODES.has(nodeData.name)) addBankButton(this);
      if (describe) {
        // Last: a widget that is not serialized leaves no gap in the saved widgets_values only at the end.
        this.addCustomWidget(trajectoryWidget(this, describe));
        this.setSize(this.computeSize());
      }
      return result;
    };
  },
});
