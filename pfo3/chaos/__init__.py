"""
The robustness suite: attacks on a real pfo3 that count what comes back.

C{python -m pfo3.chaos fuzz} sends mutated and random lines to a real
C{twistd -n pfo3} over TCP, TLS and a C{haproxy:} (PROXY protocol)
endpoint, then checks that the server is unharmed (it answers at once, its
memory and file descriptors are back near where they started, its log holds
no traceback).  C{python -m pfo3.chaos soak} runs mixed load with faults
injected on a schedule and checks a ledger: every task accepted is answered
or recorded as failed with a code, none lost, none answered twice.
C{docs/reliability.md} describes the promises these check and the figures
of the last run.
"""
