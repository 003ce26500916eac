"""The pack's extensions in ComfyUI's real frontend (the comfyui-frontend-package wheel ComfyUI 0.3.64 pins), in
headless Chromium, against tests/frontend_standin.py: a stand-in server answering what the frontend needs from
the pack's own node classes and nodes/live.py (issue 23's browser checks). What a user sees:

  * every example loads with no two nodes overlapping, also once the settings nodes show their memory estimate,
    which stays inside its node with its total line in view; node widths are applied;
  * a queued workflow's panel shows its run; Save now is confirmed ("saved step N"); Stop after epoch ends the run
    as "stopped at step N (checkpoint saved)", without an ETA; a second workflow's Train node with the same id
    shows nothing; the first workflow loaded again shows its own run.
  * a Train node converted into a subgraph (the prompt names it "<subgraph node>:<node>") shows and stops its own run;
  * the Templates browser lists the examples under "DreamBooth", each titled by its file name, with its thumbnail.

Skipped without chromium or without the frontend package (pip install comfyui-frontend-package==1.27.10; the
[test] extra has it). The same checks against a real ComfyUI: tests/test_real_comfyui_browser.py (opt-in).
"""
from urllib.parse import urlencode

import pytest

import frontend_standin
from comfyui_dreambooth.nodes import live

CHROMIUM = frontend_standin.CHROMIUM
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium)"),
    pytest.mark.skipif(frontend_standin.frontend_root() is None,
                       reason="comfyui-frontend-package is not installed (pip install comfyui-frontend-package)"),
]
DASH = "–"


def play(scenario: str, timeout: float = 150.0, **params: str) -> dict:
    """Open the frontend on a fresh stand-in with ?scenario=...&<params>; return the harness's report."""
    live.clear_states()
    server = frontend_standin.serve()
    try:
        with frontend_standin.headless_browser(f"{server.url}/?{urlencode({'scenario': scenario, **params})}"):
            assert server.report_ready.wait(timeout), f"no report from the {scenario} scenario in {timeout} s"
        report = server.reports[0]
    finally:
        server.shutdown()
        server.server_close()
        live.clear_states()
    assert report["done"] and report["errors"] == [], report["errors"]
    assert report["train"] and report["socket"]["state"] == 1      # the node is known; the websocket is open
    return report


@pytest.fixture(scope="module")
def examples():
    return play("examples")["examples"]


@pytest.fixture(scope="module")
def panel():
    return play("panel")


@pytest.mark.slow
def test_examples_have_no_overlapping_nodes(examples):
    assert len(examples) == 7
    for name, example in examples.items():
        assert example["loaded"] == [], (name, example["loaded"])
        assert example["withEstimates"] == [], (name, example["withEstimates"])   # estimates shown, room left


@pytest.mark.slow
def test_the_estimate_stays_inside_its_node_with_its_total_in_view(examples):
    for name, example in examples.items():
        assert example["estimates"], name
        for title, box in example["estimates"].items():
            assert box["shown"] and not box["scrolls"], (name, title, box)
            assert box["height"] >= box["needed"], (name, title, box)       # the node holds all its widgets
            assert box["width"] >= 420, (name, title, box)


@pytest.mark.slow
def test_node_widths_are_applied(examples):
    for name, example in examples.items():
        for title, (kind, width) in example["widths"].items():
            if kind == "TrainDreamBooth":
                assert width >= 380, (name, title, width)


@pytest.mark.slow
def test_the_panel_shows_its_run_confirms_save_now_and_a_stop(panel):
    assert panel["beforeQueue"]["state"] == "idle" and set(panel["beforeQueue"]["fields"].values()) == {DASH}
    assert len(panel["prompts"]) == 1                                 # the queue bound the node to its prompt
    mid = panel["midRun"]
    assert mid["state"] == "running" and mid["fields"]["eta"] != DASH and not any(mid["buttons"].values())
    assert mid["fields"]["epoch"] == "1 / 20"
    saved = panel["saved"]
    step = int(saved["message"].removeprefix("saved step "))
    assert step >= int(mid["fields"]["step"].split(" / ")[0])
    stopped = panel["stopped"]
    assert stopped["state"] == "stopped" and stopped["message"] == "stopped at step 20 (checkpoint saved)"
    assert stopped["fields"]["eta"] == DASH and all(stopped["buttons"].values())


@pytest.mark.slow
def test_another_workflows_panel_shows_nothing_and_the_first_its_own_run(panel):
    assert panel["sameId"]
    other = panel["otherWorkflow"]
    assert other["state"] == "idle" and other["message"].startswith("Queue the workflow")
    assert set(other["fields"].values()) == {DASH} and all(other["buttons"].values())
    assert panel["firstAgain"]["state"] == "stopped" and panel["firstAgain"]["fields"] == panel["stopped"]["fields"]


@pytest.fixture(scope="module")
def subgraph():
    return play("subgraph")["subgraph"]


@pytest.mark.slow
def test_a_train_node_turned_into_a_subgraph_shows_and_stops_its_own_run(subgraph):
    """Issue 23: in a subgraph the prompt names the Train node "<subgraph node>:<node>"; its panel binds to the
    queued prompt, shows the run the server reports under that id, and its button stops that run."""
    assert not subgraph["onRoot"]
    assert subgraph["trainIds"] == [f"{subgraph['instance']}:{subgraph['inner']}"]
    assert subgraph["beforeQueue"]["state"] == "idle" and len(subgraph["prompts"]) == 1
    assert subgraph["running"]["state"] == "running" and subgraph["running"]["fields"]["eta"] != DASH
    stopped = subgraph["stopped"]
    assert stopped["state"] == "stopped" and stopped["message"].startswith("stopped at step ")


@pytest.mark.slow
def test_the_templates_browser_shows_readable_titles_thumbnails_and_the_pack_name():
    """Issue 23.7: frontend 1.27 titles a custom node's template by its file name (and describes it by the same
    name with '-' and '_' as spaces): the file names are the titles. The pack's entry reads "DreamBooth"
    (locales/en/main.json, templateWorkflows.category.<folder name>)."""
    import make_example_workflows as make

    report = play("templates", label="DreamBooth")
    cards = report["templateCards"]
    assert set(cards) == set(make.EXAMPLES), sorted(cards)
    for name, lines in cards.items():
        assert lines[0] == name and "_" not in name, (name, lines)
        assert report["templateThumbnails"][name] and all(t is True for t in report["templateThumbnails"][name]), \
            (name, report["templateThumbnails"][name])
