// Loads web/memory_estimate.js against the fake app, feeds settings nodes an "executed" output as ComfyUI does
// (node.onExecuted({text: [...]})), then writes a JSON report into <pre id="result"> (read by
// tests/test_web_estimate.py through chromium --dump-dom).
import { app } from "../scripts/app.js";

const report = { errors: [] };
window.addEventListener("error", (event) => report.errors.push(String(event.message)));
window.addEventListener("unhandledrejection", (event) => report.errors.push(String(event.reason)));

function describe(node) {
  const box = node.frame.querySelector(".dreambooth-memory-estimate");
  const widget = box ? node.widgets.find((w) => w.element === box) : null;
  return {
    shown: !!box, widgets: node.widgets.length, text: box?.textContent ?? null, warning: box?.dataset.warning ?? null,
    serialize: widget ? !(widget.options?.serialize === false && widget.serialize === false) : null,
  };
}

async function main() {
  await import("../extensions/comfyui-dreambooth/memory_estimate.js");
  report.extensions = app.extensions.map((e) => e.name);
  await app.runSetup();
  const settings = app.loadNode("DreamBoothSettings", 3);
  const data = app.loadNode("DreamBoothData", 4);
  const other = app.loadNode("KSampler", 6);
  report.before = describe(settings);
  settings.onExecuted({ text: ["Memory estimate for SD1.5\ntotal 3.74 GB"] });
  settings.onExecuted({ text: ["WARNING: these settings need about 18.22 GB but cuda:0 has 12.00 GB\ntotal 18.22 GB"] });
  report.settings = describe(settings);
  data.onExecuted({ text: ["Memory estimate for SD1.5\ntotal 4.00 GB"] });
  data.onExecuted({});            // an output without text leaves the shown one
  report.data = describe(data);
  report.otherHasHook = typeof other.onExecuted === "function";
  report.done = true;
}

main().catch((error) => report.errors.push(String(error?.stack ?? error))).finally(() => {
  document.getElementById("result").textContent = JSON.stringify(report);
});
