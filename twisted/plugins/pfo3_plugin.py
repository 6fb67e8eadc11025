"""
The C{twistd pfo3} plugin: a pointer into L{pfo3.tap}.
"""

from twisted.application.service import ServiceMaker

pfo3 = ServiceMaker(
    "pfo3",
    "pfo3.tap",
    "pfo3 task server: JSON-lines tasks over TCP, TLS, UNIX or PROXY endpoints.",
    "pfo3",
)
