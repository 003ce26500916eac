// Loads web/dreambooth.js against the fake app/api, plays one scenario, then writes a JSON report into
// <pre id="result"> (read by tests/test_web_panel.py through chromium --dump-dom).
//   ?scenario=replay   replay messages.json (a whole recorded run) into a fresh page
//   ?scenario=restore  GET /dreambooth/state returns state.json (a run at step 150); then a "reconnected" event
//                      with a newer state must refresh the panel
//   ?scenario=buttons  restore, then click both buttons (the fake api records the POST bodies), then a click
//                      the server refuses (the panel must show its error)
//   ?scenario=stopped  restore, then the run is stopped from the panel: the status message says so, no ETA is left
//   ?scenario=stale    restore, then the server starts a newer run on the node unseen by the page: a click must
//                      be refused (409), the panel must fetch the state and show the new run; the next click
//                      names the new run
import { app } from "../scripts/app.js";
import { api } from "../scripts/api.js";

const scenario = new URLSearchParams(location.search).get("scenario") ?? "replay";
const report = { scenario, errors: [] };
window.addEventListener("error", (event) => report.errors.push(String(event.message)));
window.addEventListener("unhandledrejection", (event) => report.errors.push(String(event.reason)));

const fetchJson = async (path) => (await fetch(path)).json();
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Timers only: chromium's --virtual-time-budget (which makes --dump-dom wait for us) runs timers, fetches and
// image loads, but stops delivering animation frames.
async function settle() {
  await sleep(100);
  await Promise.all([...document.images].map((img) => img.complete ? null
    : new Promise((resolve) => { img.onload = img.onerror = resolve; })));
  await sleep(50);
}

function fields(root) {
  return Object.fromEntries([...root.querySelectorAll("[data-field]")].map((e) => [e.dataset.field, e.textContent]));
}

function canvasStats(canvas) {
  const ctx = canvas.getContext("2d");
  const { data, width, height } = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const background = [data[0], data[1], data[2]];
  let nonBackground = 0, smooth = 0, raw = 0;
  for (let i = 0; i < data.length; i += 4) {
    const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
    if (Math.abs(r - background[0]) + Math.abs(g - background[1]) + Math.abs(b - background[2]) > 30) nonBackground++;
    if (r > 200 && g > 120 && g < 200 && b < 110) smooth++;         // the orange EMA line
    if (b > 120 && b > r + 40 && b > g + 15) raw++;                   // the blue raw line
  }
  const rect = canvas.getBoundingClientRect();
  return { width, height, background, nonBackground, smooth, raw,
           rect: { x: rect.x, y: rect.y, width: rect.width, height: rect.height } };
}

function describe(node) {
  const root = node.frame.querySelector(".dreambooth-panel");
  if (!root) return { panel: false, widgets: node.widgets.length };
  const widget = node.widgets.find((w) => w.element === root);
  return {
    panel: true,
    widgets: node.widgets.length,
    serialize: widget?.options?.serialize === false && widget?.serialize === false ? false : true,
    state: root.querySelector(".db-state").textContent,
    message: root.querySelector(".db-message").textContent,
    fields: fields(root),
    previewLabel: root.querySelector(".db-previews-label").textContent,
    previews: [...root.querySelectorAll(".db-previews img")].map((img) => ({
      src: img.getAttribute("src"), loaded: img.complete && img.naturalWidth > 0 })),
    buttons: [...root.querySelectorAll("button")].map((b) => ({ action: b.dataset.action, text: b.textContent,
                                                              disabled: b.disabled })),
    chart: canvasStats(root.querySelector("canvas")),
  };
}

async function main() {
  const [messages, state] = await Promise.all([fetchJson("messages.json"), fetchJson("state.json")]);
  if (scenario !== "replay") api.stateBody = state;
  await import("../extensions/comfyui-dreambooth/dreambooth.js");
  report.extensions = app.extensions.map((e) => e.name);
  await app.runSetup();
  const trainer = app.loadNode("TrainDreamBooth", 5);
  const other = app.loadNode("KSampler", 6);

  if (scenario === "replay") {
    for (const message of messages) api.dispatchEvent(new CustomEvent(message.type, { detail: message.data }));
  }
  await settle();
  report.node = describe(trainer);
  report.other = describe(other);

  if (scenario === "restore") {
    // the server moved on while the socket was down; "reconnected" must fetch the state again
    const newer = structuredClone(state);
    const run = newer.nodes["5"];
    run.step = 180;
    run.eta_s = 12;
    run.loss_history.push([180, 0.05]);
    api.stateBody = newer;
    api.dispatchEvent(new CustomEvent("reconnected"));
    await settle();
    report.afterReconnect = describe(trainer);
  }
  if (scenario === "buttons") {
    trainer.frame.querySelector('button[data-action="save_now"]').click();
    await settle();
    trainer.frame.querySelector('button[data-action="stop_after_epoch"]').click();
    await settle();
    report.afterClicks = describe(trainer);
    api.failNextControl = { status: 404, error: "no training run is active for node '5'" };
    trainer.frame.querySelector('button[data-action="save_now"]').click();
    await settle();
    report.afterFailedClick = describe(trainer);
  }
  if (scenario === "stopped") {
    const run = state.nodes["5"];
    api.dispatchEvent(new CustomEvent("dreambooth.status", { detail: {
      node: "5", run: run.run, prompt: run.prompt, state: "stopped",
      message: `stopped at step ${run.step} (checkpoint saved)`, control: null } }));
    await settle();
    report.afterStop = describe(trainer);
  }
  if (scenario === "stale") {
    const newer = structuredClone(state);
    const run = newer.nodes["5"];
    Object.assign(run, { run: "demo-run-0002", step: 3, eta_s: 29.7, loss_history: [[1, 0.2], [2, 0.18], [3, 0.17]],
                         previews: [], preview_step: null });
    api.stateBody = newer;   // no websocket message: this tab missed the new run's start
    trainer.frame.querySelector('button[data-action="save_now"]').click();
    await settle();
    report.afterStaleClick = describe(trainer);
    trainer.frame.querySelector('button[data-action="save_now"]').click();
    await settle();
    report.afterRetry = describe(trainer);
  }
  report.calls = api.calls;
}

main()
  .catch((error) => report.errors.push(`harness: ${error?.stack ?? error}`))
  .finally(() => {
    report.done = true;
    document.getElementById("result").textContent = JSON.stringify(report);
    document.title = "done";
  });
