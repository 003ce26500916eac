"""The diffusers reference of bench/run.py's part c: which diffusers examples/dreambooth scripts are used (a folder,
or extracted from a diffusers git directory at a ref), where they came from, and their command line for the same
work as ours (workload.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys

from workload import CACHE, LEARNING_RATE, LORA_RANK, MAX_GRAD_NORM, PROMPT, SEED

DIFFUSERS_SCRIPTS = {"lora": "train_dreambooth_lora.py", "full": "train_dreambooth.py"}


def diffusers_scripts(folder: str | None) -> tuple[dict | None, str | None]:
    """({mode: script path}, None), or (None, the note to print) when the comparison has to be skipped."""
    if not folder:
        return None, ("diffusers comparison skipped: no --diffusers-examples DIR (a checkout of diffusers' "
                      "examples/dreambooth) or --diffusers-git GIT_DIR given")
    if not os.path.isdir(folder):
        return None, f"diffusers comparison skipped: --diffusers-examples {folder}: no such folder"
    paths = {mode: os.path.join(os.path.abspath(folder), name) for mode, name in DIFFUSERS_SCRIPTS.items()}
    missing = [os.path.basename(p) for p in paths.values() if not os.path.isfile(p)]
    if missing:
        return None, f"diffusers comparison skipped: {folder} has no {', '.join(missing)}"
    return paths, None


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def diffusers_source(folder: str, ref: str | None = None) -> dict:
    """Which diffusers scripts these are: the given ref, else the folder's git commit, else its SOURCE file."""
    info = {"dir": os.path.abspath(folder)}
    if ref:
        info["ref"] = ref
    source = os.path.join(folder, "SOURCE")              # written by --diffusers-git
    if not ref and os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            info.update(json.load(f))
    elif not ref:      # a diffusers clone: only when DIR is its examples/dreambooth (not some enclosing repo)
        proc = subprocess.run(["git", "-C", folder, "rev-parse", "--show-prefix", "HEAD"], capture_output=True,
                              text=True)
        lines = proc.stdout.split()
        if proc.returncode == 0 and len(lines) == 2 and lines[0].rstrip("/").endswith("examples/dreambooth"):
            info["commit"] = lines[1]
    info.setdefault("ref", info.get("commit", "unknown"))
    info["sha256"] = {name: _sha256(os.path.join(folder, name)) for name in DIFFUSERS_SCRIPTS.values()
                      if os.path.isfile(os.path.join(folder, name))}
    return info


def nearest_tag(tags: list[str], installed: str) -> str | None:
    """v<installed> when tagged, else the newest release tag not newer than it, else the newest release tag."""
    from packaging.version import InvalidVersion, Version

    releases = []
    for tag in tags:
        try:
            v = Version(tag.lstrip("v"))
        except InvalidVersion:
            continue
        if not v.is_prerelease and not v.is_devrelease:
            releases.append((v, tag))
    if not releases:
        return None
    releases.sort()
    target = Version(installed)
    older = [tag for v, tag in releases if v <= target]
    return older[-1] if older else releases[-1][1]


def extract_diffusers_examples(git_dir: str, ref: str | None = None, dest_root: str = CACHE) -> str:
    """`git show REF:examples/dreambooth/<script>` from a diffusers git directory into the git-ignored cache."""
    import diffusers

    def git(*args):
        proc = subprocess.run(["git", f"--git-dir={git_dir}", *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"git {' '.join(args)} in {git_dir} failed: {proc.stderr.strip()}")
        return proc.stdout

    if not os.path.isdir(os.path.join(git_dir, "objects")):
        dot_git = os.path.join(git_dir, ".git")
        git_dir = dot_git if os.path.isdir(dot_git) else git_dir
    ref = ref or nearest_tag(git("tag", "--list", "v*").split(), diffusers.__version__) or "HEAD"
    commit = git("rev-parse", f"{ref}^{{commit}}").strip()
    folder = os.path.join(dest_root, f"diffusers-{re.sub(r'[^A-Za-z0-9._-]', '_', ref)}", "examples", "dreambooth")
    os.makedirs(folder, exist_ok=True)
    for name in DIFFUSERS_SCRIPTS.values():
        with open(os.path.join(folder, name), "w", encoding="utf-8") as f:
            f.write(git("show", f"{commit}:examples/dreambooth/{name}"))
    with open(os.path.join(folder, "SOURCE"), "w", encoding="utf-8") as f:
        json.dump({"ref": ref, "commit": commit, "installed_diffusers": diffusers.__version__}, f)
    return folder


def diffusers_command(script: str, mode: str, inputs: dict, resolution: int, steps: int, out: str) -> list[str]:
    cmd = [sys.executable, script, "--pretrained_model_name_or_path", inputs["model_dir"],
           "--instance_data_dir", inputs["images"], "--instance_prompt", PROMPT, "--output_dir", out,
           "--resolution", str(resolution), "--train_batch_size", "1", "--max_train_steps", str(steps),
           "--learning_rate", str(LEARNING_RATE[mode]), "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
           "--max_grad_norm", str(MAX_GRAD_NORM), "--mixed_precision", "no", "--seed", str(SEED),
           "--checkpointing_steps", str(steps + 1)]
    if mode == "lora":
        cmd += ["--rank", str(LORA_RANK)]
    return cmd


def tqdm_elapsed(text: str, steps: int) -> float | None:
    """Seconds of the last `steps/steps [mm:ss<...` tqdm bar in a log: the diffusers scripts' training loop."""
    found = re.findall(rf"\b{steps}/{steps} \[(?:(\d+):)?(\d+):(\d+)<", text)
    if not found:
        return None
    hours, minutes, seconds = found[-1]
    return 3600 * int(hours or 0) + 60 * int(minutes) + int(seconds)
