"""A deployed ServerApp's Grid that collects replies promptly.

Flower 1.41's HttpGrid (the deployed ServerApp's link to the SuperLink) pulls replies every 3 s, so each stage of
a round ended on average 1.5 s after its last reply: a secure evaluated round is eight stages. This Grid is the
same HttpGrid with its replies pulled every 0.25 s (one loopback request: the ServerApp runs beside its SuperLink).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.proto.node_pb2 import NodeInfo
from flwr.serverapp import Grid
from flwr.supercore.run import Run

PULL_INTERVAL_S = 0.25


class PromptGrid(Grid):
    """`grid` with `send_and_receive` pulling every PULL_INTERVAL_S; everything else is `grid`'s own."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def set_run(self, run: Run) -> None:
        """Flower's."""
        self.grid.set_run(run)

    @property
    def run(self) -> Run:
        """Flower's."""
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """Flower's."""
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        """Flower's."""
        return self.grid.get_node_ids()

    def get_nodes(self) -> Iterable[NodeInfo]:
        """Flower's."""
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Flower's."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Flower's."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push `messages` and pull their replies until all are in or `timeout` s have passed (Flower's contract)."""
        pending = set(self.grid.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        replies: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            received = list(self.grid.pull_messages(pending))
            replies.extend(received)
            pending.difference_update(reply.metadata.reply_to_message_id for reply in received)
            if pending:
                time.sleep(PULL_INTERVAL_S)
        return replies


def prompt_grid(grid: Grid) -> Grid:
    """A deployed ServerApp's HttpGrid wrapped in PromptGrid; the simulation's grid (it pulls every 0.1 s) as is."""
    from flwr.superlink.grid.http_grid import HttpGrid

    return PromptGrid(grid) if isinstance(grid, HttpGrid) else grid
