// Live training panel for the TrainDreamBooth node.
//
// Fed by the messages nodes/live.py sends through ComfyUI's PromptServer:
//   "dreambooth.progress" {node, run, state, step, total, epoch, loss, lr, it_per_s, eta_s, points: [[step, loss]...],
//                          val_points: [[step, validation loss]...] (runs that validate)}
//   "dreambooth.preview"  {node, run, step, images: [{filename, subfolder, type}]}
//   "dreambooth.status"   {node, run, state, message, control}
// and restored after a page reload / reconnect from GET /dreambooth/state. Buttons POST /dreambooth/control
// {node, run, action} with the run id this panel shows: the server refuses a stale one (409) instead of acting on
// the run that replaced it, and then the panel fetches the current state.
// Node ids repeat across workflows (every new graph has a node 5), so a panel shows only runs started by prompts
// its own workflow queued: the extension wraps api.queuePrompt and records the prompt id ComfyUI answers in the
// node's properties (saved with the workflow, so a reloaded page finds its run again); every message names the
// prompt of its run. A node that has not run shows nothing.
// Inside a subgraph ComfyUI executes a node under its execution id, the ids of the subgraph nodes on the way down
// and its own joined by ":" ("12:5": node 5 of the subgraph that node 12 of the root graph instantiates), while the
// canvas knows it as 5: the panel binds, shows and controls the runs of its node's execution ids, never those of
// node 5 of the root graph. A subgraph used by several subgraph nodes runs once per instance ("12:5", "13:5"): its
// one panel shows the newest of those runs and controls the run it shows.
// Plain ES module, no dependencies: ComfyUI's app/api only. Every field may be missing (older/newer backend).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TRAIN_NODE_TYPES = new Set(["TrainDreamBooth"]);
const EVENTS = { progress: "dreambooth.progress", preview: "dreambooth.preview", status: "dreambooth.status" };
const TERMINAL_STATES = new Set(["done", "stopped", "error", "interrupted"]);
const MAX_POINTS = 2000;          // client-side loss points per run (pairs are merged beyond that)
const CHART_HEIGHT = 150;         // CSS pixels
const PANEL_MIN_HEIGHT = 340;
const PANEL_MIN_WIDTH = 380;
const COLORS = {
  background: "#161616", grid: "#2e2e2e", axis: "#8a8a8a",
  raw: "rgba(96, 150, 255, 0.55)", smooth: "#ffa640", validation: "#4cd07a",
};
const STATE_COLORS = {
  idle: "#666", starting: "#4a7bd0", running: "#3a9d4f", saving: "#4a7bd0", sampling: "#4a7bd0",
  stopping: "#c98a1b", done: "#3a9d4f", stopped: "#777", error: "#c0392b", interrupted: "#c98a1b",
};

// ---------------------------------------------------------------------------------------------------------------
// Run models: one per run id, the single source of truth every panel draws from.
// ---------------------------------------------------------------------------------------------------------------
const runs = new Map();     // run id -> run model, oldest first
const panels = new Set();   // live Panel objects
const MAX_RUNS = 64;        // run models kept in this page
const PROMPTS_PROPERTY = "dreambooth_prompts";   // node property: prompt ids its workflow queued, newest last
const MAX_BOUND_PROMPTS = 8;

function emptyRun(nodeId, runId, promptId) {
  return {
    node: nodeId, run: runId ?? null, prompt: promptId ?? null, state: "starting", message: "",
    step: null, total: null, epoch: null, epochs: null, stage: null, loss: null, lr: null, it_per_s: null, eta_s: null,
    history: [], validation: [], previews: [], preview_step: null, control: null,
  };
}

function runKey(data) {
  return data.run != null ? String(data.run) : `node:${data.node}`;
}

function keepRun(model) {
  runs.delete(model.run ?? `node:${model.node}`);
  runs.set(model.run ?? `node:${model.node}`, model);
  while (runs.size > MAX_RUNS) runs.delete(runs.keys().next().value);
}

