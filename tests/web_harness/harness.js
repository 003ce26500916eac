// Loads web/dreambooth.js against the fake app/api, plays one scenario, then writes a JSON report into
// <pre id="result"> (read by tests/test_web_panel.py through chromium --dump-dom).
//   ?scenario=replay   queue the workflow (the fake api answers with the recorded run's prompt id), then replay
//                      messages.json (a whole recorded run) into a fresh page
//   ?scenario=restore  GET /dreambooth/state returns state.json (a run at step 150); then a "reconnected" event
//                      with a newer state must refresh the panel
//   ?scenario=buttons  restore, then click both buttons (the fake api records the POST bodies; the server confirms
//                      the save: "saving", then "saved step N" replace the notice), then a click the server refuses
//                      (the panel must show its error)
//   ?scenario=stopped  restore, then the run is stopped from the panel: the status message says so, no ETA is left
//   ?scenario=stale    restore, then the server starts a newer run on the node unseen by the page: a click must
//                      be refused (409), the panel must fetch the state and show the new run; the next click
//                      names the new run
//   ?scenario=details  restore, then a long stage message (its counter at the end must stay visible), then Imagic
//                      progress with its stage and the epoch count
//   ?scenario=workflows  the same node id 5 in three workflows: the one that queued the restored run shows it, a new
//                      workflow and one bound to an unknown prompt show nothing; queueing the new workflow binds its
//                      panel to its own run, which the first panel never shows
//   ?scenario=subgraph  issue 23: Train node 5 on the root graph, node 5 inside the subgraph that nodes 12 and 13
//                      instantiate, and node 5 of a subgraph nested in it (node 7): the prompt's keys and the server's
//                      messages name them "5", "12:5" / "13:5", "12:7:5" / "13:7:5"; each panel binds, shows and
//                      controls the runs of its own execution ids
// The Train node is loaded with the prompt ids its workflow queued (node property dreambooth_prompts), as a workflow
// saved after a queue carries them.
import { app } from "../scripts/app.js";
import { api } from "../scripts/api.js";

const scenario = new URLSearchParams(location.search).get("scenario") ?? "replay";
const report = { scenario, errors: [] };
window.addEventListener("error", (event) => report.errors.push(String(event.message)));
window.addEventListener("unhandledrejection", (event) => report.errors.push(String(event.reason)));

const fetchJson = async (path) => (await fetch(path)).json();
const TRAIN_OUTPUT = { "5": { class_type: "TrainDreamBooth", inputs: {} }, "6": { class_type: "KSampler", inputs: {} } };

// GET /dreambooth/state's body with `run` as the latest run of its node (replacing its older state, if kept)
function withRun(body, run) {
  const next = structuredClone(body);
  next.nodes[run.node] = run;
  next.runs = [...next.runs.filter((r) => r.run !== run.run), run];
  return next;
}
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
  let nonBackground = 0, smooth = 0, raw = 0, validation = 0;
  for (let i = 0; i < data.length; i += 4) {
    const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
    if (Math.abs(r - background[0]) + Math.abs(g - background[1]) + Math.abs(b - background[2]) > 30) nonBackground++;
    if (r > 200 && g > 120 && g < 200 && b < 110) smooth++;         // the orange EMA line
    if (b > 120 && b > r + 40 && b > g + 15) raw++;                   // the blue raw line
    if (g > 170 && r < 120 && b < 160) validation++;                  // the green validation curve
  }
  const rect = canvas.getBoundingClientRect();
  return { width, height, background, nonBackground, smooth, raw, validation,
           rect: { x: rect.x, y: rect.y, width: rect.width, height: rect.height } };
}

