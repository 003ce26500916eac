// Fake of ComfyUI's scripts/api.js: an EventTarget that the harness dispatches recorded messages on, and a
// fetchApi that answers the pack's two routes from canned data and records every call.
function jsonResponse(body, status = 200) {
  return new Response(JSON.stringify(body), { status, headers: { "Content-Type": "application/json" } });
}

class FakeApi extends EventTarget {
  constructor() {
    super();
    this.calls = [];
    this.stateBody = { nodes: {} };
    this.failNextControl = null;   // {status, error}: the next POST /dreambooth/control answers with it
    this.queued = [];              // what queuePrompt was called with
    this.nextPromptId = "prompt-1";
  }

  // ComfyUI's api.queuePrompt(number, {output, workflow}): POST /prompt, answered with the new prompt's id
  async queuePrompt(number, data) {
    this.queued.push({ number, output: Object.keys(data?.output ?? {}) });
    return { prompt_id: this.nextPromptId, number, node_errors: {} };
  }

  apiURL(route) {
    return `/api${route}`;
  }

  async fetchApi(route, options = {}) {
    const method = (options.method ?? "GET").toUpperCase();
    const call = { route, method, body: options.body ? JSON.parse(options.body) : null };
    this.calls.push(call);
    if (method === "GET" && route.startsWith("/dreambooth/state")) return jsonResponse(this.stateBody);
    if (method === "POST" && route === "/dreambooth/control") {
      if (this.failNextControl) {
        const { status, error } = this.failNextControl;
        this.failNextControl = null;
        return jsonResponse({ error }, status);
      }
      const { node, run, action } = call.body ?? {};
      // like nodes/live_routes.py: the run id must be the node's current run
      if (run == null) return jsonResponse({ error: "missing 'run'" }, 400);
      const current = this.stateBody?.nodes?.[node]?.run;
      if (current == null) return jsonResponse({ error: `no training run is active for node '${node}'` }, 404);
      if (run !== current) return jsonResponse({ error: `stale run id '${run}'` }, 409);
      const control = { save_requested: action === "save_now", stop_after_epoch: action === "stop_after_epoch",
                        stop_now: action === "stop_now" };
      return jsonResponse({ ok: true, node, action, message: `harness accepted ${action}`, control });
    }
    return jsonResponse({ error: `fake api has no route ${method} ${route}` }, 404);
  }
}

export const api = new FakeApi();
