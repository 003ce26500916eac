"""Record the browser messages a LiveReporter sends for a synthetic run; the fixture messages.json is its output.

    /tmp/venv/bin/python tests/web_harness/record_messages.py   # rewrites messages.json (and state.json)

tests/test_live.py checks the committed fixtures still equal what the reporter sends, so the JS panel is always
tested against the real message format.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
NODE_ID = "5"
TOTAL_STEPS = 300
STEPS_PER_EPOCH = 60
PREVIEW_EVERY = 100
VALIDATE_EVERY = 50               # the chart's second curve (issue 20): one validation loss per 50 steps
PROMPT_ID = "demo-prompt-0001"    # the ComfyUI prompt that started the run (the harness's workflow queued it)


def synthetic_loss(step: int, rng: random.Random) -> float:
    """A DreamBooth-like loss: noisy, slowly decreasing, never negative."""
    return max(0.01, 0.06 + 0.14 * math.exp(-step / 90) + rng.gauss(0, 0.035))


def preview_refs(step: int) -> list[dict]:
    return [{"filename": f"preview_{step:05d}_{i}.png", "subfolder": "dreambooth/demo-run/previews",
             "type": "output"} for i in range(2)]


def record_run(node_id: str = NODE_ID, total: int = TOTAL_STEPS, *, stop_at: int | None = None,
               final_state: str = "done") -> tuple[list[dict], dict]:
    """Drive a LiveReporter through a fake run with a fake clock (10 steps/s); return (messages, final state)."""
    from comfyui_dreambooth.nodes import live

    messages: list[dict] = []
    clock = {"t": 0.0}
    reporter = live.LiveReporter(node_id, "output/dreambooth/demo-run", clock=lambda: clock["t"],
                                 send=lambda event, data: messages.append({"type": event, "data": data}),
                                 run_id="demo-run-0001", prompt_id=PROMPT_ID)
    reporter.status("running", "training 5 images, 300 steps")
    rng = random.Random(0)
    it_per_s = 10.0
    last = total if stop_at is None else stop_at
    for step in range(1, last + 1):
        clock["t"] += 1.0 / it_per_s
        lr = 1e-4 * min(1.0, step / 30)   # constant_with_warmup
        reporter.progress(step, total, epoch=(step - 1) // STEPS_PER_EPOCH + 1, loss=synthetic_loss(step, rng),
                          lr=lr, it_per_s=it_per_s, eta_s=(total - step) / it_per_s)
        if step % VALIDATE_EVERY == 0:
            reporter.validation(step, 0.07 + 0.1 * math.exp(-step / 120))
        if step % PREVIEW_EVERY == 0:
            reporter.status("sampling", f"sampling previews at step {step}")
            reporter.preview(preview_refs(step), step=step)
            reporter.status("running", "")
    if stop_at is None:
        reporter.status(final_state, "saved loras/demo.safetensors")
    state = reporter.state
    state.pop("updated")
    return messages, state


def record() -> tuple[list[dict], dict]:
    """(messages of a full run, state of a run still going at step 150) - the two harness fixtures."""
    messages, _ = record_run()
    _, state = record_run(stop_at=150)
    return messages, state


def state_body(state: dict) -> dict:
    """GET /dreambooth/state as the server answers it with this one run."""
    return {"nodes": {NODE_ID: state}, "runs": [state]}


def main() -> None:
    messages, state = record()
    lines = ",\n".join(json.dumps(message, separators=(",", ":")) for message in messages)
    (HERE / "messages.json").write_text("[\n" + lines + "\n]\n")   # one message per line: readable diffs
    (HERE / "state.json").write_text(json.dumps(state_body(state), indent=1) + "\n")
    print(f"wrote {len(messages)} messages and a mid-run state to {HERE}")


if __name__ == "__main__":
    main()
