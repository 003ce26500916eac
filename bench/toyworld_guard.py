"""The toy world's guard check (issue 19 point 5), runnable on its own (training/toyworld/guard.py says what it checks
and what each sabotage breaks):

    python bench/toyworld_guard.py [--samples 12] [--base FILE] [--rows lora full full_prior]
                                   [--sabotage lr0|no_te_lora|no_prior_loss] [--workers N]

Prints the result as JSON and exits 1 when a goal is missed.
"""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from comfyui_dreambooth.training.toyworld.guard import ROWS, SABOTAGES, missed, run

    p = argparse.ArgumentParser(description="the toy world's guard check")
    p.add_argument("--samples", type=int, default=12)
    p.add_argument("--base", default=None, help="a toy base file (default: the shipped one)")
    p.add_argument("--sabotage", default=None, choices=SABOTAGES, help="break training on purpose")
    p.add_argument("--workers", type=int, default=None,
                   help="processes sharing the rows (default: one per CPU core); the result does not depend on it")
    p.add_argument("--rows", nargs="*", default=list(ROWS), choices=sorted({*ROWS, "lora_prior"}))
    a = p.parse_args(argv)
    result = run(a.samples, a.base, a.sabotage, tuple(a.rows), a.workers)
    print(json.dumps(result, indent=1))
    problems = missed(result)
    for line in problems:
        print("MISSED " + line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
