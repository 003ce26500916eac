// Shows the settings nodes' memory estimate (and the PerformanceWizard's explanation) on the node itself.
//
// The DreamBooth settings nodes (nodes/settings.py) and the PerformanceWizard (nodes/wizard.py) return
// {"ui": {"text": [text]}, ...}; ComfyUI hands that to node.onExecuted(output) but draws no text by itself, so this
// extension puts it in a read-only box under the node's widgets (created on the first result, never saved with the
// workflow). The box is as high as its text (the total line at its end stays in view) and the node grows to hold
// it, so it never spills onto the nodes around. A text with a line starting with "WARNING" (the settings need more
// memory than the GPU has) is drawn in red.
// Plain ES module, no dependencies: ComfyUI's app only.
import { app } from "../../scripts/app.js";

const SETTINGS_NODE_TYPES = new Set([
  "DreamBoothSettings", "DreamBoothOptimizer", "DreamBoothAdvanced", "DreamBoothData", "DreamBoothImagic",
  "DreamBoothValidation", "PerformanceWizard",
]);
const WIDGET_NAME = "memory_estimate_view";
const LINE_HEIGHT = 14;       // CSS pixels per line of the 11px monospace text
const PADDING = 6;
const MIN_HEIGHT = 60;
const MAX_HEIGHT = 640;       // a longer text scrolls (a pathological one; an estimate has ~13 lines)
const MIN_WIDTH = 420;
const CHARS_PER_LINE = 62;    // of the 11px monospace font in a MIN_WIDTH node: longer lines wrap

function isSettingsNode(node) {
  return SETTINGS_NODE_TYPES.has(node?.comfyClass) || SETTINGS_NODE_TYPES.has(node?.type);
}

function estimateText(output) {
  const text = output?.text;
  if (Array.isArray(text)) return text.filter((t) => typeof t === "string").join("\n");
  return typeof text === "string" ? text : "";
}

// The height the text needs: its lines (long ones wrap) at LINE_HEIGHT, plus padding and border.
function textHeight(text) {
  const lines = text.split("\n").reduce((n, line) => n + Math.max(1, Math.ceil(line.length / CHARS_PER_LINE)), 0);
  return Math.min(MAX_HEIGHT, Math.max(MIN_HEIGHT, lines * LINE_HEIGHT + 2 * PADDING + 2));
}

// LiteGraph's node.size is a Float32Array view, not an Array: anything with two numbers counts.
function hasSize(node) {
  return node?.size != null && node.size.length >= 2;
}

// The node as wide as MIN_WIDTH and high enough for every widget (the box's height included).
function fitNode(node) {
  if (!hasSize(node)) return;
  const size = node.computeSize?.();
  node.setSize?.([Math.max(node.size[0], MIN_WIDTH, size?.[0] ?? 0), Math.max(node.size[1], size?.[1] ?? 0)]);
}

function view(node) {
  if (node.__dreamboothEstimate) return node.__dreamboothEstimate;
  const box = document.createElement("pre");
  box.className = "dreambooth-memory-estimate";
  Object.assign(box.style, {
    margin: "0", padding: `${PADDING}px`, boxSizing: "border-box", overflow: "auto", whiteSpace: "pre-wrap",
    font: "11px monospace", lineHeight: `${LINE_HEIGHT}px`, color: "#ddd", background: "#1b1b1b",
    borderRadius: "4px", border: "1px solid #333", overflowWrap: "anywhere",
  });
  const state = { box, widget: null, height: MIN_HEIGHT };
  state.widget = node.addDOMWidget?.(WIDGET_NAME, "dreambooth-memory-estimate", box,
                                     { serialize: false, hideOnZoom: false, getMinHeight: () => state.height });
  if (state.widget) state.widget.serialize = false;   // never part of the workflow's widgets_values
  node.__dreamboothEstimate = state;
  return state;
}

function show(node, text) {
  const state = view(node);
  const { box } = state;
  const warning = text.split("\n").some((line) => line.startsWith("WARNING"));
  state.height = textHeight(text);
  box.style.minHeight = `${state.height}px`;
  box.textContent = text;
  box.title = warning ? "These settings need more memory than the GPU has" : "";
  box.dataset.warning = warning ? "true" : "false";
  box.style.color = warning ? "#ff8a80" : "#ddd";
  box.style.borderColor = warning ? "#c0392b" : "#333";
  fitNode(node);
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
