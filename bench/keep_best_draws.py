"""Would keep_best choose well with another noise draw? (issue 20 point 2; reads bench/keep_best_noise.py's output)

    python bench/keep_best_draws.py W/keep_best_noise.json [...]

keep_best_noise.py measured every checkpoint's subject loss at 16 fixed noise draws per timestep. Here each draw
(and each group of 2, 4, 8 and 16 draws, averaged) is scored alone, as a run's own validation would score it, with
keep_best's tie rule (best.LOSS_TIE: within 1 % of the lowest, the latest wins), once over the three bands
(validation.TIMESTEP_BANDS) and once over the low and middle bands only (best.SCORE_BANDS). Printed per run and
scoring: the fidelity each group's choice has, and in how many groups it is within 0.05 of the evaluator's best.
"""
from __future__ import annotations

import json
import os
import sys

SCORINGS = {"three bands": (150, 500, 850), "low and middle bands": (150, 500)}


def choice(points: list[dict], timesteps: tuple, at: dict, draws: slice, tie: float) -> dict:
    import numpy as np

    scores = [float(np.asarray(p["loss"])[[at[t] for t in timesteps], draws].mean()) for p in points]
    lowest = min(scores)
    return max((p for p, s in zip(points, scores) if s <= lowest * (1 + tie)), key=lambda p: p["step"])


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from comfyui_dreambooth.training.best import LOSS_TIE

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
                    picks = [choice(points, timesteps, at, slice(g * size, (g + 1) * size), LOSS_TIE)
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
