"""Drive a test program in a subprocess: wait for the lines it prints, send it signals."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

PROGRAMS = Path(__file__).resolve().parent
ROOT = PROGRAMS.parent.parent


class Child:
    """A test program running in a subprocess, its output read line by line as it comes."""

    def __init__(self, program: str, *args: str, python_options: tuple[str, ...] = ()) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-u", *python_options, str(PROGRAMS / program), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._lines: queue.Queue[str] = queue.Queue()
        assert self.process.stdout is not None
        assert self.process.stderr is not None
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, self.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, self.stderr, False), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    def _read(self, stream: IO[str], into: list[str], announce: bool) -> None:
        for line in stream:
            into.append(line)
            if announce:
                self._lines.put(line)

    def expect(self, text: str, timeout: float = 10.0) -> float:
        """Wait for a stdout line containing ``text``; returns the monotonic time it arrived."""
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            try:
                line = self._lines.get(timeout=max(0.0, left))
            except queue.Empty:
                self.kill()
                raise AssertionError(
                    f"no line with {text!r} within {timeout}s; stdout:\n{''.join(self.stdout)}\n"
                    f"stderr:\n{''.join(self.stderr)}"
                ) from None
            if text in line:
                return time.monotonic()

    def send(self, signum: int) -> None:
        os.kill(self.process.pid, signum)

    def write(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text)
        self.process.stdin.flush()

    def wait(self, timeout: float) -> int:
        """Wait for the exit (killing the child if it overruns); returns the exit status."""
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(
                f"the child did not exit within {timeout}s; stdout:\n{''.join(self.stdout)}\n"
                f"stderr:\n{''.join(self.stderr)}"
            ) from None
        for reader in self._readers:
            reader.join(5)
        return status

    @property
    def output(self) -> str:
        return "".join(self.stdout)

    @property
    def errors(self) -> str:
        return "".join(self.stderr)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)