// The model for a message: a new run id means a new run -> fresh chart.
function runFor(data) {
  let model = runs.get(runKey(data));
  if (!model) {
    model = emptyRun(String(data.node), data.run ?? null, data.prompt ?? null);
    keepRun(model);
  } else if (model.prompt == null && data.prompt != null) {
    model.prompt = String(data.prompt);
  }
  return model;
}

// --- which node a message means: the node's execution ids ------------------------------------------------------
const MAX_SUBGRAPH_DEPTH = 16;

function graphNodes(graph) {
  const nodes = graph?.nodes ?? graph?._nodes;
  return nodes && typeof nodes[Symbol.iterator] === "function" ? nodes : [];
}

// The root graph of the workflow the node belongs to (a subgraph knows its root graph; the root graph is its own).
function rootGraphOf(node) {
  const graph = node?.graph;
  return graph?.rootGraph ?? graph ?? null;
}

// Every id ComfyUI executes `node` as (what the prompt's keys, the server's messages and the control route use): its
// own id on the root graph; inside a subgraph, "<subgraph node id>:...:<id>" for each instance of that subgraph.
function executionIds(node) {
  const own = String(node?.id);
  const graph = node?.graph;
  const root = rootGraphOf(node);
  if (!graph || root === graph) return [own];
  const ids = [];
  const visit = (current, path, depth) => {
    if (depth > MAX_SUBGRAPH_DEPTH) return;
    for (const child of graphNodes(current)) {
      if (!child?.subgraph || (typeof child.isSubgraphNode === "function" && !child.isSubgraphNode())) continue;
      const here = [...path, String(child.id)];
      if (child.subgraph === graph) ids.push([...here, own].join(":"));
      else visit(child.subgraph, here, depth + 1);
    }
  };
  visit(root, [], 0);
  return ids;
}

// --- which runs a node's panel may show: those of prompts its own workflow queued ---------------------------------
function boundPrompts(node) {
  const prompts = node?.properties?.[PROMPTS_PROPERTY];
  return Array.isArray(prompts) ? prompts.filter((p) => typeof p === "string" && p) : [];
}

function bindPrompt(node, promptId) {
  node.properties ??= {};
  node.properties[PROMPTS_PROPERTY] = [...boundPrompts(node).filter((p) => p !== promptId), promptId]
    .slice(-MAX_BOUND_PROMPTS);
}

// The run this node shows: of its execution ids, started by the newest prompt its workflow queued; null if none.
function runOfNode(node) {
  const prompts = boundPrompts(node);
  if (!prompts.length) return null;
  const ids = new Set(executionIds(node));
  let best = null, bestRank = -1;
  for (const model of runs.values()) {   // oldest first: a later run of the same prompt wins the tie
    if (!ids.has(model.node) || model.prompt == null) continue;
    const rank = prompts.lastIndexOf(model.prompt);
    if (rank >= 0 && rank >= bestRank) { best = model; bestRank = rank; }
  }
  return best;
}

// After POST /prompt answered: the Train nodes of the queued workflow (the active graph, its subgraphs included) now
// belong to that prompt. The prompt's keys are execution ids ("12:5" for node 5 inside the subgraph of node 12).
function bindQueuedPrompt(data, result) {
  const promptId = result?.prompt_id;
  const output = data?.output;
  if (promptId == null || !output || typeof output !== "object") return;
  const graph = app.rootGraph ?? app.graph;
  let bound = false;
  for (const panel of panels) {
    const node = panel.node;
    if (graph && rootGraphOf(node) !== graph) continue;   // a node of another workflow tab
    const queued = executionIds(node).some((id) => TRAIN_NODE_TYPES.has(output[id]?.class_type));
    if (!queued) continue;
    bindPrompt(node, String(promptId));
    panel.notice = null;
    panel.scheduleRender();
    bound = true;
  }
  // the property is part of the workflow: let the frontend's change tracker see it (tab switches keep it)
  if (bound) app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
}

