"""AttendBatcher: attend calls that arrive together on different streams run as one batch (group commit).

A caller that finds the batcher idle runs its own request at once, on its own thread: a lone stream
pays no hand-off. Calls that arrive while a batch runs wait; when it ends, the first of them leads
the next batch, which takes every waiting request. The server merges the requests of a batch that
can share one store call (kvcache.service.server), so several engines attending at once cost about one
call's host time instead of one each, where a Python server's calls would otherwise queue on the GIL.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


class _Waiting:
    __slots__ = ("done", "error", "lead", "request", "response")

    def __init__(self, request: Any) -> None:
        self.request = request
        self.response: Any = None
        self.error: BaseException | None = None
        self.done = False
        self.lead = False


class AttendBatcher:
    """Runs `run_batch(requests) -> responses` (one response per request, in order) over requests that
    callers submit concurrently, at most `max_batch` per batch."""

    def __init__(self, run_batch: Callable[[list[Any]], list[Any]], max_batch: int = 64) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._run = run_batch
        self._max = max_batch
        self._cond = threading.Condition()
        self._queue: list[_Waiting] = []
        self._busy = False
        self.batches = 0  # batches run, and the requests in them: their ratio is the mean batch size
        self.requests = 0
        self.merged_calls = 0  # store calls that served several requests (counted by run_batch's owner)
        self.merged_requests = 0

    def counts(self) -> dict[str, int]:
        """requests, batches, merged_calls, merged_requests since start."""
        with self._cond:
            return {"requests": self.requests, "batches": self.batches, "merged_calls": self.merged_calls,
                    "merged_requests": self.merged_requests}

    def submit(self, request: Any) -> Any:
        """The response to `request`, from a batch this caller leads or another caller's; the batch's exception
        if it raised."""
        me = _Waiting(request)
        with self._cond:
            self._queue.append(me)
            if self._busy:
                self._cond.wait_for(lambda: me.done or me.lead)
            if not me.done:  # idle, or handed the lead: this caller runs the next batch
                self._busy = True
                batch, self._queue = self._queue[: self._max], self._queue[self._max :]
                self.batches += 1
                self.requests += len(batch)
        if not me.done:
            self._run_and_hand_on(batch)
        if me.error is not None:
            raise me.error
        return me.response

    def _run_and_hand_on(self, batch: list[_Waiting]) -> None:
        try:
            responses = self._run([w.request for w in batch])
            if len(responses) != len(batch):
                raise RuntimeError(f"run_batch answered {len(responses)} of {len(batch)} requests")
            error = None
        except BaseException as exc:  # noqa: BLE001 -- re-raised in every caller of the batch; the next batch runs
            responses, error = [None] * len(batch), exc
        with self._cond:
            for waiting, response in zip(batch, responses):
                waiting.response, waiting.error, waiting.done = response, error, True
            if self._queue:
                self._queue[0].lead = True
            else:
                self._busy = False
            self._cond.notify_all()
