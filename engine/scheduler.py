"""Which requests run: a bounded FIFO of waiting requests, the running set that shares every decode
step, and at most one request being prefilled (its prefill interleaves with the running decode steps).

Submitting threads add; only the engine thread takes, moves and removes.
"""
from __future__ import annotations

import threading
from collections import deque

from .sequence import Sequence


class QueueFull(RuntimeError):
    pass


class Scheduler:
    def __init__(self, max_num_seqs: int, max_queue: int, host_budget: int, cache=None, reuses=None):
        self.max_num_seqs, self.max_queue = max_num_seqs, max_queue
        self.host_budget = host_budget  # bytes the running requests' CPU stores and the cache may take together
        self.cache = cache  # the document cache (DocCache): its entries count too, and unused ones make room
        self.reuses = reuses  # reuses(seq): the cache entry seq would reuse (kept when making room for it)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.prefilling: Sequence | None = None
        self._cv = threading.Condition()

    def add(self, seq: Sequence):
        with self._cv:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"the request queue is full ({self.max_queue} waiting)")
            self.waiting.append(seq)
            self._cv.notify()

    def next_prefill(self) -> Sequence | None:
        """The next waiting request, if none is being prefilled and the running set has room for it: a
        free place and, beside the running requests' host memory and the document cache's, its own
        (unused cache entries are evicted for it). Until it has, it waits, and so do the requests behind
        it (first come, first served)."""
        with self._cv:
            if self.prefilling is None and self.waiting and len(self.running) < self.max_num_seqs:
                head = self.waiting[0]
                used = self.requests_bytes() + head.host_bytes
                if self.cache is not None and used + self.cache.held() > self.host_budget:
                    limit = self.host_budget - used
                    keep = self.reuses(head) if self.reuses else None
                    if not self.cache.shrink(limit, keep) and keep is not None:
                        self.cache.shrink(limit)  # it does not fit beside its own entry: it will miss instead
                if used + (self.cache.held() if self.cache is not None else 0) <= self.host_budget:
                    self.prefilling = self.waiting.popleft()
                    return self.prefilling
        return None

    def requests_bytes(self) -> int:
        """Host memory the running requests (and the one being prefilled) may take."""
        return sum(s.host_bytes for s in self.running) + (self.prefilling.host_bytes if self.prefilling else 0)

    def prefilled(self, seq: Sequence):
        with self._cv:
            self.prefilling = None
            self.running.append(seq)

    def remove(self, seq: Sequence):
        with self._cv:
            if self.prefilling is seq:
                self.prefilling = None
            elif seq in self.running:
                self.running.remove(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)

    def take_waiting_if(self, pred) -> list[Sequence]:
        """Remove and return the waiting requests for which pred holds (aborted, out of time)."""
        with self._cv:
            out = [s for s in self.waiting if pred(s)]
            for s in out:
                self.waiting.remove(s)
            return out

    def idle(self) -> bool:
        return self.prefilling is None and not self.running and not self.waiting

    def wait_for_work(self, timeout: float):
        with self._cv:
            if self.idle():
                self._cv.wait(timeout)

    def active(self) -> list[Sequence]:
        """The requests holding KV now: running, then the one being prefilled."""
        with self._cv:
            return self.running + ([self.prefilling] if self.prefilling is not None else [])

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running) + (self.prefilling is not None)