function watchQueue() {
  const original = api.queuePrompt;
  if (typeof original !== "function" || original.__dreambooth) return;
  const wrapped = async function (number, data, ...rest) {
    const result = await original.call(this, number, data, ...rest);
    try {
      bindQueuedPrompt(data, result);
    } catch (error) {
      console.warn("[dreambooth] could not bind the queued prompt to its panels:", error);
    }
    return result;
  };
  wrapped.__dreambooth = true;
  api.queuePrompt = wrapped;
}

const SCALARS = ["state", "step", "total", "epoch", "epochs", "stage", "loss", "lr", "it_per_s", "eta_s"];

function copyScalars(model, data) {
  for (const key of SCALARS) if (key in data) model[key] = data[key];
}

function validPoints(points) {
  return Array.isArray(points)
    ? points.filter((p) => Array.isArray(p) && Number.isFinite(p[0]) && Number.isFinite(p[1]))
    : [];
}

function mergePairs(points) {
  const merged = [];
  for (let i = 0; i < points.length; i += 2) {
    const pair = points.slice(i, i + 2);
    merged.push([pair[pair.length - 1][0], pair.reduce((sum, p) => sum + p[1], 0) / pair.length]);
  }
  return merged;
}

function appendPoints(model, points) {
  const last = model.history.length ? model.history[model.history.length - 1][0] : -Infinity;
  // after a restore, messages already covered by the fetched history arrive again: keep steps in order
  for (const point of validPoints(points)) if (point[0] > last) model.history.push(point);
  if (model.history.length > MAX_POINTS) model.history = mergePairs(model.history);
}

function applyState(state) {
  if (!state || state.node == null) return;
  const model = emptyRun(String(state.node), state.run ?? null, state.prompt ?? null);
  copyScalars(model, state);
  model.message = state.message ?? "";
  model.history = validPoints(state.loss_history);
  model.validation = validPoints(state.validation_history);
  model.previews = Array.isArray(state.previews) ? state.previews : [];
  model.preview_step = state.preview_step ?? null;
  model.control = state.control ?? null;
  keepRun(model);
}

function applyProgress(data) {
  const model = runFor(data);
  copyScalars(model, data);
  appendPoints(model, data.points);
  appendValidation(model, data.val_points);
}

function appendValidation(model, points) {
  const last = model.validation.length ? model.validation[model.validation.length - 1][0] : -Infinity;
  for (const point of validPoints(points)) if (point[0] > last) model.validation.push(point);
}

function applyPreview(data) {
  const model = runFor(data);
  if (Array.isArray(data.images)) model.previews = data.images;
  if ("step" in data) model.preview_step = data.step;
}

function applyStatus(data) {
  const model = runFor(data);
  if ("state" in data) model.state = data.state;
  if ("message" in data) model.message = data.message ?? "";
  if ("control" in data) model.control = data.control;
}

// ---------------------------------------------------------------------------------------------------------------
// Formatting (numbers may be null, or strings such as "nan" for a diverged loss)
// ---------------------------------------------------------------------------------------------------------------
const DASH = "–";
const isNum = (v) => typeof v === "number" && Number.isFinite(v);
const text = (v) => (v == null || v === "" ? DASH : String(v));

function formatLoss(v) {
  if (!isNum(v)) return text(v);
  if (v !== 0 && (Math.abs(v) < 0.001 || Math.abs(v) >= 1000)) return v.toExponential(2);
  return v.toFixed(Math.abs(v) >= 10 ? 2 : 4);
}

function formatLr(v) {
  return isNum(v) ? v.toExponential(2) : text(v);
}

function formatSpeed(v) {
  if (!isNum(v) || v <= 0) return text(isNum(v) ? null : v);
  return v >= 1 ? `${v.toFixed(2)} it/s` : `${(1 / v).toFixed(2)} s/it`;
}

function formatDuration(seconds) {
  if (!isNum(seconds) || seconds < 0) return text(isNum(seconds) ? null : seconds);
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
  if (h) return `${h}h ${String(m).padStart(2, "0")}m`;
  if (m) return `${m}m ${String(sec).padStart(2, "0")}s`;
  return `${sec}s`;
}

