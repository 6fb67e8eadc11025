"""
The queues and exchanges of the distributed mode, and their arguments.

With the default prefix C{pfo3}:

  - C{pfo3.tareas}: the task queue every orchestrator publishes to and every
    worker consumes from.  A durable quorum queue (replicated, survives a
    broker restart) of persistent messages, with an explicit delivery limit
    (RabbitMQ 3.10 has no default): a message delivered that many times
    without an ack (its worker died each time) is dead-lettered instead of
    being redelivered forever.  Its length is bounded; past it the broker
    refuses new tasks (C{reject-publish}), which the orchestrator answers
    with C{ocupado}.
  - C{pfo3.muertas}: the fanout exchange and quorum queue of dead-lettered
    tasks.  Workers consume it and answer each task's client with an error.
  - C{pfo3.cancelaciones}: a fanout exchange.  An orchestrator that gives up
    on a task (timeout, client gone) publishes its correlation id there;
    each worker binds a private queue to it and drops that task if it holds
    or later receives it.
  - C{pfo3.respuestas.NAME}: one reply queue per orchestrator, durable and
    not exclusive, so that it outlives a reconnection and a broker restart
    (replies sent meanwhile wait in it, and a worker that is back before
    the orchestrator does not find it missing); it expires once unused for
    a while.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict

#: Header naming why a message was dead-lettered (RabbitMQ sets it).
DEATH_REASON = "x-first-death-reason"


@dataclass(frozen=True)
class Topology:
    """
    The names and arguments of the distributed mode's queues and exchanges.

    @ivar prefix: Starts every name, so several pfo3 clusters (or test runs)
        can share a broker.
    @ivar delivery_limit: Deliveries of a task without an ack before it is
        dead-lettered (RabbitMQ counts redeliveries: the limit is the number
        of times it may come back).
    @ivar max_backlog: Messages the task queue may hold (each one task or a
        batch of tasks, C{pfo3.amqp.batches}).
    @ivar reply_expiry: Seconds an unused reply queue lives.
    """

    prefix: str = "pfo3"
    delivery_limit: int = 3
    max_backlog: int = 100_000
    reply_expiry: float = 300.0

    @property
    def tasks(self) -> str:
        return f"{self.prefix}.tareas"

    @property
    def dead(self) -> str:
        return f"{self.prefix}.muertas"

    @property
    def cancellations(self) -> str:
        return f"{self.prefix}.cancelaciones"

    def replies(self, name: str) -> str:
        """
        @return: The reply queue of the orchestrator called C{name}.
        """
        return f"{self.prefix}.respuestas.{name}"

    def task_queue_arguments(self) -> Dict[str, Any]:
        return {
            "x-queue-type": "quorum",
            "x-delivery-limit": self.delivery_limit,
            "x-dead-letter-exchange": self.dead,
            "x-max-length": self.max_backlog,
            "x-overflow": "reject-publish",
        }

    def reply_queue_arguments(self) -> Dict[str, Any]:
        return {"x-expires": int(self.reply_expiry * 1000)}

    def all_names(self, reply_names: Any = ()) -> Dict[str, str]:
        """
        @return: Every queue and exchange name, by kind (for clean-up).
        """
        names = {"tasks": self.tasks, "dead": self.dead, "cancellations": self.cancellations}
        for n in reply_names:
            names[f"replies:{n}"] = self.replies(n)
        return names
