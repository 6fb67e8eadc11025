"""
The distributed mode: orchestrators and C{pfo3-worker} processes that meet
on RabbitMQ.

  - L{pfo3.amqp.messages}: what travels (JSON, never pickles), pure.
  - L{pfo3.amqp.topology}: the queues and exchanges, and their arguments.
  - L{pfo3.amqp.connection}: a connection to the broker that comes back by
    itself (C{ClientService} with backoff) and declares the topology each
    time.
  - L{pfo3.amqp.executor}: L{AMQPExecutor}, the orchestrator's
    L{pfo3.executor.IExecutor} that publishes tasks and awaits their replies.
  - L{pfo3.amqp.worker}: the worker's service, which consumes tasks and runs
    them with the very same L{pfo3.executor.LocalExecutor} as local mode.

pika's Twisted adapter is the AMQP client; only L{pfo3.amqp.connection} and
the two users of its channels know it (C{docs/distributed.md}).
"""
