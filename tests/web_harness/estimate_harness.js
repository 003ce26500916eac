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
  const top = node.frame.getBoundingClientRect().top;
  return {
    shown: !!box, widgets: node.widgets.length, text: box?.textContent ?? null, warning: box?.dataset.warning ?? null,
    serialize: widget ? !(widget.options?.serialize === false && widget.serialize === false) : null,
    size: [...node.size],
    // where the box ends below the node's top, against the node's own height (what the canvas draws)
    boxBottom: box ? box.getBoundingClientRect().bottom - top : null,
    scrolls: box ? box.scrollHeight > box.clientHeight + 1 : null,
  };
}

// a whole estimate, as the settings nodes send it: its "total" line last
const ESTIMATE = ["Memory estimate for SD1.5 (LoRA rank 16, batch 1, 512px) on cuda:0 (12.00 GB free)",
  ...["weights", "gradients", "optimizer", "ema", "weight_casts", "activations", "text_encoders", "vae", "overhead"]
    .map((part, i) => `${part.padEnd(18)}${(0.1 + i / 10).toFixed(2)} GB`),
  "activations, weight_casts and overhead are calibrated estimates (+-30%); weights, gradients, optimizer, ema, "
    + "text_encoders and vae are exact for these settings",
  "total             3.74 GB"].join("\n");

async function main() {
  await import("../extensions/comfyui-dreambooth/memory_estimate.js");
  report.extensions = app.extensions.map((e) => e.name);
  await app.runSetup();
  const settings = app.loadNode("DreamBoothSettings", 3);
  const data = app.loadNode("DreamBoothData", 4);
  const other = app.loadNode("KSampler", 6);
  const wizard = app.loadNode("PerformanceWizard", 7);
  report.before = describe(settings);
  settings.onExecuted({ text: ["Memory estimate for SD1.5\ntotal 3.74 GB"] });
  settings.onExecuted({ text: ["WARNING: these settings need about 18.22 GB but cuda:0 has 12.00 GB\ntotal 18.22 GB"] });
  report.settings = describe(settings);
  data.onExecuted({ text: ["Memory estimate for SD1.5\ntotal 4.00 GB"] });
  data.onExecuted({});            // an output without text leaves the shown one
  report.data = describe(data);
  report.otherHasHook = typeof other.onExecuted === "function";
  const optimizer = app.loadNode("DreamBoothOptimizer", 8);
  optimizer.onExecuted({ text: [ESTIMATE] });
  report.full = describe(optimizer);
  wizard.onExecuted({ text: ["LoRA of an SD1.x model at 512px, batch 1, on 8 GB: estimated 5.10 GB\n\n"
                             + "changed in the connected settings:\n- use_lora: False -> True\n\n" + ESTIMATE] });
  report.wizard = describe(wizard);
  report.done = true;
}

main().catch((error) => report.errors.push(String(error?.stack ?? error))).finally(() => {
  document.getElementById("result").textContent = JSON.stringify(report);
});
