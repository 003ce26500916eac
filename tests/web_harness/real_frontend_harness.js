// Runs inside ComfyUI's real frontend (comfyui-frontend-package) served by tests/frontend_standin.py: plays the
// scenario named by the page's ?scenario= and POSTs a JSON report to /api/harness/report (tests/test_web_frontend.py
// checks it). Loaded as one more extension, after the pack's.
//   boot       the frontend is up and knows the pack's nodes
//   examples   every example workflow: no two nodes overlap, as loaded and once every settings node shows its
//              memory estimate (the estimate box inside its node, its last line in view); node widths
//   panel      the LoRA example is queued: the panel shows its run, Save now is confirmed, Stop after epoch ends
//              the run as stopped (no ETA); a second workflow's Train node with the same id shows nothing; the
//              first workflow loaded again (as a tab switch does) shows its own run
//   subgraph   the LoRA example with its Train node turned into a subgraph (as the canvas's "Convert to Subgraph"
//              does): the prompt names it "<subgraph node>:<node>", its panel binds to the queued prompt, shows the
//              run and stops it from its button
//   templates  the Templates browser: each of the pack's templates shows its title, and the pack's name
//   shots      for tests/frontend_shots.py: the panel mid-run and stopped, then every example, each followed by
//              POST /api/harness/shot {name} (answered once the screenshot is taken)
// Page parameters: pack (the pack's folder name under custom_nodes, the key of GET /workflow_templates; the stand-in
// serves it as comfyui-dreambooth), overrides (JSON list of "Node title.widget=value" set on the LoRA example before
// it is queued: a real ComfyUI trains it, so tests/test_real_comfyui_browser.py makes it a tiny run), wait (the
// longest wait for a run's step, in seconds: a real run prepares its data first).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PARAMS = new URLSearchParams(location.search);
const PACK = PARAMS.get("pack") ?? "comfyui-dreambooth";
const OVERRIDES = JSON.parse(PARAMS.get("overrides") ?? "[]");
const RUN_WAIT_MS = Number(PARAMS.get("wait") ?? 60) * 1000;
const LORA = "LoRA of a person with prior preservation";   // tests/make_example_workflows.py
const report = { errors: [] };
window.addEventListener("error", (event) => report.errors.push(String(event.message)));
window.addEventListener("unhandledrejection", (event) => report.errors.push(String(event.reason)));
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const ESTIMATE_NODES = new Set(["DreamBoothSettings", "DreamBoothOptimizer", "DreamBoothAdvanced", "DreamBoothData",
                                "DreamBoothImagic", "DreamBoothValidation", "PerformanceWizard"]);
// the text a settings node shows after it ran (nodes/settings.py via training/memory.py), 14 lines
const ESTIMATE = ["Memory estimate for SD1.x (LoRA rank 16, batch 1, 512px) on cuda:0 (12.00 GB free)",
  ...["weights", "gradients", "optimizer", "ema", "weight_casts", "activations", "text_encoders", "vae", "overhead"]
    .map((part, i) => `${part.padEnd(14)}${(0.1 + i / 10).toFixed(2).padStart(8)} GB`),
  "activations, weight_casts and overhead are calibrated estimates (+-30%); weights, gradients, optimizer, ema, "
    + "text_encoders and vae are exact for these settings",
  `${"total".padEnd(14)}${"3.74".padStart(8)} GB`].join("\n");

async function until(test, what, timeoutMs = 20000) {
  const start = Date.now();
  while (Date.now() - start < timeoutMs) {
    const value = test();
    if (value) return value;
    await sleep(50);
  }
  throw new Error(`timed out waiting for ${what}`);
}

async function redraw() {
  app.graph.setDirtyCanvas(true, true);
  app.canvas.draw(true, true);
  await sleep(150);
}

async function template(name) {
  return (await fetch(`/api/workflow_templates/${encodeURIComponent(PACK)}/${encodeURIComponent(name)}.json`)).json();
}

