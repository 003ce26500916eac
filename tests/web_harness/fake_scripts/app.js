// Fake of ComfyUI's scripts/app.js for the panel harness: extension registry + minimal LGraphNode stand-ins.
// Only what web/dreambooth.js touches: registerExtension, setup/nodeCreated/loadedGraphNode hooks, addDOMWidget.
const extensions = [];
const TITLE_HEIGHT = 30;

class FakeNode {
  constructor(type, host) {
    this.id = -1;              // like LiteGraph while a saved workflow is being loaded
    this.type = type;
    this.comfyClass = type;
    // like LiteGraph's LGraphNode: pos and size are views of one Float32Array (not Arrays)
    this._posSize = new Float32Array([0, 0, 300, 120]);
    this.size = this._posSize.subarray(2, 4);
    this.widgets = [];
    this.properties = {};
    this.graph = null;
    this.frame = document.createElement("div");
    this.frame.className = "fake-node";
    this.frame.dataset.type = type;
    const title = document.createElement("div");
    title.className = "fake-node-title";
    title.textContent = type;
    this.frame.append(title);
    host.append(this.frame);
  }

  addDOMWidget(name, type, element, options = {}) {
    const widget = { name, type, element, options, value: options.getValue?.() };
    this.widgets.push(widget);
    this.frame.append(element);
    this.layout();
    return widget;
  }

  // LiteGraph's size: the title, then each widget's minimum height (+4), +8 (what computeSize adds up)
  computeSize() {
    const widgets = this.widgets.reduce((sum, w) => sum + (w.options.getMinHeight?.() ?? 20) + 4, 0);
    return new Float32Array([300, TITLE_HEIGHT + widgets + 8]);
  }

  setSize(size) {
    this.size[0] = size[0];
    this.size[1] = size[1];
    this.layout();
  }

  // what the frontend does on each draw: DOM widgets as wide as the node, as high as they ask
  layout() {
    this.frame.style.width = `${this.size[0]}px`;
    for (const widget of this.widgets) {
      widget.element.style.width = `${this.size[0] - 20}px`;
      widget.element.style.height = `${widget.options.getMinHeight?.() ?? 100}px`;
    }
  }

  setDirtyCanvas() {}
}

export const app = {
  extensions,
  graph: { name: "workflow 1" },   // the active workflow's graph (app.rootGraph in newer frontends)
  registerExtension(extension) {
    extensions.push(extension);
  },
  async runSetup() {
    for (const extension of extensions) await extension.init?.(this);
    for (const extension of extensions) await extension.setup?.(this);
  },
  // The order ComfyUI uses when a workflow is loaded: create (hooks see id -1), configure (id, the properties saved
  // with the workflow, its graph), loadedGraphNode.
  loadNode(type, id, { host = document.getElementById("graph"), properties = {}, graph = this.graph } = {}) {
    const node = new FakeNode(type, host);
    for (const extension of extensions) extension.nodeCreated?.(node, this);
    node.id = id;
    node.properties = structuredClone(properties);
    node.graph = graph;
    for (const extension of extensions) extension.loadedGraphNode?.(node, this);
    return node;
  },
};
