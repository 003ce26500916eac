"""`comfyui-dreambooth run --num-processes N`: start N copies of a command under torch's launcher and supervise them.

Why not simply hand the job to torchrun: Ctrl-C. In a terminal every process would get the terminal's SIGINT and
then the launcher's copy of it (the second press of our Ctrl-C contract: abort, no checkpoint), and the launcher
kills processes that have not stopped within its shutdown timeout. Here the launcher and the processes run in
sessions of their own (torch's launcher starts the processes so), the terminal's signals reach only this command,
and it passes each Ctrl-C on exactly once:

- every process registers its pid in a folder (`SUPERVISOR_ENV`) once it handles Ctrl-C itself; when all have,
  a press goes to each of them: the first makes the training loop stop on every process at the same step
  (rank 0 writes the checkpoint), the second aborts;
- before that (start-up: nothing to save), the first press goes to the launcher, which passes it on and ends
  them; a later press kills what is left;
- SIGTERM / SIGHUP to this command go to the launcher (it stops the processes), and however this command ends,
  the launcher does not outlive it.

The exit code is 130 (interrupted) when the processes stopped together or a press was made, else the launcher's.
POSIX only; elsewhere the console delivers Ctrl-C to every process itself and this command just waits.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

from ..training.distributed import STOPPED_TOGETHER, SUPERVISOR_ENV

EXIT_INTERRUPTED = 130
# how long torch's launcher lets the processes finish a stop before it kills them (torch versions that read it)
GRACEFUL_STOP_SECONDS = 900
POLL_SECONDS = 0.2


def launch_processes(command: list[str], processes: int, package: str) -> int:
    """Run `python -m package *command` in `processes` processes on this machine; the exit code to report."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1",
                "--nproc_per_node", str(processes), "-m", package, *command]
    with tempfile.TemporaryDirectory(prefix="comfyui-dreambooth-processes-") as registry:
        env = {**os.environ, SUPERVISOR_ENV: registry}
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(GRACEFUL_STOP_SECONDS))
        posix = os.name == "posix"
        proc = subprocess.Popen(launcher, env=env, start_new_session=posix)
        try:
            code, pressed = _supervise(proc, registry, processes) if posix else _wait(proc)
        finally:
            _end(proc)
        stopped = os.path.exists(os.path.join(registry, STOPPED_TOGETHER))
    return EXIT_INTERRUPTED if stopped or (pressed and code != 0) else code


def _wait(proc) -> tuple[int, bool]:
    pressed = False
    while True:
        try:
            return proc.wait(), pressed
        except KeyboardInterrupt:        # the console gave every process its own Ctrl-C
            pressed = True


def _supervise(proc, registry: str, processes: int) -> tuple[int, bool]:
    signals = []                         # received by this command, handled in the loop (never mid-handling)
    handled = {signal.SIGINT: signal.getsignal(signal.SIGINT), signal.SIGTERM: signal.getsignal(signal.SIGTERM),
               signal.SIGHUP: signal.getsignal(signal.SIGHUP)}
    for sig in handled:
        signal.signal(sig, lambda signum, frame: signals.append(signum))
    presses, launcher_told = 0, False
    try:
        while True:
            try:
                return proc.wait(timeout=POLL_SECONDS), presses > 0
            except subprocess.TimeoutExpired:
                pass
            while signals:
                sig = signals.pop(0)
                if sig != signal.SIGINT:             # terminate / hang-up: the launcher stops the processes
                    _send(proc.pid, signal.SIGTERM)
                    continue
                presses += 1
                if presses == 1:
                    print("\ninterrupt requested: training stops at the next step on every process and process 0 "
                          "saves a checkpoint (press Ctrl-C again to abort now)", file=sys.stderr, flush=True)
                pids = registered_pids(registry)
                if len(pids) == processes:
                    for pid in pids:
                        _send(pid, signal.SIGINT)
                elif not launcher_told:               # start-up: the launcher passes it on and ends them
                    launcher_told = True
                    _send(proc.pid, signal.SIGINT)
                else:
                    for pid in pids:
                        _send(pid, signal.SIGKILL)
                    proc.kill()
    finally:
        for sig, previous in handled.items():
            signal.signal(sig, previous)


def _end(proc) -> None:
    """The launcher does not outlive this command (its processes would run on, out of reach)."""
    if proc.poll() is not None:
        return
    _send(proc.pid, signal.SIGTERM)
    deadline = time.time() + 60
    while proc.poll() is None and time.time() < deadline:
        time.sleep(POLL_SECONDS)
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def _send(pid: int, sig) -> None:
    try:
        os.kill(pid, sig)
    except OSError:                      # already gone
        pass


def registered_pids(registry: str) -> list[int]:
    pids = []
    for name in sorted(os.listdir(registry)) if os.path.isdir(registry) else []:
        if not name.endswith(".pid"):
            continue
        try:
            with open(os.path.join(registry, name), encoding="ascii") as f:
                pids.append(int(f.read().strip()))
        except (OSError, ValueError):
            continue
    return pids
