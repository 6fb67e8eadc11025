"""
The Celery side of C{benchmarks/distributed.py}: one trivial task, the same
work as pfo3's C{uppercase}, on the same RabbitMQ.

Configured from the environment so that each benchmark run has its own
names on the broker, and tuned for speed as far as the comparison allows:

  - C{rpc://} result backend: results travel as messages to one reply queue
    per client (no result store, no queue per task);
  - C{task_acks_late}: a task is acknowledged once it ran, as pfo3 does;
  - the prefetch multiplier from C{PFO3_CELERY_PREFETCH} (the benchmark
    tries a few);
  - no events, no remote control, no gossip/mingle/heartbeat (the worker is
    started with C{--without-gossip --without-mingle --without-heartbeat}),
    no rate limits, no "started" state, transient results;
  - the task queue is Celery's default kind (a classic durable queue,
    persistent messages) and publishes are not confirmed: weaker guarantees
    than pfo3's quorum queue with publisher confirms, and cheaper.

    PFO3_CELERY_BROKER=amqp://... PFO3_CELERY_PREFIX=bench1 \\
        celery -A celery_app worker --pool threads -c 8
"""

from __future__ import annotations

import os

from celery import Celery

BROKER = os.environ.get("PFO3_CELERY_BROKER", "amqp://guest:guest@127.0.0.1:5672/%2F")
PREFIX = os.environ.get("PFO3_CELERY_PREFIX", "pfo3celery")

app = Celery("pfo3bench", broker=BROKER, backend="rpc://")
app.conf.update(
    task_default_queue=f"{PREFIX}.celery",
    task_default_exchange=f"{PREFIX}.celery",
    task_default_routing_key=f"{PREFIX}.celery",
    # Anything Celery might declare for events or control carries the prefix
    # too, so the benchmark can delete it.
    event_exchange=f"{PREFIX}.ev",
    control_exchange=f"{PREFIX}.ctl",
    task_acks_late=True,
    worker_prefetch_multiplier=int(os.environ.get("PFO3_CELERY_PREFETCH", "4")),
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    result_persistent=False,
    # The reply queues expire if a client dies without deleting them.
    result_expires=300,
    task_track_started=False,
    task_send_sent_event=False,
    worker_send_task_events=False,
    worker_enable_remote_control=False,
    worker_disable_rate_limits=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
    broker_heartbeat=0,
)


@app.task(name="pfo3bench.upper")
def upper(text: str) -> str:
    """
    The trivial task: pfo3's C{uppercase}.
    """
    return text.upper()
