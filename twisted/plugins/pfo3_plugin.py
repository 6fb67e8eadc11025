"""
The C{twistd pfo3} and C{twistd pfo3-worker} plugins: pointers into
L{pfo3.tap} and L{pfo3.amqp.tap}.
"""

from twisted.application.service import ServiceMaker

pfo3 = ServiceMaker(
    "pfo3",
    "pfo3.tap",
    "pfo3 task server: JSON-lines tasks over TCP, TLS, UNIX or PROXY endpoints.",
    "pfo3",
)

pfo3_worker = ServiceMaker(
    "pfo3-worker",
    "pfo3.amqp.tap",
    "pfo3 worker: runs the tasks pfo3 orchestrators publish to RabbitMQ.",
    "pfo3-worker",
)
