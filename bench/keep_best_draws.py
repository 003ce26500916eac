"""Would keep_best choose well with another noise draw? (issue 20 point 2; reads bench/keep_best_noise.py's output)

    python bench/keep_best_draws.py W/keep_best_noise.json [...]

keep_best_noise.py measured every checkpoint's subject loss at 16 fixed noise draws per timestep. Here each draw
(and each group of 2, 4, 8 and 16 draws, averaged) is scored alone, as a run's own validation would score it, by
keep_best's own rule (best.choose_best: within its tie, best.tie, of the lowest, the latest wins), once over the three bands
(validation.TIMESTEP_BANDS) and once over the low and middle bands only (best.SCORE_BANDS). Printed per run and
scoring: the fidelity each group's choice has, and in how many groups it is within 0.05 of the evaluator's best.
"""
from __future__ import annotations

import json
import sys

SCORINGS = {"three bands": (150, 500, 850), "low and middle bands": (150, 500)}


def choice(points: list[dict], timesteps: tuple, at: dict, draws: slice) -> dict:
    """The point keep_best's own rule (best.choose_best, no drift ceiling) picks when the run's records held these
    draws: records with the low and middle bands score by them (the rule today); records with a plain mean over
    `timesteps` only score by that mean (the rule before 2026-12-07)."""
    import numpy as np

    from comfyui_dreambooth.training.best import choose_best

    records = []
    for p in points:
        losses = np.asarray(p["loss"])[:, draws].mean(axis=1)
        record = {"step": p["step"], "checkpoint": p["checkpoint"], "prior_drift": 0.0,
                  "loss": float(losses[[at[t] for t in timesteps]].mean())}
        if timesteps == SCORINGS["low and middle bands"]:
            record.update(loss_low=float(losses[at[150]]), loss_mid=float(losses[at[500]]))
        records.append(record)
    best, _ = choose_best(records, 0)
    return next(p for p in points if p["checkpoint"] == best["checkpoint"])


def main(argv: list[str] | None = None) -> int:
    paths = (argv if argv is not None else sys.argv[1:])
    if not paths:
        print(__doc__)
        return 2
    totals: dict[tuple, list[int]] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        at = {t: i for i, t in enumerate(data["timesteps"])}
        noises = data["noises"]
        for run in data["runs"]:
            points = run["points"]
            best = max(p["subject_fidelity"] for p in points)
            print(f"{path} {run['run']}: evaluator's best fidelity {best}, steps {[p['step'] for p in points]}")
            for name, timesteps in SCORINGS.items():
                for size in (1, 2, 4, 8, 16):
                    if size > noises:
                        continue
                    picks = [choice(points, timesteps, at, slice(g * size, (g + 1) * size))
                             for g in range(noises // size)]
                    ok = sum(best - p["subject_fidelity"] <= 0.05 for p in picks)
                    tally = totals.setdefault((name, size), [0, 0])
                    tally[0] += ok
                    tally[1] += len(picks)
                    print(f"  {name}, {size} draw(s): chosen fidelity {[p['subject_fidelity'] for p in picks]}, "
                          f"within 0.05 of the best {ok}/{len(picks)}")
    print("over every run:")
    for (name, size), (ok, n) in totals.items():
        print(f"  {name}, {size} draw(s): {ok}/{n}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
