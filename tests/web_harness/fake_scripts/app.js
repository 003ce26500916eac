// Fake of ComfyUI's scripts/app.js for the panel harness: extension registry + minimal LGraphNode stand-ins.
// Only what web/dreambooth.js touches: registerExtension, setup/nodeCreated/loadedGraphNode hooks, addDOMWidget.
const extensions = [];

class FakeNode {
  constructor(type, host) {
    this.id = -1;              // like LiteGraph while a saved workflow is being loaded
    this.type = type;
    this.comfyClass = type;
    this.size = [300, 120];
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
    element.style.width = `${this.size[0] - 20}px`;
    element.style.height = `${options.getMinHeight?.() ?? 100}px`;
    this.frame.append(element);
    return widget;
  }

  setSize(size) {
    this.size = size;
    this.frame.style.width = `${size[0]}px`;
    for (const widget of this.widgets) widget.element.style.width = `${size[0] - 20}px`;
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