function describe(node) {
  const root = node.frame.querySelector(".dreambooth-panel");
  if (!root) return { panel: false, widgets: node.widgets.length };
  const widget = node.widgets.find((w) => w.element === root);
  return {
    panel: true,
    size: [...node.size],
    widgets: node.widgets.length,
    serialize: widget?.options?.serialize === false && widget?.serialize === false ? false : true,
    state: root.querySelector(".db-state").textContent,
    message: root.querySelector(".db-message").textContent,
    // the whole message is on screen: nothing cut off to the side or below
    messageClipped: (({ scrollWidth, clientWidth, scrollHeight, clientHeight }) =>
      scrollWidth > clientWidth + 1 || scrollHeight > clientHeight + 1)(root.querySelector(".db-message")),
    labels: Object.fromEntries([...root.querySelectorAll("[data-label]")].map((e) => [e.dataset.label, e.textContent])),
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
  const extension = await import("../extensions/comfyui-dreambooth/dreambooth.js");
  report.extensions = app.extensions.map((e) => e.name);
  await app.runSetup();
  const restored = state.nodes["5"];
  const prompts = scenario === "replay" ? [] : scenario === "stale" ? [restored.prompt, "demo-prompt-0002"]
    : [restored.prompt];
  const trainer = app.loadNode("TrainDreamBooth", 5, { properties: { dreambooth_prompts: prompts } });
  const other = app.loadNode("KSampler", 6);

  if (scenario === "replay") {
    report.beforeQueue = describe(trainer);
    // the user queues the workflow; ComfyUI answers with the prompt id every message of the run then names
    api.nextPromptId = messages[0].data.prompt;
    report.queueAnswer = await api.queuePrompt(0, { output: TRAIN_OUTPUT, workflow: {} });
    report.boundPrompts = trainer.properties.dreambooth_prompts;
    for (const message of messages) api.dispatchEvent(new CustomEvent(message.type, { detail: message.data }));
  }
  await settle();
  report.node = describe(trainer);
  report.other = describe(other);

  if (scenario === "restore") {
    // the server moved on while the socket was down; "reconnected" must fetch the state again
    const run = structuredClone(restored);
    run.step = 180;
    run.eta_s = 12;
    run.loss_history.push([180, 0.05]);
    api.stateBody = withRun(state, run);
    api.dispatchEvent(new CustomEvent("reconnected"));
    await settle();
    report.afterReconnect = describe(trainer);
  }
  if (scenario === "buttons") {
    trainer.frame.querySelector('button[data-action="save_now"]').click();
    await settle();
    report.afterSaveClick = describe(trainer);
    // the trainer takes the request, writes the checkpoint, and the server says so
    const run = { node: "5", run: restored.run, prompt: restored.prompt };
    api.dispatchEvent(new CustomEvent("dreambooth.status", { detail: {
      ...run, state: "saving", message: `saving a checkpoint at step ${restored.step}…` } }));
    await settle();
    report.whileSaving = describe(trainer);
    api.dispatchEvent(new CustomEvent("dreambooth.status", { detail: {
      ...run, state: "running", message: `saved step ${restored.step}` } }));
    await settle();
    report.afterSaved = describe(trainer);
    trainer.frame.querySelector('button[data-action="stop_after_epoch"]').click();
    await settle();
    report.afterClicks = describe(trainer);
    api.failNextControl = { status: 404, error: "no training run is active for node '5'" };
    trainer.frame.querySelector('button[data-action="save_now"]').click();
    await settle();
    report.afterFailedClick = describe(trainer);
  }
  if (scenario === "stopped") {
    const run = restored;
    api.dispatchEvent(new CustomEvent("dreambooth.status", { detail: {
      node: "5", run: run.run, prompt: run.prompt, state: "stopped",
      message: `stopped at step ${run.step} (checkpoint saved)`, control: null } }));
    await settle();
    report.afterStop = describe(trainer);
  }
  if (scenario === "stale") {
    // this workflow queued again (prompt demo-prompt-0002), but the tab missed the new run's messages
    const run = Object.assign(structuredClone(restored), {
      run: "demo-run-0002", prompt: "demo-prompt-0002", step: 3, eta_s: 29.7,
      loss_history: [[1, 0.2], [2, 0.18], [3, 0.17]], previews: [], preview_step: null });
    api.stateBody = withRun(state, run);
    trainer.frame.querySelector('button[data-action="save_now"]').click();
    await settle();
    report.afterStaleClick = describe(trainer);
    trainer.frame.querySelector('button[data-action="save_now"]').click();
    await settle();
    report.afterRetry = describe(trainer);
  }
  if (scenario === "details") {
    const run = { node: "5", run: restored.run, prompt: restored.prompt };
    const long = "caching latents (disk) of output/dreambooth/dreambooth-20261207-080845-a-long-run-name/cache "
      + "for 3 concepts in 4 buckets: 7/8";
    api.dispatchEvent(new CustomEvent("dreambooth.status", { detail: { ...run, state: "starting", message: long } }));
    await settle();
    report.longMessage = describe(trainer);
    report.longMessage.sent = long;
    api.dispatchEvent(new CustomEvent("dreambooth.progress", { detail: {
      ...run, state: "running", step: 160, total: 300, epoch: 2, epochs: 2, stage: "unet", loss: 0.1, lr: 1e-4,
      it_per_s: 10, eta_s: 14, points: [[160, 0.1]] } }));
    await settle();
    report.imagic = describe(trainer);
    api.dispatchEvent(new CustomEvent("dreambooth.progress", { detail: {
      ...run, state: "running", step: 170, total: 300, epoch: 3, epochs: 5, stage: null, loss: 0.1, lr: 1e-4,
      it_per_s: 10, eta_s: 13, points: [[170, 0.1]] } }));
    await settle();
    report.epochs = describe(trainer);
  }
  if (scenario === "workflows") {
    // the same node id in a brand-new workflow and in one whose prompt the server does not know
    const fresh = { name: "workflow 2" };
    const newTab = app.loadNode("TrainDreamBooth", 5, { graph: fresh });
    const unknown = app.loadNode("TrainDreamBooth", 5, { graph: { name: "workflow 3" },
                                                         properties: { dreambooth_prompts: ["prompt-unknown"] } });
    await settle();
    report.newTab = describe(newTab);
    report.unknown = describe(unknown);
    // the new workflow is queued (it is the active graph now) and its own run starts on node 5
    app.graph = fresh;
    api.nextPromptId = "prompt-b";
    await api.queuePrompt(1, { output: TRAIN_OUTPUT, workflow: {} });
    const runB = { node: "5", run: "run-b", prompt: "prompt-b" };
    api.dispatchEvent(new CustomEvent("dreambooth.status", { detail: { ...runB, state: "starting", message: "" } }));
    api.dispatchEvent(new CustomEvent("dreambooth.progress", { detail: {
      ...runB, state: "running", step: 2, total: 10, epoch: 1, loss: 0.3, lr: 1e-4, it_per_s: 2, eta_s: 4,
      points: [[1, 0.4], [2, 0.3]] } }));
    await settle();
    report.afterQueue = { first: describe(trainer), newTab: describe(newTab), unknown: describe(unknown),
                          firstPrompts: trainer.properties.dreambooth_prompts,
                          newTabPrompts: newTab.properties.dreambooth_prompts };
    api.stateBody = withRun(state, { ...restored, ...runB, step: 2, total: 10 });
    newTab.frame.querySelector('button[data-action="save_now"]').click();
    await settle();
  }
  if (scenario === "subgraph") {
    const root = { name: "workflow with subgraphs", nodes: [] };
    const inner = { name: "subgraph A", rootGraph: root, nodes: [] };
    const nested = { name: "subgraph B", rootGraph: root, nodes: [] };
    const instance = (id, subgraph) => ({ id, subgraph, isSubgraphNode: () => true });
    const onRoot = app.loadNode("TrainDreamBooth", 5, { graph: root });
    const inSubgraph = app.loadNode("TrainDreamBooth", 5, { graph: inner });
    const inNested = app.loadNode("TrainDreamBooth", 5, { graph: nested });
    root.nodes.push(onRoot, instance(12, inner), instance(13, inner));
    inner.nodes.push(inSubgraph, instance(7, nested));
    nested.nodes.push(inNested);
    const nodes = { onRoot, inSubgraph, inNested };
    const describeAll = () => Object.fromEntries(Object.entries(nodes).map(([k, n]) => [k, describe(n)]));
    report.executionIds = Object.fromEntries(Object.entries(nodes).map(([k, n]) => [k, extension.executionIds?.(n) ?? null]));
    await settle();
    report.beforeQueue = describeAll();
    // the frontend flattens the subgraphs into the prompt under execution ids
    app.graph = root;
    api.nextPromptId = "prompt-s";
    const output = Object.fromEntries(["5", "12:5", "13:5", "12:7:5", "13:7:5", "12"].map(
      (id) => [id, { class_type: id === "12" ? "KSampler" : "TrainDreamBooth", inputs: {} }]));
    await api.queuePrompt(2, { output, workflow: {} });
    report.boundPrompts = Object.fromEntries(Object.entries(nodes).map(
      ([k, n]) => [k, n.properties.dreambooth_prompts ?? null]));
    const progress = (node, run, step) => {
      api.dispatchEvent(new CustomEvent("dreambooth.status", { detail: {
        node, run, prompt: "prompt-s", state: "starting", message: "" } }));
      api.dispatchEvent(new CustomEvent("dreambooth.progress", { detail: {
        node, run, prompt: "prompt-s", state: "running", step, total: 10, epoch: 1, loss: 0.3, lr: 1e-4,
        it_per_s: 2, eta_s: 4, points: [[step, 0.3]] } }));
    };
    progress("5", "run-root", 4);
    progress("12:5", "run-sub", 6);
    progress("12:7:5", "run-nested", 8);
    await settle();
    report.running = describeAll();
    // the nested run is stopped: only its panel says so
    api.dispatchEvent(new CustomEvent("dreambooth.status", { detail: {
      node: "12:7:5", run: "run-nested", prompt: "prompt-s", state: "stopped",
      message: "stopped at step 8 (checkpoint saved)", control: null } }));
    await settle();
    report.nestedStopped = describeAll();
    // the subgraph's other instance (node 13) starts its run: the subgraph's panel shows the newer run
    progress("13:5", "run-sub-13", 2);
    await settle();
    report.secondInstance = describeAll();
    // its buttons act on the run it shows, named by the execution id the server knows
    api.stateBody = withRun(state, { ...restored, node: "13:5", run: "run-sub-13", prompt: "prompt-s" });
    inSubgraph.frame.querySelector('button[data-action="save_now"]').click();
    await settle();
    report.afterSubgraphClick = describeAll();
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