// "3 / 8" epochs; an Imagic run shows its stage instead: "embedding (1/2)", "unet (2/2)"
function formatEpoch(model) {
  if (!model) return DASH;
  const of = isNum(model.epoch) && isNum(model.epochs) ? `${model.epoch}/${model.epochs}` : null;
  if (model.stage) return of ? `${model.stage} (${of})` : String(model.stage);
  return of ? `${model.epoch} / ${model.epochs}` : text(model.epoch);
}

function formatSteps(step, total) {
  if (step == null && total == null) return DASH;
  return total != null ? `${text(step)} / ${total}` : text(step);
}

// ---------------------------------------------------------------------------------------------------------------
// Chart
// ---------------------------------------------------------------------------------------------------------------
// TensorBoard-style debiased exponential moving average.
function smoothed(values, weight) {
  const out = [];
  let last = 0;
  for (let i = 0; i < values.length; i++) {
    last = last * weight + (1 - weight) * values[i];
    out.push(last / (1 - Math.pow(weight, i + 1)));
  }
  return out;
}

function smoothingWeight(count) {
  return Math.min(0.97, Math.max(0.6, 1 - 8 / Math.max(count, 1)));
}

function quantile(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.max(0, Math.floor(q * (sorted.length - 1))))];
}

function drawChart(canvas, model) {
  const ratio = window.devicePixelRatio || 1;
  const width = Math.max(120, canvas.clientWidth || 300);
  const height = CHART_HEIGHT;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(height * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(height * ratio);
  }
  const ctx = canvas.getContext("2d");
  if (!ctx) return;
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.fillStyle = COLORS.background;
  ctx.fillRect(0, 0, width, height);
  ctx.font = "10px sans-serif";

  const points = model ? model.history : [];
  if (!points.length) {
    ctx.fillStyle = COLORS.axis;
    ctx.textAlign = "center";
    ctx.fillText(model ? "waiting for the first loss value…" : "loss curve appears here during training",
      width / 2, height / 2);
    return;
  }

  const steps = points.map((p) => p[0]);
  const raw = points.map((p) => p[1]);
  const smooth = smoothed(raw, smoothingWeight(raw.length));
  const sorted = [...raw].sort((a, b) => a - b);
  // a few huge early losses must not flatten the rest of the curve
  const validation = model.validation || [];
  const valLosses = validation.map((p) => p[1]);
  let lo = Math.min(sorted[0], ...smooth, ...valLosses);
  let hi = Math.max(quantile(sorted, 0.98), ...smooth, ...valLosses);
  if (!(hi > lo)) { hi = lo + Math.max(Math.abs(lo) * 0.1, 1e-6); lo -= (hi - lo) * 0.5; }
  const pad = (hi - lo) * 0.08;
  lo = sorted[0] >= 0 ? Math.max(0, lo - pad) : lo - pad;   // a loss axis below zero only wastes room
  hi += pad;
  const xMin = Math.min(0, steps[0]);
  const xMax = Math.max(steps[steps.length - 1], isNum(model.total) ? model.total : 0, xMin + 1);

  const area = { left: 48, right: width - 8, top: 8, bottom: height - 18 };
  const x = (step) => area.left + ((step - xMin) / (xMax - xMin)) * (area.right - area.left);
  const y = (loss) => area.bottom - ((loss - lo) / (hi - lo)) * (area.bottom - area.top);

  // grid + y labels
  ctx.strokeStyle = COLORS.grid;
  ctx.fillStyle = COLORS.axis;
  ctx.lineWidth = 1;
  ctx.textAlign = "right";
  ctx.textBaseline = "middle";
  for (let i = 0; i <= 4; i++) {
    const value = lo + ((hi - lo) * i) / 4;
    const gy = Math.round(y(value)) + 0.5;
    ctx.beginPath(); ctx.moveTo(area.left, gy); ctx.lineTo(area.right, gy); ctx.stroke();
    ctx.fillText(formatLoss(value), area.left - 4, gy);
  }
  // x labels: first and last step of the axis
  ctx.textBaseline = "alphabetic";
  ctx.textAlign = "left";
  ctx.fillText(String(xMin), area.left, height - 5);
  ctx.textAlign = "right";
  ctx.fillText(`step ${xMax}`, area.right, height - 5);

  ctx.save();
  ctx.beginPath();
  ctx.rect(area.left, area.top - 2, area.right - area.left, area.bottom - area.top + 4);
  ctx.clip();
  const line = (values, color, lineWidth) => {
    ctx.strokeStyle = color;
    ctx.fillStyle = color;
    ctx.lineWidth = lineWidth;
    if (values.length === 1) {
      ctx.beginPath(); ctx.arc(x(steps[0]), y(values[0]), 2.5, 0, 2 * Math.PI); ctx.fill();
      return;
    }
    ctx.beginPath();
    values.forEach((v, i) => (i ? ctx.lineTo(x(steps[i]), y(v)) : ctx.moveTo(x(steps[i]), y(v))));
    ctx.stroke();
  };
  line(raw, COLORS.raw, 1);
  line(smooth, COLORS.smooth, 2);
  if (validation.length) {       // the validation loss: a second curve with a dot per validation
    ctx.strokeStyle = COLORS.validation;
    ctx.fillStyle = COLORS.validation;
    ctx.lineWidth = 2;
    ctx.beginPath();
    validation.forEach((p, i) => (i ? ctx.lineTo(x(p[0]), y(p[1])) : ctx.moveTo(x(p[0]), y(p[1]))));
    ctx.stroke();
    for (const p of validation) { ctx.beginPath(); ctx.arc(x(p[0]), y(p[1]), 2.5, 0, 2 * Math.PI); ctx.fill(); }
  }
  ctx.restore();

  // legend
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  const legendX = area.right - 110;
  ctx.fillStyle = COLORS.raw; ctx.fillRect(legendX, area.top + 4, 10, 3);
  ctx.fillStyle = COLORS.axis; ctx.fillText("raw", legendX + 14, area.top + 6);
  ctx.fillStyle = COLORS.smooth; ctx.fillRect(legendX + 42, area.top + 4, 10, 3);
  ctx.fillStyle = COLORS.axis; ctx.fillText("smoothed", legendX + 56, area.top + 6);
  if (validation.length) {
    ctx.fillStyle = COLORS.validation; ctx.fillRect(legendX + 42, area.top + 16, 10, 3);
    ctx.fillStyle = COLORS.axis; ctx.fillText("validation", legendX + 56, area.top + 18);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Panel (one DOM widget per TrainDreamBooth node)
// ---------------------------------------------------------------------------------------------------------------
const STYLE = `
.dreambooth-panel { box-sizing: border-box; display: flex; flex-direction: column; gap: 5px; padding: 4px;
  font: 12px sans-serif; color: var(--input-text, #ddd); background: var(--comfy-input-bg, #222);
  border: 1px solid var(--border-color, #444); border-radius: 6px; overflow: hidden; }
.dreambooth-panel .db-header { display: flex; align-items: flex-start; gap: 6px; min-height: 18px; flex: none; }
.dreambooth-panel .db-state { padding: 1px 6px; border-radius: 8px; color: #fff; font-weight: bold;
  text-transform: uppercase; font-size: 10px; flex: none; }
.dreambooth-panel .db-message { white-space: normal; overflow-wrap: anywhere; max-height: 7em; overflow-y: auto;
  opacity: 0.85; line-height: 1.4em; }
.dreambooth-panel .db-progress { height: 3px; background: #333; border-radius: 2px; }
.dreambooth-panel .db-progress > div { height: 100%; width: 0; background: #3a9d4f; border-radius: 2px; }
.dreambooth-panel canvas { width: 100%; height: ${CHART_HEIGHT}px; display: block; border-radius: 4px; flex: none; }
.dreambooth-panel .db-stats { display: grid; grid-template-columns: repeat(3, 1fr); gap: 2px 8px; }
.dreambooth-panel .db-stat { display: flex; justify-content: space-between; gap: 4px; white-space: nowrap; }
.dreambooth-panel .db-stat > span:first-child { opacity: 0.6; }
.dreambooth-panel .db-previews { display: flex; gap: 4px; overflow-x: auto; min-height: 0; flex: 1 1 auto;
  align-items: flex-start; }
.dreambooth-panel .db-previews img { height: 64px; max-width: 96px; object-fit: cover; border-radius: 3px;
  cursor: pointer; background: #111; flex: none; }
.dreambooth-panel .db-previews-label { opacity: 0.6; font-size: 11px; }
.dreambooth-panel .db-buttons { display: flex; gap: 6px; }
.dreambooth-panel button { flex: 1; padding: 3px 6px; font: inherit; cursor: pointer; border-radius: 4px;
  color: var(--input-text, #ddd); background: var(--comfy-menu-bg, #353535); border: 1px solid var(--border-color, #555); }
.dreambooth-panel button:disabled { opacity: 0.45; cursor: default; }
`;

function injectStyle() {
  if (document.getElementById("dreambooth-panel-style")) return;
  const style = document.createElement("style");
  style.id = "dreambooth-panel-style";
  style.textContent = STYLE;
  document.head.appendChild(style);
}

function el(tag, className, textContent) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (textContent != null) element.textContent = textContent;
  return element;
}

function viewUrl(image) {
  const params = new URLSearchParams({
    filename: String(image.filename ?? ""), subfolder: String(image.subfolder ?? ""), type: String(image.type ?? "output"),
  });
  const route = `/view?${params}`;
  return typeof api.apiURL === "function" ? api.apiURL(route) : `/api${route}`;
}

const STAT_FIELDS = [
  ["step", "step"], ["epoch", "epoch"], ["loss", "loss"],
  ["lr", "lr"], ["speed", "speed"], ["eta", "ETA"],
];

class Panel {
  constructor(node) {
    this.node = node;
    this.renderQueued = false;
    this.pending = new Set();   // actions whose POST is in flight
    this.notice = null;         // last button result, shown until the backend sends a newer message
    injectStyle();

    this.root = el("div", "dreambooth-panel");
    const header = el("div", "db-header");
    this.stateBadge = el("span", "db-state", "idle");
    this.messageText = el("span", "db-message");
    header.append(this.stateBadge, this.messageText);
    const progress = el("div", "db-progress");
    this.progressFill = el("div");
    progress.append(this.progressFill);
    this.canvas = el("canvas", "db-chart");
    this.canvas.height = CHART_HEIGHT;
    const stats = el("div", "db-stats");
    this.fields = {};
    this.labels = {};
    for (const [key, label] of STAT_FIELDS) {
      const cell = el("div", "db-stat");
      const value = el("span", null, DASH);
      value.dataset.field = key;
      const name = el("span", null, label);
      name.dataset.label = key;
      cell.append(name, value);
      this.labels[key] = name;
      stats.append(cell);
      this.fields[key] = value;
    }
    this.previewLabel = el("div", "db-previews-label");
    this.previewStrip = el("div", "db-previews");
    const buttons = el("div", "db-buttons");
    this.saveButton = el("button", null, "Save now");
    this.saveButton.dataset.action = "save_now";
    this.saveButton.title = "Write a checkpoint at the next step; training goes on.";
    this.stopButton = el("button", null, "Stop after epoch");
    this.stopButton.dataset.action = "stop_after_epoch";
    this.stopButton.title = "Finish the current epoch, save a resumable state, then stop.";
    for (const button of [this.saveButton, this.stopButton]) {
      button.addEventListener("click", (event) => {
        event.stopPropagation();
        this.sendControl(button.dataset.action);
      });
      buttons.append(button);
    }
    this.root.append(header, progress, this.canvas, stats, this.previewLabel, this.previewStrip, buttons);

    const options = { serialize: false, hideOnZoom: false, getMinHeight: () => PANEL_MIN_HEIGHT };
    this.widget = node.addDOMWidget?.("dreambooth_live", "dreambooth-live", this.root, options);
    if (this.widget) this.widget.serialize = false;   // never part of the workflow's widgets_values
    if (typeof ResizeObserver === "function") {
      this.resizeObserver = new ResizeObserver(() => this.scheduleRender());
      this.resizeObserver.observe(this.root);
    }
    this.render();
  }

  get nodeId() {
    return String(this.node.id);
  }

  // the ids ComfyUI runs this panel's node as ("5", or "12:5" inside a subgraph)
  get executionIds() {
    return executionIds(this.node);
  }

  get model() {
    return runOfNode(this.node);
  }

  scheduleRender() {
    if (this.renderQueued) return;
    this.renderQueued = true;
    // one redraw for a burst of messages (a restore, a throttled batch); a timer rather than an animation
    // frame so a background tab is already current when the user comes back to it
    setTimeout(() => { this.renderQueued = false; this.render(); }, 16);
  }

  render() {
    const model = this.model;
    const state = model?.state ?? "idle";
    this.stateBadge.textContent = state;
    this.stateBadge.style.background = STATE_COLORS[state] ?? "#666";
    const message = this.notice ?? model?.message ?? "";
    this.messageText.textContent = model
      ? message
      : "Queue the workflow: loss, previews and controls appear here while it trains.";
    this.messageText.title = this.messageText.textContent;

    const fraction = model && isNum(model.step) && isNum(model.total) && model.total > 0 ? model.step / model.total : 0;
    this.progressFill.style.width = `${Math.min(100, Math.max(0, fraction * 100)).toFixed(1)}%`;

    this.fields.step.textContent = formatSteps(model?.step, model?.total);
    this.labels.epoch.textContent = model?.stage ? "stage" : "epoch";
    this.fields.epoch.textContent = formatEpoch(model);
    this.fields.loss.textContent = formatLoss(model?.loss);
    this.fields.lr.textContent = formatLr(model?.lr);
    this.fields.speed.textContent = formatSpeed(model?.it_per_s);
    // a stopped / failed run has nothing left to estimate (a finished one shows its 0 s)
    const ended = TERMINAL_STATES.has(state) && state !== "done";
    this.fields.eta.textContent = ended ? DASH : formatDuration(model?.eta_s);

    this.renderPreviews(model);
    this.renderButtons(model);
    drawChart(this.canvas, model);
  }

  renderPreviews(model) {
    const images = (model?.previews ?? []).filter((image) => image && image.filename);
    const urls = images.map(viewUrl);
    const current = [...this.previewStrip.children].map((img) => img.dataset.src);
    if (urls.join("\n") !== current.join("\n")) {   // keep loaded <img>s when nothing changed
      this.previewStrip.replaceChildren(...urls.map((url, i) => {
        const img = el("img");
        img.src = url;
        img.dataset.src = url;
        img.alt = img.title = images[i].filename;
        img.addEventListener("click", () => window.open(url, "_blank"));
        return img;
      }));
    }
    this.previewLabel.textContent = images.length
      ? `previews${model.preview_step != null ? ` at step ${model.preview_step}` : ""}`
      : "";
  }

  renderButtons(model) {
    const active = !!model && !TERMINAL_STATES.has(model.state);
    const control = model?.control ?? {};
    this.saveButton.disabled = !active || this.pending.has("save_now");
    this.stopButton.disabled = !active || this.pending.has("stop_after_epoch") || !!control.stop_after_epoch
      || !!control.stop_now;
    this.stopButton.textContent = active && control.stop_after_epoch ? "Stopping after epoch…" : "Stop after epoch";
  }

  async sendControl(action) {
    const model = this.model;
    // the run this panel shows, by the execution id the server knows it under: never act on another one
    const node = model?.node ?? this.executionIds[0] ?? this.nodeId;
    const run = model?.run ?? null;
    const label = action.replaceAll("_", " ");
    this.pending.add(action);
    this.render();
    try {
      const response = await api.fetchApi("/dreambooth/control", {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ node, run, action }),
      });
      let body = {};
      try { body = await response.json(); } catch { /* empty or non-JSON body */ }
      if (response.ok) {
        const shown = run != null ? runs.get(String(run)) : null;
        if (shown && body.control) shown.control = body.control;
        this.notice = body.message ?? null;
      } else if (response.status === 409) {
        // this tab missed the start of a newer run on the node: show that one, and let the user decide again
        this.notice = `Not sent: this panel showed an older run; it now shows the current one (click again to ${label}).`;
        await restoreState();
      } else {
        this.notice = `Could not ${label}: ${body.error ?? `HTTP ${response.status}`}`;
      }
    } catch (error) {
      this.notice = `Could not reach the server: ${error?.message ?? error}`;
    } finally {
      this.pending.delete(action);
      this.render();
    }
  }

  dispose() {
    this.resizeObserver?.disconnect();
    panels.delete(this);
  }
}

