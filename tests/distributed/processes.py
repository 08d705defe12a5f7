"""Launching ``torchrun`` from a test so that a hang fails the test instead of wedging the suite.

torchrun starts every worker in a session of its own, so killing torchrun (or its process group)
leaves workers behind: :func:`kill_tree` kills every descendant, found through ``/proc``.
:class:`Launched` runs a command, collects its output (stdout and stderr together) line by line, and
lets a test wait for a line before it acts (sends a signal); every wait has a limit, a hang guard.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(entry))
    return tree


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it."""
    tree, todo, found = _children(), [pid], []
    while todo:
        p = todo.pop()
        found.append(p)
        todo.extend(tree.get(p, []))
    for p in found:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class Launched:
    """``cmd`` running in the background; ``lines`` is its output so far."""

    def __init__(self, cmd: list, env: dict):
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, limit: float = 180.0) -> str:
        """The first output line holding ``text`` (waiting for it); fails after ``limit`` seconds."""
        end = time.monotonic() + limit
        with self._changed:
            while True:
                for line in self.lines:
                    if text in line:
                        return line
                left = end - time.monotonic()
                if left <= 0 or not self._reader.is_alive():
                    self.kill()
                    raise AssertionError(f"no line with {text!r} within {limit} s; the output:\n{self.output[-4000:]}")
                self._changed.wait(min(left, 1.0))

    def finish(self, limit: float = 180.0) -> int:
        """The exit status; after ``limit`` seconds every process is killed and the test fails (a hang)."""
        try:
            code = self.proc.wait(limit)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {limit} s (hung); the output:\n{self.output[-4000:]}") from None
        self._reader.join(30)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            kill_tree(self.proc.pid)
        self.proc.wait(30)

    def __enter__(self) -> "Launched":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()  # whatever happened, nothing is left running


def run(cmd: list, env: dict, limit: float = 300.0) -> tuple[int, str]:
    """Run ``cmd`` to its end: (exit status, output); a hang fails after ``limit`` seconds."""
    with Launched(cmd, env) as launched:
        return launched.finish(limit), launched.output
