"""training/speed.py: speed and ETA from the mean of the latest step times (issue 23.6)."""
import pytest

from comfyui_dreambooth.training.speed import STEP_WINDOW, StepTimer


def run(durations, start=100.0):
    timer, now, rates = StepTimer(start), start, []
    for d in durations:
        now += d
        rates.append(timer.step(now))
    return timer, rates


def test_steady_steps():
    timer, rates = run([0.5] * 10)
    assert rates[-1] == pytest.approx(2.0) and timer.eta(8) == pytest.approx(4.0)


def test_a_slowdown_shows_in_the_eta_at_once():
    """30 steps of 0.1 s, then 5 of 10 s, 25 to go: 4 minutes remain at the slow pace. The old average of rates
    (0.9·rate + 0.1/dt) still said ~6 it/s, "ETA 4 s"; the mean of the last 20 step times says 2.6 s a step."""
    timer, rates = run([0.1] * 30 + [10.0] * 5)
    mean = (15 * 0.1 + 5 * 10.0) / STEP_WINDOW
    assert rates[-1] == pytest.approx(1 / mean) and timer.eta(25) == pytest.approx(25 * mean)
    assert timer.eta(25) > 60
    old = None
    for d in [0.1] * 30 + [10.0] * 5:
        old = 1 / d if old is None else 0.9 * old + 0.1 / d
    assert 25 / old < 10                            # what the panel used to promise


def test_recovers_after_the_window():
    _, rates = run([10.0] * 5 + [0.1] * STEP_WINDOW)
    assert rates[-1] == pytest.approx(10.0)


def test_unknown_until_a_step_took_time():
    timer = StepTimer(5.0)
    assert timer.rate is None and timer.eta(10) is None
    assert timer.step(5.0) is None and timer.eta(3) is None
    assert timer.step(6.0) == pytest.approx(2.0)     # two steps in one second
    assert timer.eta(0) == 0 and timer.eta(-1) == 0


@pytest.mark.slow
@pytest.mark.usefixtures("single_thread")
def test_the_trainer_reports_the_mean_step_time(sd1, tmp_path):
    """Two steps slowed down by a second each: the speed the trainer reports after them is at most the steps done
    over the time they took (the average of rates stayed near the fast steps' rate)."""
    import time

    from comfyui_dreambooth.training.trainer import TrainCallbacks, train
    from trainer_fixtures import make_concept, tiny_settings

    seen = []

    def progress(p):
        seen.append((p["step"], time.time(), p["it_per_s"], p["eta_s"]))
        if p["step"] in (2, 3):
            time.sleep(1.0)

    train(sd1, [make_concept(tmp_path, n=2)], tiny_settings(steps_per_image=3), output_root=str(tmp_path / "out"),
          callbacks=TrainCallbacks(progress=progress))
    by_step = {step: (t, rate, eta) for step, t, rate, eta in seen}
    (t1, _, _), (t4, rate4, eta4) = by_step[1], by_step[4]
    assert rate4 * (t4 - t1) < 4, seen
    assert eta4 == pytest.approx(2 / rate4)