function isTrainNode(node) {
  return TRAIN_NODE_TYPES.has(node?.comfyClass) || TRAIN_NODE_TYPES.has(node?.type);
}

function attachPanel(node) {
  if (node.__dreamboothPanel) return node.__dreamboothPanel;
  const panel = new Panel(node);
  node.__dreamboothPanel = panel;
  panels.add(panel);
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    panel.dispose();
    return onRemoved?.apply(this, arguments);
  };
  // LiteGraph's node.size is a Float32Array view (Array.isArray is false for it): as wide as the panel needs,
  // and high enough to hold it (a new node was sized before the panel was added)
  if (node.size != null && node.size.length >= 2) {
    const needed = node.computeSize?.();
    node.setSize?.([Math.max(node.size[0], PANEL_MIN_WIDTH), Math.max(node.size[1], needed?.[1] ?? 0)]);
  }
  return panel;
}

// A message about execution id `nodeId` ("5", "12:5"): redraw the panels of the node(s) ComfyUI runs under it.
function renderNode(nodeId, { clearNotice = false, run = null } = {}) {
  for (const panel of panels) {
    if (!panel.executionIds.includes(String(nodeId))) continue;
    // the backend's newer word on this panel's own run replaces the button's notice
    if (clearNotice && (run == null || panel.model?.run === run)) panel.notice = null;
    panel.scheduleRender();
  }
}

