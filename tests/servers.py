"""Servers started by end-to-end tests: processes, their logs, and small HTTP calls.

A :class:`Server` is a subprocess whose output goes to a file, so that a failed
test can show its last lines (:meth:`Servers.report`). :func:`wait_for` polls
with a deadline and fails early when a server has exited.
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

STOP_TIMEOUT_S = 10


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (it could be taken before it is used)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """A process started for a test, with its stdout and stderr in ``log``."""

    def __init__(self, name: str, command: Sequence[str], log: Path, **popen: Any) -> None:
        self.name = name
        self.log = log
        with log.open("wb") as output:
            self.process = subprocess.Popen(
                list(command), stdout=output, stderr=subprocess.STDOUT, **popen
            )

    def exited(self) -> bool:
        return self.process.poll() is not None

    def tail(self, chars: int = 3000) -> str:
        """The end of the server's output, headed by its name and exit status."""
        try:
            text = self.log.read_text(errors="replace")
        except OSError as exc:
            text = f"(could not read {self.log}: {exc})"
        status = "running" if self.process.poll() is None else f"exited {self.process.returncode}"
        return f"--- {self.name} ({status}), last output ---\n{text[-chars:]}"

    def stop(self) -> None:
        """Terminate, wait, and kill if it does not stop in time."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)


class Servers:
    """The servers of a test module, for failure reports."""

    def __init__(self) -> None:
        self.started: list[Server] = []

    @contextlib.contextmanager
    def run(self, name: str, command: Sequence[str], log: Path, **popen: Any) -> Iterator[Server]:
        """Start a server, and stop it on the way out, whatever happened."""
        server = Server(name, command, log, **popen)
        self.started.append(server)
        try:
            yield server
        finally:
            server.stop()

    def report(self) -> str:
        """The last output of every server, for an assertion message."""
        return "\n".join(server.tail() for server in self.started)


def wait_for(
    what: str,
    check: Callable[[], T | None],
    timeout: float,
    servers: Servers,
    interval: float = 0.2,
) -> T:
    """Call ``check`` until it returns something other than None, for ``timeout`` seconds.

    Connection errors count as "not yet". Fails at the deadline, or as soon as a
    server has exited, with the servers' output.
    """
    deadline = time.monotonic() + timeout
    last = "nothing yet"
    while True:
        for server in servers.started:
            if server.exited():
                raise AssertionError(f"{server.name} exited waiting for {what}\n{servers.report()}")
        try:
            found = check()
        except (OSError, ValueError) as exc:  # refused, reset, not JSON yet
            found, last = None, f"{type(exc).__name__}: {exc}"
        if found is not None:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s (last: {last})\n{servers.report()}")
        time.sleep(interval)


def request_json(url: str, body: Any = None, timeout: float = 30) -> tuple[int, Any]:
    """GET ``url`` (or POST ``body`` as JSON): the status and the decoded JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.loads(error.read() or b"null")


def get_text(url: str, timeout: float = 10) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text: str = response.read().decode()
        return text


def query_url(base: str, path: str, **params: str) -> str:
    return f"{base}{path}?{urllib.parse.urlencode(params)}" if params else f"{base}{path}"
