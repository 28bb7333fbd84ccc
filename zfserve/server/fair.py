"""Self-clocked fair queuing, counted in work (images, pixels, jobs): the order in which the batcher takes
requests' parts and the bounded pools start their jobs, so that one client's large requests cannot starve
another's small ones.

A job's tag is its virtual finish time: its client's previous tag, or the virtual time now if that is later,
plus its work; the smallest tag goes first, and the virtual time is the tag of the job last served. Each
client's jobs keep their order; clients with work waiting share in proportion to work; a client that brings a
small job while others have queued large ones is served next. A client is a connection (gRPC's peer, or the
HTTP client's address and port).
"""

from __future__ import annotations

FORGET_ABOVE = 256     # clients remembered before those with nothing ahead of the virtual time are forgotten


class FairOrder:
    def __init__(self):
        self.vtime = 0.0
        self._finish: dict[str, float] = {}

    def tag(self, client: str, work: float) -> float:
        """The tag of a job of ``work`` from ``client`` arriving now."""
        tag = max(self.vtime, self._finish.get(client, 0.0)) + work
        self._finish[client] = tag
        return tag

    def served(self, tag: float) -> None:
        """The job of ``tag`` is being served: the virtual time moves on to it."""
        self.vtime = max(self.vtime, tag)
        if len(self._finish) > FORGET_ABOVE:   # a client whose tags are all behind is like a new one
            self._finish = {client: t for client, t in self._finish.items() if t > self.vtime}


__all__ = ["FairOrder"]