async function restoreState() {
  try {
    const response = await api.fetchApi("/dreambooth/state");
    if (!response.ok) return;
    const body = await response.json();
    // every kept run (oldest first); an older backend sends only the latest run of each node
    const states = Array.isArray(body?.runs) ? body.runs : Object.values(body?.nodes ?? {});
    for (const state of states) applyState(state);
    for (const panel of panels) panel.scheduleRender();
  } catch (error) {
    console.warn("[dreambooth] could not restore the training state:", error);
  }
}

function listen(event, apply, { clearNotice = false } = {}) {
  api.addEventListener(event, ({ detail }) => {
    if (!detail || detail.node == null) return;
    apply(detail);
    renderNode(detail.node, { clearNotice, run: detail.run ?? null });
  });
}

app.registerExtension({
  name: "comfyui-dreambooth.live-panel",
  async setup() {
    watchQueue();
    listen(EVENTS.progress, applyProgress);
    listen(EVENTS.preview, applyPreview);
    listen(EVENTS.status, applyStatus, { clearNotice: true });
    api.addEventListener("reconnected", restoreState);   // the server may have moved on while we were away
    await restoreState();
  },
  nodeCreated(node) {
    if (isTrainNode(node)) attachPanel(node);
  },
  loadedGraphNode(node) {
    // a loaded workflow gives the node its saved id only after nodeCreated: draw that id's run now
    if (node.__dreamboothPanel) node.__dreamboothPanel.scheduleRender();
  },
});

// for the test harness and for other extensions; ComfyUI ignores module exports
export { applyProgress, applyPreview, applyState, applyStatus, executionIds, formatDuration, formatLoss, panels,
  runOfNode, runs, smoothed };