// "Node title.widget=value" (the runner's --set) on the loaded graph; a number or boolean widget gets its type
function applyOverrides(graph = app.graph) {
  for (const override of OVERRIDES) {
    const [target, ...rest] = override.split("=");
    const dot = target.lastIndexOf(".");
    const title = target.slice(0, dot), name = target.slice(dot + 1), raw = rest.join("=");
    const node = graph.nodes.find((n) => n.title === title || n.type === title);
    const widget = node?.widgets?.find((w) => w.name === name);
    if (!widget) throw new Error(`override ${override}: no such node/widget`);
    widget.value = typeof widget.value === "number" ? Number(raw)
      : typeof widget.value === "boolean" ? raw.toLowerCase() === "true" : raw;
    widget.callback?.(widget.value);
  }
}

function overlaps() {
  const found = [];
  const nodes = app.graph.nodes.filter((n) => !n.flags?.collapsed);
  for (let i = 0; i < nodes.length; i++) {
    for (let j = i + 1; j < nodes.length; j++) {
      const [ax, ay, aw, ah] = nodes[i].boundingRect;
      const [bx, by, bw, bh] = nodes[j].boundingRect;
      const w = Math.min(ax + aw, bx + bw) - Math.max(ax, bx);
      const h = Math.min(ay + ah, by + bh) - Math.max(ay, by);
      if (w > 0 && h > 0) found.push([nodes[i].title, nodes[j].title, Math.round(w), Math.round(h)]);
    }
  }
  return found;
}

async function examples() {
  const names = (await (await fetch("/api/workflow_templates")).json())[PACK];
  report.examples = {};
  for (const name of names) {
    await app.loadGraphData(await template(name), true, true, `${name}.json`);
    await redraw();
    const entry = { loaded: overlaps(), widths: {}, estimates: {} };
    for (const node of app.graph.nodes) entry.widths[node.title] = [node.type, Math.round(node.size[0])];
    for (const node of app.graph.nodes) if (ESTIMATE_NODES.has(node.type)) node.onExecuted?.({ text: [ESTIMATE] });
    await redraw();
    for (const node of app.graph.nodes) {
      if (!ESTIMATE_NODES.has(node.type)) continue;
      const box = node.__dreamboothEstimate?.box;
      entry.estimates[node.title] = {
        shown: !!box, width: Math.round(node.size[0]), height: Math.round(node.size[1]),
        needed: Math.round(node.computeSize()[1]), scrolls: box ? box.scrollHeight > box.clientHeight + 1 : null,
      };
    }
    entry.withEstimates = overlaps();
    entry.rects = Object.fromEntries(app.graph.nodes.map((n) => [`${n.id} ${n.title}`, [...n.boundingRect].map(Math.round)]));
    report.examples[name] = entry;
  }
}

function describePanel(node) {
  const root = node.__dreamboothPanel?.root;
  if (!root) return null;
  return {
    state: root.querySelector(".db-state").textContent,
    message: root.querySelector(".db-message").textContent,
    fields: Object.fromEntries([...root.querySelectorAll("[data-field]")].map((e) => [e.dataset.field, e.textContent])),
    buttons: Object.fromEntries([...root.querySelectorAll("button")].map((b) => [b.dataset.action, b.disabled])),
    width: Math.round(node.size[0]),
  };
}

const trainNode = () => app.graph.nodes.find((n) => n.type === "TrainDreamBooth");

