"""The live panel's two HTTP routes on ComfyUI's server: GET /dreambooth/state (the state store of live.py, for a
page reloaded mid-run) and POST /dreambooth/control {node, run, action} (the panel's buttons as TrainingControl
requests).

A ComfyUI server is often reachable by others, so the routes assume nothing of the caller: a control request names
the run it means (a stale tab gets 409, an unknown node or an ended run 404, never another run's stop), Save now is
rate-limited per run (429), and a body that is not a small JSON object is refused with one line (400/413/415).
`state_response` / `control_response` are the answers as (status, body), testable without a server; the aiohttp
handlers only wrap them.

Outside ComfyUI `register_routes()` does nothing. Cheap to import: no torch, no aiohttp at module level.
"""
from __future__ import annotations

import json
import logging
import math

from ..training.control import ACTIONS, find_control
from . import comfy_compat, live   # live.send_ui_message looked up when sending: the panel's transport
from .live import MAX_ID_CHARS, STATUS_EVENT, find_reporter, get_runs, get_state

log = logging.getLogger(__name__)

MAX_CONTROL_BODY_BYTES = 4096    # {node, run, action} is ~60 bytes

_ACTION_MESSAGES = {
    "save_now": "Save requested: a checkpoint is written at the next step.",
    "stop_after_epoch": "Stop requested: training stops at the end of this epoch and saves a resumable state.",
    "stop_now": "Stop requested: training stops at the next step and saves a resumable state.",
}


def _short(value) -> str:
    """A caller-supplied value for an error message: repr()ed and cut, so a huge id cannot make a huge answer."""
    text = repr(value)
    return text if len(text) <= MAX_ID_CHARS + 2 else text[:MAX_ID_CHARS] + "…"


def state_response(node=None) -> tuple[int, dict]:
    """(HTTP status, JSON body) for GET /dreambooth/state[?node=ID]: without a node, {"nodes": the latest run of
    each node, "runs": the runs kept, oldest first}."""
    if node in (None, ""):
        return 200, {"nodes": get_state(), "runs": get_runs()}
    state = get_state(node) if len(str(node)) <= MAX_ID_CHARS else None
    if state is None:
        return 404, {"error": f"no DreamBooth training state for node {_short(node)}: "
                              "it has not trained since the server started"}
    return 200, state


def _id_field(payload: dict, key: str, what: str) -> tuple[str | None, str | None]:
    """(value as str, None) or (None, the 400 error) for the id `key` of a control request."""
    value = payload.get(key)
    if value is None or value == "":
        return None, f"missing {key!r}: {what}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        return None, f"{key!r} must be a string, not {type(value).__name__}"
    value = str(value)
    if len(value) > MAX_ID_CHARS:
        return None, f"{key!r} is longer than {MAX_ID_CHARS} characters"
    return value, None


def control_response(payload, now: float | None = None) -> tuple[int, dict]:
    """(HTTP status, JSON body) for POST /dreambooth/control {node, run, action}.

    400: not an object like that; 404: no run on that node, or the run has ended; 409: `run` is not the node's
    current run (a stale tab: its buttons must not act on the run that replaced it); 429: Save now while a request
    is pending or within the reporter's save_interval_s (live.SAVE_REQUEST_MIN_INTERVAL_S) of the last one (body:
    retry_after_s).
    `now`: the reporter's clock (tests); its own clock by default.
    """
    if not isinstance(payload, dict):
        return 400, {"error": 'the body must be a JSON object like {"node": "5", "run": "<run id>", '
                              '"action": "save_now"}'}
    node, error = _id_field(payload, "node", "the id of the TrainDreamBooth node to control")
    if error is None:
        run, error = _id_field(payload, "run", "the id of the run the panel shows (GET /dreambooth/state)")
    if error is not None:
        return 400, {"error": error}
    action = payload.get("action")
    if not isinstance(action, str) or action not in ACTIONS:
        return 400, {"error": f"unknown action {_short(action)}; expected one of {', '.join(ACTIONS)}"}
    reporter = find_reporter(node)
    if reporter is None:
        return 404, {"error": f"no training run is active for node {node!r}; queue the workflow first"}
    if run != reporter.run:
        return 409, {"error": f"stale run id {run!r}: node {node!r} is training another run now; reload its state "
                              "(GET /dreambooth/state) and try again"}
    control = find_control(node)
    if control is None or control is not reporter.control:
        return 404, {"error": f"run {run!r} of node {node!r} has ended; queue the workflow to train again"}
    if action == "save_now":
        refused = control.request_save_limited(reporter.save_interval_s,
                                               reporter.clock() if now is None else now)
        if refused is not None:
            reason, wait_s = refused
            if reason == "pending":
                error = "a save is already requested: the checkpoint is written at the next step"
            else:
                error = (f"a checkpoint was requested {reporter.save_interval_s - wait_s:.0f} s ago; "
                         f"Save now is allowed once every {reporter.save_interval_s:.0f} s (try again in "
                         f"{math.ceil(wait_s)} s)")
            return 429, {"error": error, "retry_after_s": math.ceil(wait_s) if wait_s > 0 else 1,
                         "control": control.snapshot()}
        changed = True
    else:
        before = control.snapshot()
        control.apply(action)
        changed = control.snapshot() != before   # a repeated stop changes nothing and tells nobody again
    message = _ACTION_MESSAGES[action]
    if changed:   # tell every open tab, not only the one that clicked
        live.send_ui_message(STATUS_EVENT, {"node": node, "run": reporter.run, "prompt": reporter.prompt,
                                            "state": reporter.current_state(),
                                            "message": message, "control": control.snapshot()})
    return 200, {"ok": True, "node": node, "run": reporter.run, "action": action, "message": message,
                 "control": control.snapshot()}


