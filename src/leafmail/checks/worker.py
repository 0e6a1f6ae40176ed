"""A check pool worker process: runs one bounded check at a time (``python -m``).

It reads requests (`wire`) from stdin and answers on stdout. Before each job it sets
RLIMIT_CPU to the CPU it has used plus the job's budget, so a job that runs away is
killed by the kernel (SIGXCPU, then SIGKILL at the hard limit) even if the parent
were slow to notice; the parent also kills it at its wall-clock limit. Either way
the parent sees the process end, answers the check with a temporary error and starts
a fresh worker. Jobs take plain data only: the message octets and JSON arguments.
"""

from __future__ import annotations

import ipaddress
import math
import resource
import sys
from collections.abc import Callable
from typing import Any, BinaryIO

from netserver.smtp.addresses import Mailbox
from netserver.smtp.parameters import Body, MailParameters

from ..config import DnsConfig
from ..dns import make_sync_resolver
from . import CheckContext
from .auth import forged_results
from .dkim import verify_dkim
from .received import chain_problems
from .rfc5322 import problems
from .spf import evaluate_spf
from .wire import decode, encode, frame, read_part

Job = Callable[[dict[str, Any], bytes], dict[str, Any]]
# Address space of a worker: ample for a 25 MiB message parsed several times over, and
# a bound on what a hostile one can make it allocate (MemoryError: a temporary result,
# after which the worker ends and is replaced).
MEMORY_LIMIT = 2 << 30


def _resolver(args: dict[str, Any]) -> Any:
    dns = args["dns"]
    return make_sync_resolver(
        DnsConfig(nameservers=tuple(dns["nameservers"]), port=dns["port"], timeout=dns["timeout"])
    )


def rfc5322_job(args: dict[str, Any], data: bytes) -> dict[str, Any]:
    body = args.get("body")
    params = MailParameters(body=Body(body) if body else None, smtputf8=bool(args["smtputf8"]))
    return {"problems": problems(data, params)}


def dkim_job(args: dict[str, Any], data: bytes) -> dict[str, Any]:
    results = ["dkim=none"]
    if args["verify"]:
        results = verify_dkim(data, _resolver(args), float(args["dns"]["timeout"]))
    forged = forged_results(data, args["authserv_id"])
    return {"results": results, "forged": [f.decode("latin-1") for f in forged]}


def spf_job(args: dict[str, Any], data: bytes) -> dict[str, Any]:
    sender = args["sender"]
    ip = args["ip"]
    session = CheckContext(
        ipaddress.ip_address(ip) if ip else None,
        helo=args["helo"],
        sender=Mailbox(sender[0], sender[1]) if sender else None,
    )
    found = evaluate_spf(_resolver(args), session, float(args["dns"]["timeout"]))
    return {"spf": [found.result, found.ptype, found.identity] if found else None}


def received_job(args: dict[str, Any], data: bytes) -> dict[str, Any]:
    return {"problems": chain_problems(data, str(args["hostname"]))}


def allocate_job(args: dict[str, Any], data: bytes) -> dict[str, Any]:
    """Asks for more memory than a worker may have: how the tests prove the bound."""
    return {"allocated": len(bytearray(int(args["octets"])))}


def busy_job(args: dict[str, Any], data: bytes) -> dict[str, Any]:
    """Burns CPU until killed: how the tests prove the budget holds."""
    while True:
        pass


JOBS: dict[str, Job] = {
    "rfc5322": rfc5322_job,
    "dkim": dkim_job,
    "spf": spf_job,
    "received": received_job,
    "busy": busy_job,
    "allocate": allocate_job,
}


def _limit_cpu(seconds: float) -> None:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    soft = math.ceil(usage.ru_utime + usage.ru_stime + seconds)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, soft + 1))


def main(stdin: BinaryIO, stdout: BinaryIO) -> int:
    """Answer jobs from `stdin` on `stdout` until the input ends (see leafmail.checks.pool)."""
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    stdout.write(frame(encode({"ready": True})))  # imports done: budgets start now
    stdout.flush()
    while True:
        head = read_part(stdin)
        data = read_part(stdin) if head is not None else None
        if head is None or data is None:
            return 0
        request = decode(head)
        _limit_cpu(float(request["cpu"]))
        exhausted = False
        try:
            reply = JOBS[request["job"]](request.get("args", {}), data)
        except MemoryError:
            reply = {"error": "MemoryError: over the memory budget", "retire": True}
            exhausted = True
        except Exception as exc:  # a library bug: the check treats it as temporary
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        stdout.write(frame(encode(reply)))
        stdout.flush()
        if exhausted:
            # The heap a hostile message grew stays fragmented near the limit, so the
            # next message would fail too: end here, and the pool starts a fresh worker.
            return 0


if __name__ == "__main__":
    sys.exit(main(sys.stdin.buffer, sys.stdout.buffer))