async function panel() {
  const workflow = await template(LORA);
  await app.loadGraphData(workflow, true, true, "first.json");
  applyOverrides();
  await redraw();
  const train = trainNode();
  report.beforeQueue = describePanel(train);
  await app.queuePrompt(0, 1);
  report.prompts = train.properties?.dreambooth_prompts ?? null;
  await until(() => Number(describePanel(trainNode())?.fields.step.split(" / ")[0]) >= 3, "the run's third step",
              RUN_WAIT_MS);
  report.midRun = describePanel(trainNode());
  trainNode().__dreamboothPanel.root.querySelector('button[data-action="save_now"]').click();
  report.saved = await until(() => {
    const shown = describePanel(trainNode());
    return shown.message.startsWith("saved step ") ? shown : null;
  }, "the save to be confirmed", RUN_WAIT_MS);
  trainNode().__dreamboothPanel.root.querySelector('button[data-action="stop_after_epoch"]').click();
  report.stopped = await until(() => {
    const shown = describePanel(trainNode());
    return shown.state === "stopped" ? shown : null;
  }, "the run to stop", RUN_WAIT_MS);
  const first = app.graph.serialize();
  // another workflow (a new tab) whose Train node has the same id
  const other = structuredClone(workflow);
  for (const node of other.nodes) if (node.properties) delete node.properties.dreambooth_prompts;
  await app.loadGraphData(other, true, true, "second.json");
  await redraw();
  report.otherWorkflow = describePanel(trainNode());
  report.sameId = String(trainNode().id) === String(train.id);
  // back to the first workflow, as a tab switch loads it
  await app.loadGraphData(first, true, true, "first-again.json");
  await redraw();
  report.firstAgain = describePanel(trainNode());
}

async function subgraph() {
  await app.loadGraphData(await template(LORA), true, true, "subgraph.json");
  applyOverrides();
  await redraw();
  app.graph.convertToSubgraph(new Set([trainNode()]));
  await redraw();
  const instance = app.graph.nodes.find((n) => n.isSubgraphNode?.());
  const inner = instance?.subgraph?.nodes.find((n) => n.type === "TrainDreamBooth");
  if (!inner) throw new Error("the Train node did not land in a subgraph");
  const { output } = await app.graphToPrompt();
  report.subgraph = {
    instance: String(instance.id), inner: String(inner.id), onRoot: !!trainNode(),
    trainIds: Object.keys(output).filter((id) => output[id].class_type === "TrainDreamBooth"),
    beforeQueue: describePanel(inner),
  };
  await app.queuePrompt(0, 1);
  report.subgraph.prompts = inner.properties?.dreambooth_prompts ?? null;
  report.subgraph.running = await until(() => {
    const shown = describePanel(inner);
    return Number(shown?.fields.step.split(" / ")[0]) >= 3 ? shown : null;
  }, "the subgraph's run", RUN_WAIT_MS);
  inner.__dreamboothPanel.root.querySelector('button[data-action="stop_after_epoch"]').click();
  report.subgraph.stopped = await until(() => {
    const shown = describePanel(inner);
    return shown.state === "stopped" ? shown : null;
  }, "the subgraph's run to stop", RUN_WAIT_MS);
}

// the Templates browser as a user opens it (menu: Workflow > Browse Templates)
async function templates() {
  await app.extensionManager.command.execute("Comfy.BrowseTemplates");
  const cards = () => [...document.querySelectorAll('[data-testid^="template-workflow-"]')];
  const names = (await (await fetch("/api/workflow_templates")).json())[PACK];
  // the pack's entry in the dialog's list of template sources, then its cards
  const dialog = await until(() => document.querySelector(".p-dialog"), "the templates dialog");
  const source = await until(() => [...dialog.querySelectorAll("li, [role='option'], button, a, span, div")]
    .find((e) => e.children.length === 0 && e.textContent.trim() === report.packLabel), "the pack in the list");
  report.templateSource = source.parentElement?.outerHTML?.slice(0, 600) ?? null;
  (source.closest("li, [role='option'], button, a") ?? source).click();
  await until(() => cards().some((c) => names.includes(c.dataset.testid.slice("template-workflow-".length))),
              "the pack's template cards", 60000).catch((error) => {
    report.templateCardsSeen = cards().map((c) => c.dataset.testid).slice(0, 10);
    throw error;
  });
  const nameOf = (card) => card.dataset.testid.slice("template-workflow-".length);
  report.templateCards = Object.fromEntries(cards().map((card) => [nameOf(card),
    card.innerText.split("\n").map((l) => l.trim()).filter(Boolean)]));
  // thumbnails load lazily (the src is set once the card is in view): bring each card into view and wait for it
  report.templateThumbnails = {};
  for (const card of cards()) {
    card.scrollIntoView();
    const loaded = () => [...card.querySelectorAll("img")].map((img) => img.src && img.complete && img.naturalWidth > 0);
    await until(() => loaded().length && loaded().every(Boolean), "a thumbnail", 10000).catch(() => null);
    report.templateThumbnails[nameOf(card)] = loaded();
  }
  document.querySelectorAll(".p-dialog-mask").forEach((mask) => mask.remove());
}

