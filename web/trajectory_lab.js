// Trajectory Lab frontend extension (served through WEB_DIRECTORY).
// c-VSG memory banks: a button on the nodes that name a bank shows how many generations it holds and clears
// it through the pack's server route (the bank name is validated server-side; no file path leaves the page).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const BANK_NODES = new Set(["TL_VendiGuider", "TL_VendiClearBank"]);
const BANK_ROUTE = "/trajectory_lab/vendi/banks/";
const CLEAR_ROUTE = "/trajectory_lab/vendi/clear";

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

app.registerExtension({
  name: "trajectory_lab.core",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!BANK_NODES.has(nodeData.name)) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const button = this.addWidget("button", "clear memory bank", null, async () => {
        const name = bankWidget(this)?.value;
        if (!name || !confirm(`Clear the c-VSG memory bank "${name}"?`)) return;
        try {
          await clearBank(name);
        } catch (error) {
          alert(`Could not clear "${name}": ${error.message}`);
        }
        await refreshLabel(this, button);
      }, { serialize: false }); // a button, not a value: not part of the prompt or the saved widget values
      refreshLabel(this, button);
      api.addEventListener("executed", () => refreshLabel(this, button));
      return result;
    };
  },
});