class BadBody(Exception):
    """A request body we refuse: `status` and a one-line `message`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


async def read_json_body(request, limit: int = MAX_CONTROL_BODY_BYTES):
    """The JSON value of an aiohttp request's body, read no further than `limit` bytes. Raises BadBody:
    415 not sent as application/json (which also means a cross-site form cannot send it without the browser
    asking the server first), 413 over `limit`, 400 empty or not JSON."""
    content_type = getattr(request, "content_type", "") or ""
    if content_type.lower() != "application/json":
        raise BadBody(415, f"send the body as JSON with 'Content-Type: application/json', not "
                           f"{_short(content_type) if content_type else 'no content type'}")
    length = getattr(request, "content_length", None)
    if length is not None and length > limit:
        raise BadBody(413, f"the body is {length} bytes; at most {limit} are accepted")
    chunks, size = [], 0
    while True:   # a chunked body has no length: read it no further than the limit
        chunk = await request.content.read(limit + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            raise BadBody(413, f"the body is over {limit} bytes; at most {limit} are accepted")
    if not size:
        raise BadBody(400, 'empty body: send a JSON object like {"node": "5", "run": "<run id>", '
                           '"action": "save_now"}')
    try:
        return json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:   # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise BadBody(400, f"the body is not valid JSON ({str(e).splitlines()[0][:120]})") from None


_routes_registered = False


def _add_routes(routes) -> None:
    """Add our handlers to an aiohttp RouteTableDef (ComfyUI's PromptServer.instance.routes)."""
    from aiohttp import web   # ComfyUI's server dependency; only needed inside ComfyUI

    def answer(status: int, body: dict):
        headers = {"Retry-After": str(body["retry_after_s"])} if status == 429 and "retry_after_s" in body else None
        return web.json_response(body, status=status, headers=headers)

    @routes.get("/dreambooth/state")
    async def dreambooth_state(request):
        try:
            return answer(*state_response(request.rel_url.query.get("node")))
        except Exception:  # noqa: BLE001 - a bug here must not show a traceback to whoever asks
            log.exception("GET /dreambooth/state failed")
            return answer(500, {"error": "internal error in the DreamBooth state route; see the server log"})

    @routes.post("/dreambooth/control")
    async def dreambooth_control(request):
        try:
            payload = await read_json_body(request)
        except BadBody as e:
            return answer(e.status, {"error": str(e)})
        except Exception as e:  # noqa: BLE001 - a broken connection or stream is the client's problem
            return answer(400, {"error": f"could not read the body: {type(e).__name__}"})
        try:
            return answer(*control_response(payload))
        except Exception:  # noqa: BLE001
            log.exception("POST /dreambooth/control failed")
            return answer(500, {"error": "internal error in the DreamBooth control route; see the server log"})


def register_routes() -> bool:
    """Add GET /dreambooth/state and POST /dreambooth/control to ComfyUI's server (also served under /api).

    Call at pack import time (ComfyUI copies its route table after loading custom nodes). Returns False and
    does nothing outside ComfyUI; idempotent inside.
    """
    global _routes_registered
    if not _routes_registered:
        _routes_registered = comfy_compat.register_routes(_add_routes)
    return _routes_registered
