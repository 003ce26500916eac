"""TrainingControl: the flags the trainer polls, their thread safety, and the registry."""
import threading

import pytest

from comfyui_dreambooth.training import control as control_module
from comfyui_dreambooth.training.control import (ACTIONS, TrainingControl, find_control, get_control, new_control,
                                                 release_control)


@pytest.fixture(autouse=True)
def empty_registry():
    control_module.controls.clear()
    yield
    control_module.controls.clear()


def test_nothing_requested_by_default():
    control = TrainingControl()
    assert control.take_save_request() is False
    assert control.should_stop(epoch_end=False) is False
    assert control.should_stop(epoch_end=True) is False
    assert control.stop_requested is False
    assert control.snapshot() == {"save_requested": False, "stop_after_epoch": False, "stop_now": False}


def test_save_request_is_taken_once():
    control = TrainingControl()
    control.request_save()
    assert control.snapshot()["save_requested"] is True
    assert control.take_save_request() is True
    assert control.take_save_request() is False   # one click = one checkpoint


def test_stop_after_epoch_waits_for_epoch_end():
    control = TrainingControl()
    control.request_stop()            # default: after the epoch
    assert control.stop_requested
    assert control.should_stop(epoch_end=False) is False
    assert control.should_stop(epoch_end=True) is True
    assert control.should_stop(epoch_end=True) is True   # stays set: the trainer may poll twice


def test_stop_now_stops_mid_epoch():
    for request in (lambda c: c.stop_now(), lambda c: c.request_stop(after_epoch=False)):
        control = TrainingControl()
        request(control)
        assert control.should_stop(epoch_end=False) is True
        assert control.snapshot()["stop_now"] is True


def test_apply_by_action_name():
    control = TrainingControl()
    for action in ACTIONS:
        control.apply(action)
    assert control.snapshot() == {"save_requested": True, "stop_after_epoch": True, "stop_now": True}
    with pytest.raises(ValueError, match="save_now, stop_after_epoch, stop_now"):
        control.apply("explode")


def test_requests_from_other_threads_are_all_seen():
    control = TrainingControl()
    taken = []
    stop = threading.Event()

    def trainer():
        while not stop.is_set():
            if control.take_save_request():
                taken.append(1)

    thread = threading.Thread(target=trainer)
    thread.start()
    for _ in range(200):
        control.request_save()
    stop.set()
    thread.join()
    taken.append(control.take_save_request())
    # requests may coalesce (a flag, not a queue) but none is lost: the last one is always taken
    assert 1 <= sum(taken) <= 200
    assert control.take_save_request() is False


def test_registry_keys_are_strings_and_new_control_replaces():
    first = get_control(5)
    assert get_control("5") is first
    assert find_control(5) is first
    first.request_stop()
    fresh = new_control("5")
    assert fresh is not first and not fresh.stop_requested
    assert get_control(5) is fresh
    release_control(5)
    assert find_control("5") is None
    release_control("never-registered")   # harmless


def test_limited_save_requests_one_pending_and_one_per_interval():
    """Issue 10.3: the web route asks through request_save_limited(): a pending request or one younger than the
    interval is refused (and says why); request_save() itself stays unlimited for the trainer's own callers."""
    control = TrainingControl()
    assert control.request_save_limited(30, now=100.0) is None
    assert control.snapshot()["save_requested"] is True
    assert control.request_save_limited(30, now=200.0) == ("pending", 0.0)   # not written yet, however late
    assert control.take_save_request() is True
    assert control.request_save_limited(30, now=110.0) == ("too_soon", 20.0)
    assert control.snapshot()["save_requested"] is False
    assert control.request_save_limited(30, now=130.0) is None
    control.take_save_request()
    assert control.request_save_limited(0, now=130.0) is None                # no interval: only one pending
    control.request_save()                                                    # unlimited path unchanged
    assert control.take_save_request() is True
