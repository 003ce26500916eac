// Shows the settings nodes' memory estimate on the node itself.
//
// The DreamBooth settings nodes (nodes/settings.py) return {"ui": {"text": [estimate]}, ...}; ComfyUI hands that
// to node.onExecuted(output) but draws no text by itself, so this extension puts it in a read-only box under the
// node's widgets (created on the first result, never saved with the workflow). A text starting with "WARNING"
// (the settings need more memory than the GPU has) is drawn in red.
// Plain ES module, no dependencies: ComfyUI's app only.
import { app } from "../../scripts/app.js";

const SETTINGS_NODE_TYPES = new Set([
  "DreamBoothSettings", "DreamBoothOptimizer", "DreamBoothAdvanced", "DreamBoothData", "DreamBoothImagic",
]);
const WIDGET_NAME = "memory_estimate_view";
const MIN_HEIGHT = 150;       // CSS pixels; the box scrolls beyond it
const MIN_WIDTH = 420;

function isSettingsNode(node) {
  return SETTINGS_NODE_TYPES.has(node?.comfyClass) || SETTINGS_NODE_TYPES.has(node?.type);
}

function estimateText(output) {
  const text = output?.text;
  if (Array.isArray(text)) return text.filter((t) => typeof t === "string").join("\n");
  return typeof text === "string" ? text : "";
}

function view(node) {
  if (node.__dreamboothEstimate) return node.__dreamboothEstimate;
  const box = document.createElement("pre");
  box.className = "dreambooth-memory-estimate";
  Object.assign(box.style, {
    margin: "0", padding: "6px", boxSizing: "border-box", overflow: "auto", whiteSpace: "pre-wrap",
    font: "11px monospace", color: "#ddd", background: "#1b1b1b", borderRadius: "4px",
    border: "1px solid #333", minHeight: `${MIN_HEIGHT}px`,
  });
  const widget = node.addDOMWidget?.(WIDGET_NAME, "dreambooth-memory-estimate", box,
                                     { serialize: false, hideOnZoom: false, getMinHeight: () => MIN_HEIGHT });
  if (widget) widget.serialize = false;   // never part of the workflow's widgets_values
  node.__dreamboothEstimate = { box, widget };
  const size = node.computeSize?.();
  if (Array.isArray(node.size)) {
    node.setSize?.([Math.max(node.size[0], MIN_WIDTH, size?.[0] ?? 0), Math.max(node.size[1], size?.[1] ?? 0)]);
  }
  return node.__dreamboothEstimate;
}

function show(node, text) {
  const { box } = view(node);
  const warning = text.startsWith("WARNING");
  box.textContent = text;
  box.title = warning ? "These settings need more memory than the GPU has" : "";
  box.dataset.warning = warning ? "true" : "false";
  box.style.color = warning ? "#ff8a80" : "#ddd";
  box.style.borderColor = warning ? "#c0392b" : "#333";
  node.setDirtyCanvas?.(true, true);
}

app.registerExtension({
  name: "comfyui-dreambooth.memory-estimate",
  nodeCreated(node) {
    if (!isSettingsNode(node)) return;
    const onExecuted = node.onExecuted;
    node.onExecuted = function (output) {
      const result = onExecuted?.apply(this, arguments);
      const text = estimateText(output);
      if (text) show(this, text);
      return result;
    };
  },
});

// for the test harness; ComfyUI ignores module exports
export { SETTINGS_NODE_TYPES, estimateText, show };