// a screenshot of the canvas area (not the menus around it)
async function shoot(name) {
  await redraw();
  await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
  await sleep(300);
  const { x, y, width, height } = app.canvas.canvas.getBoundingClientRect();
  await fetch("/api/harness/shot", { method: "POST", headers: { "Content-Type": "application/json" },
                                     body: JSON.stringify({ name, clip: [x, y, width, height].map(Math.round) }) });
}

// the view on `nodes` (all of the graph by default), as large as the canvas allows
function frame(nodes = app.graph.nodes, margin = 40, maxScale = 1.2) {
  const rects = nodes.map((n) => n.boundingRect);
  const x0 = Math.min(...rects.map((r) => r[0])), y0 = Math.min(...rects.map((r) => r[1]));
  const x1 = Math.max(...rects.map((r) => r[0] + r[2])), y1 = Math.max(...rects.map((r) => r[1] + r[3]));
  const { width, height } = app.canvas.canvas.getBoundingClientRect();
  app.canvas.ds.changeScale?.(1);
  const scale = Math.min(maxScale, (width - 2 * margin) / (x1 - x0), (height - 2 * margin) / (y1 - y0));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [margin / scale - x0, margin / scale - y0];
}

async function shots() {
  document.querySelectorAll(".p-dialog-mask").forEach((mask) => mask.remove());
  const workflow = await template(LORA);
  await app.loadGraphData(workflow, true, false, `${LORA}.json`);
  await app.queuePrompt(0, 1);
  await until(() => Number(describePanel(trainNode())?.fields.step.split(" / ")[0]) >= 150, "step 150", 60000);
  const nearby = [trainNode()];
  frame(nearby, 30, 1.4);
  await shoot("panel-mid-run");
  trainNode().__dreamboothPanel.root.querySelector('button[data-action="stop_after_epoch"]').click();
  await until(() => describePanel(trainNode())?.state === "stopped", "the stop", 30000);
  frame(nearby, 30, 1.4);
  await shoot("panel-stopped");
  const names = (await (await fetch("/api/workflow_templates")).json())[PACK];
  for (const name of names) {
    await app.loadGraphData(await template(name), true, false, `${name}.json`);
    await sleep(300);
    frame();
    await shoot(`example:${name}`);
  }
}

app.registerExtension({
  name: "dreambooth.real-frontend-harness",
  async setup() {
    const scenario = new URLSearchParams(location.search).get("scenario") ?? "boot";
    report.scenario = scenario;
    setTimeout(async () => {
      try {
        report.train = !!LiteGraph.registered_node_types.TrainDreamBooth;
        report.socket = { url: api.socket?.url ?? null, state: api.socket?.readyState ?? null };
        if (scenario === "examples") await examples();
        if (scenario === "panel") await panel();
        if (scenario === "subgraph") await subgraph();
        if (scenario === "templates") {
          report.packLabel = PARAMS.get("label") ?? PACK;
          await templates();
        }
        if (scenario === "shots") await shots();
      } catch (error) {
        report.errors.push(`harness: ${error?.stack ?? error}`);
      }
      report.done = true;
      await fetch("/api/harness/report", { method: "POST", headers: { "Content-Type": "application/json" },
                                           body: JSON.stringify(report) });
    }, 500);
  },
});
