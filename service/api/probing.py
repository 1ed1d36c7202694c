"""Probing uploads in child processes: a demuxer or decoder that crashes or hangs on a hostile file takes
down a disposable child, never the API process that serves everyone else.

Each child probes one upload at a time, so a crash is charged to the upload that caused it alone. The
children fork from a forkserver that has the probing code imported already: starting one costs
milliseconds, and a killed one is replaced on the next request.
"""

from __future__ import annotations

import logging
import multiprocessing
import threading
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path

from service.api.inspection import inspect_upload
from service.problems import ProblemError
from service.schemas import InputKind, MediaSummary
from service.settings import Settings

log = logging.getLogger(__name__)

CONTEXT = multiprocessing.get_context("forkserver")
PROCESS_NAME = "mmaudio-probe"


# The messages over a child's pipe (pickled): one ProbeRequest in, one reply out.
@dataclass(frozen=True)
class ProbeRequest:
    path: Path
    kind: InputKind


@dataclass(frozen=True)
class ProbeSummary:
    """The upload is usable."""

    summary: MediaSummary


@dataclass(frozen=True)
class ProbeProblem:
    """The upload is unusable: the problem the API answers with."""

    slug: str
    detail: str | None


@dataclass(frozen=True)
class ProbeFailure:
    """Probing itself failed (a bug, not the file's fault)."""

    error: str


ProbeReply = ProbeSummary | ProbeProblem | ProbeFailure


def serve_probes(connection: Connection, settings: Settings) -> None:
    """A child's loop: a ProbeRequest in, a ProbeReply out; until the pipe closes."""
    while True:
        try:
            request: ProbeRequest = connection.recv()
        except EOFError:
            return
        reply: ProbeReply
        try:
            reply = ProbeSummary(inspect_upload(request.path, request.kind, settings))
        except ProblemError as err:
            reply = ProbeProblem(err.problem.slug, err.detail)
        except Exception as err:  # the API answers 500, as it would in-process
            reply = ProbeFailure(f"{type(err).__name__}: {err}")
        connection.send(reply)


class Prober:
    """One child process and the pipe to it."""

    def __init__(self, settings: Settings) -> None:
        self.connection, child_end = CONTEXT.Pipe()
        self.process = CONTEXT.Process(target=serve_probes, args=(child_end, settings), name=PROCESS_NAME, daemon=True)
        self.process.start()
        child_end.close()

    def probe(self, path: Path, kind: InputKind, timeout: float) -> ProbeReply:
        """The child's reply; TimeoutError when it takes longer than ``timeout``, EOFError when it died."""
        self.connection.send(ProbeRequest(path, kind))
        if not self.connection.poll(timeout):
            raise TimeoutError
        return self.connection.recv()

    def stop(self) -> None:
        self.connection.close()
        if self.process.is_alive():
            self.process.kill()
        self.process.join(timeout=5)


class ProbePool:
    """At most `probe_processes` children probing at once; further requests wait for one to be free."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._slots = threading.BoundedSemaphore(settings.probe_processes)
        self._idle: list[Prober] = []
        self._lock = threading.Lock()
        CONTEXT.set_forkserver_preload([__name__])

    def start(self) -> None:
        """Start the children now, so that the first upload does not wait for them."""
        probers = [Prober(self.settings) for _ in range(self.settings.probe_processes)]
        with self._lock:
            self._idle += probers

    def inspect(self, path: Path, kind: InputKind) -> MediaSummary:
        """What inspection.inspect_upload says of the file (ProblemError when unusable), from a child."""
        timeout = self.settings.probe_timeout_seconds
        with self._slots:
            prober = self._take()
            try:
                reply = prober.probe(path, kind, timeout)
            except TimeoutError:
                prober.stop()
                raise ProblemError("media-timeout", f"reading the upload took longer than {timeout:g} s") from None
            except (EOFError, OSError):
                log.warning("a probe process died on %s (exit code %s)", path.name, prober.process.exitcode)
                prober.stop()
                raise ProblemError("unreadable-media", "the media decoder crashed on this file") from None
            with self._lock:
                self._idle.append(prober)
        if isinstance(reply, ProbeSummary):
            return reply.summary
        if isinstance(reply, ProbeProblem):
            raise ProblemError(reply.slug, reply.detail)
        raise RuntimeError(f"probing failed: {reply.error}")

    def _take(self) -> Prober:
        """An idle child still alive (one killed from outside is replaced), or a new one."""
        while True:
            with self._lock:
                prober = self._idle.pop() if self._idle else None
            if prober is None:
                return Prober(self.settings)
            if prober.process.is_alive():
                return prober
            prober.stop()

    def close(self) -> None:
        with self._lock:
            probers, self._idle = self._idle, []
        for prober in probers:
            prober.stop()
