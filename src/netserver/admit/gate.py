"""The Gate contract: whether, and how, an accepted connection is served.

A server holds an ordered list of gates (allow/deny rules, hosts_access, names for the
command's environment ...), then its limits gate. For each new connection the server
first asks every gate's `quick(peer, local)`, on the accept path: it must not block,
look anything up or touch the disk, and it allocates nothing when it lets the client
on (it returns the shared `PASS`). It may also refuse (`Refusal`), or return None when
it cannot tell without a lookup or a side effect. The connection is then counted
against the limits, and the gates that said None `judge` it, in their order, in one task
off the accept path: each may pass, refuse, or `Divert` the connection to a mode of its
own (tcpd's ``twist``, a command with ``setenv`` variables).

`start` and `reload` are the gate's life: `start` runs once the event loop does (a gate
returns the modes it diverts to, so the server stops them with its own), `reload` on
SIGHUP (on an error a gate keeps what it had, and logs why).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, final

from ..accepted import Accepted
from ..connlog import ServerLog
from ..endpoint import Endpoint
from ..modes.base import Mode, ModeContext
from ..modes.direct import Judge
from ..refusals import RefusalCause

__all__ = ["LOOKUP_TIMEOUT", "PASS", "Divert", "Gate", "Pass", "Refusal", "Ruling", "quick_judge"]

# The most a gate's `judge` waits for one name lookup (allow/deny by name, hosts_access,
# TCPREMOTEHOST): a lookup that does not finish gives no name, as for tcpd.
LOOKUP_TIMEOUT = 5.0


@final
class Pass:
    """The gate lets the connection on; use the one instance, `PASS` (no allocation)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "PASS"


PASS: Final = Pass()


@dataclass(frozen=True, slots=True)
class Refusal:
    """The gate refuses the connection; `reason` goes to the "refused" log line, `cause`
    chooses the line the client is sent (netserver.refusals: a rule's by default)."""

    reason: str
    cause: RefusalCause = RefusalCause.ACCESS


@dataclass(frozen=True, slots=True)
class Divert:
    """Serve the connection with `start` instead of the server's mode (always as a
    process: with TLS, through a relay)."""

    start: Callable[[Accepted], None]


Ruling = Pass | Refusal | Divert


class Gate(Protocol):
    """One step of admission; see the module docstring for the order of calls."""

    def start(self, ctx: ModeContext, mode: Mode) -> Sequence[Mode]:
        """Serving begins (log what is loaded); returns the modes this gate diverts to."""
        ...

    def reload(self, log: ServerLog) -> None:
        """Re-read the rules (SIGHUP); on an error keep the old ones and log why."""
        ...

    def quick(self, peer: Endpoint, local: Endpoint) -> Pass | Refusal | None:
        """A ruling with no lookup, no disk and no side effect, or None: `judge` decides."""
        ...

    async def judge(self, conn: Accepted) -> Ruling:
        """Decide (lookups bounded in time) and carry out what the ruling needs."""
        ...


def quick_judge(gates: tuple[Gate, ...]) -> Judge:
    """The gates' `quick` rulings as one function, for workers that accept themselves
    (modes.direct): the reason and cause of the first refusal, or None to admit. A gate
    that cannot decide at once refuses: such a server keeps the supervisor's accept path, so this
    never happens, and an undecided connection is never served."""

    def judge(peer: Endpoint, local: Endpoint) -> tuple[str, RefusalCause] | None:
        for gate in gates:
            ruling = gate.quick(peer, local)
            if ruling is None:
                return "access check needs a lookup", RefusalCause.ACCESS
            if isinstance(ruling, Refusal):
                return ruling.reason, ruling.cause
        return None

    return judge
