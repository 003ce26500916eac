"""`comfyui-dreambooth run --num-processes N`: start N copies of a command under torch's launcher and supervise them.

Why not simply hand the job to torchrun: Ctrl-C. In a terminal every process would get the terminal's SIGINT and
then the launcher's copy of it (the second press of our Ctrl-C contract: abort, no checkpoint), and the launcher
kills processes that have not stopped within its shutdown timeout. Here the launcher and the processes run in
sessions of their own (torch's launcher starts the processes so), the terminal's signals reach only this command,
and it passes each Ctrl-C on exactly once:

- every process registers its pid in a folder (`SUPERVISOR_ENV`) once it handles Ctrl-C itself; when all have,
  a press goes to each of them: the first makes the training loop stop on every process at the same step
  (rank 0 writes the checkpoint), the second aborts;
- before that (start-up: nothing to save), the first press ends the launcher, which ends them (SIGTERM: a
  process still importing ends without a traceback), and reaches every process that registers later; a later
  press kills what is left;
- SIGTERM / SIGHUP to this command: as the first Ctrl-C while training (a checkpoint); during start-up, or a
  second one, they go to the launcher (it stops the processes); however this command ends, the launcher does not
  outlive it;
- the launcher is torch's, run by a short script (LAUNCHER) that ends without a traceback or a ChildFailedError
  report when it is stopped or a process fails (the process printed its own message).

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


# torch's launcher (torch.distributed.run) as a script that ends quietly: a stop (a signal, Ctrl-C) or a failed
# process ends it with an exit code and no traceback or ChildFailedError report (the process printed its own
# message); its own log lines are left out (this command says what happens in one line; its real failures raise)
LAUNCHER = """
import logging, sys
try:
    from torch.distributed.run import parse_args, run
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.run", "torch.distributed.launcher")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    try:
        run(parse_args(sys.argv[1:]))
    except ChildFailedError as e:
        sys.exit(max(1, e.get_first_failure()[1].exitcode))
    except SignalException as e:
        sys.exit(128 + int(e.sigval))
except KeyboardInterrupt:
    sys.exit(130)
"""


def launch_processes(command: list[str], processes: int, package: str) -> int:
    """Run `python -m package *command` in `processes` processes on this machine; the exit code to report."""
    launcher = [sys.executable, "-c", LAUNCHER, "--standalone", "--nnodes", "1",
                "--nproc_per_node", str(processes), "-m", package, *command]
    with tempfile.TemporaryDirectory(prefix="comfyui-dreambooth-processes-") as registry:
        env = {**os.environ, SUPERVISOR_ENV: registry}
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(GRACEFUL_STOP_SECONDS))
        posix = os.name == "posix"
        signals: list = []
        # the handlers come first: the launcher must not inherit an ignored SIGINT (a command started with `&`
        # from a script ignores it), or the press passed on during its start-up would be dropped
        handled = _catch_signals(signals) if posix else {}
        try:
            proc = subprocess.Popen(launcher, env=env, start_new_session=posix)
            try:
                code, pressed = _supervise(proc, registry, processes, signals) if posix else _wait(proc)
            finally:
                _end(proc)
        finally:
            for sig, previous in handled.items():
                signal.signal(sig, previous)
        stopped = os.path.exists(os.path.join(registry, STOPPED_TOGETHER))
    return EXIT_INTERRUPTED if stopped or (pressed and code != 0) else code


def _catch_signals(signals: list) -> dict:
    """SIGINT, SIGTERM and SIGHUP to this command are queued in `signals` (handled in the supervising loop, never
    mid-handling); returns the previous handlers."""
    handled = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    for sig in handled:
        signal.signal(sig, lambda signum, frame: signals.append(signum))
    return handled


def _wait(proc) -> tuple[int, bool]:
    pressed = False
    while True:
        try:
            return proc.wait(), pressed
        except KeyboardInterrupt:        # the console gave every process its own Ctrl-C
            pressed = True


def _supervise(proc, registry: str, processes: int, signals: list) -> tuple[int, bool]:
    """Pass each signal on (see the module's docstring); (the launcher's exit code, whether a stop was asked).
    A stop asked during start-up is also passed to every process that registers later: the launcher can miss it
    (a signal between its fork and exec is lost), a process that handles Ctrl-C cannot."""
    presses, terms, launcher_told = 0, 0, False
    told: set = set()                         # processes that got the stop already
    while True:
        try:
            return proc.wait(timeout=POLL_SECONDS), presses + terms > 0
        except subprocess.TimeoutExpired:
            pass
        if presses + terms:
            for pid in registered_pids(registry):
                if pid not in told:
                    told.add(pid)
                    _send(pid, signal.SIGINT)
        while signals:
            sig = signals.pop(0)
            pids = registered_pids(registry)
            training = len(pids) == processes
            if sig != signal.SIGINT:                 # terminate / hang-up: a checkpoint when training, as Ctrl-C
                terms += 1
                if terms == 1 and training:
                    _say("terminate requested: training stops at the next step on every process and process 0 "
                         "saves a checkpoint (a second terminate ends them now)")
                    told.update(pids)
                    for pid in pids:
                        _send(pid, signal.SIGINT)
                else:
                    if terms == 1:
                        _say("terminate requested during start-up: ending the processes (nothing to save yet)")
                    _send(proc.pid, signal.SIGTERM)  # the launcher stops the processes
                continue
            presses += 1
            if presses == 1:
                _say("interrupt requested: training stops at the next step on every process and process 0 saves a "
                     "checkpoint (press Ctrl-C again to abort now)" if training else
                     "interrupt requested during start-up: ending the processes (nothing to save yet; press Ctrl-C "
                     "again to kill them now)")
            if training:
                told.update(pids)
                for pid in pids:
                    _send(pid, signal.SIGINT)
            elif not launcher_told:               # start-up: the launcher ends them (SIGTERM: a process still
                launcher_told = True              # importing ends without a KeyboardInterrupt traceback)
                _send(proc.pid, signal.SIGTERM)
            else:
                for pid in pids:
                    _send(pid, signal.SIGKILL)
                proc.kill()


def _say(line: str) -> None:
    print("\n" + line, file=sys.stderr, flush=True)


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
