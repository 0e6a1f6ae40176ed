"""Local delivery: what the aliases file says to do with each recipient, and the results.

For each recipient the local part is looked up (lower-case, ``+extension`` dropped) in
the aliases (`leafmail.aliases`), and every target it expands to gets one copy:

- a user's mailbox, at the path template of ``[local]`` ({user}, {home} from passwd):
  a Maildir (`leafmail.delivery.maildir`) or an mbox (`leafmail.delivery.mbox`);
- ``/path/file``: appended as an mbox, with the same locks;
- ``|command``: run as an argument list (never a shell), the message on stdin
  (`leafmail.delivery.pipe`);
- ``user@elsewhere``: forwarded, by committing a new message to the spool. Once the
  commit returns the copy is durable, so the recipient counts as delivered.

Mailbox copies start with ``Return-Path`` and ``Delivered-To`` (the recipient address)
and have LF line ends; a forwarded copy starts with ``Delivered-To``, and a message that
already carries a Delivered-To for its recipient is a forwarding loop (5.4.6), as in
Postfix.

Who writes (the model is Postfix's local(8); the rules are `leafmail.delivery.local_rights`):
every mailbox write, file append, command and include read happens in a child process
that has first become the user it is for (`leafmail.delivery.asuser`), so the kernel
decides what may be created or read:

- a user's mailbox: as that account (uid, gid, supplementary groups). In a shared spool
  directory (a path template whose directory has no {user}/{home}), a group-writable
  directory such as Debian's /var/mail (root:mail 2775) lends its group, as Postfix
  does; unlike Postfix, nothing is ever created as root and given away. root's own
  mailbox is written as root, as Postfix does (alias root away, as its docs advise);
- a name in ``[local] users`` without a system account (a virtual mailbox): as
  ``[local] virtual_user`` (default "leafmail"; a name or "uid:gid"; never root),
  Postfix's virtual_uid_maps;
- a command or file: as the owner of the aliases or include file that names it, and as
  ``[local] default_user`` ("nobody", Postfix's default_privs; never root) when root
  owns it;
- an ``:include:`` file: see `leafmail.aliases`.

When we are not root nothing is switched and everything happens as the current user.

Results: unknown users fail (5.1.1). Anything that can be fixed on this host (disk
full, permissions, a held lock, a broken aliases file, a missing command) defers, so no
mail is lost to a local mistake. When an alias has several targets, one copy each is
made; a deferral of one of them defers the recipient, and each target's result is
recorded (`leafmail.delivery.Expansions`, kept in the status by `leafmail.expansion`),
so the retry gives only the targets that have none yet their copy.
"""

from __future__ import annotations

import asyncio
import errno
import os
import pwd
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial

from netserver.errors import ConfigError
from netserver.privileges import Identity
from netserver.smtp.addresses import parse_forward_path
from netserver.smtp.replies import RemoteProtocolError

from ..aliases import (
    CommandTarget,
    FileTarget,
    IncludeFile,
    Problem,
    RemoteTarget,
    Target,
    UserTarget,
    lookup_name,
    read_include,
)
from ..config import LocalConfig
from ..directory import POSTMASTER, Directory, account, valid_user
from ..envelope import Envelope, Recipient
from ..expansion import UnrecordedExpansions
from ..spool import Spool
from ..trace import header_section
from . import Expansions, Handoff, Outcome, Result, each_settled
from .asuser import Payload, StepError, run_as, run_as_blocking
from .local_common import (
    Copy,
    MailboxLocked,
    UnsafeMailbox,
    clean,
    delivered,
    header_value,
    identity_of,
    unix_text,
)
from .local_rights import (
    UserMailbox,
    default_identity,
    mailbox_writer,
    shared_directory,
    virtual_identity,
)
from .maildir import write_maildir
from .mbox import LockPolicy, append_mbox, mbox_entry
from .pipe import command_env, run_command

__all__ = [
    "Copy",
    "LocalAgent",
    "LockPolicy",
    "append_mbox",
    "mbox_entry",
]

_DELIVERED_TO = re.compile(rb"^delivered-to:[ \t]*([^\r\n]*)", re.IGNORECASE | re.MULTILINE)

CHILDREN = 8  # delivery children at once per message (a long alias list waits its turn)
INCLUDE_TIMEOUT = 30.0  # seconds to read one :include: file (a hung NFS server)
FILE_GRACE = 60.0  # seconds a mailbox write may take beyond waiting for its locks


# --- who is here ----------------------------------------------------------------------


def local_part(address: str) -> str:
    """The local part of a forward path, unquoted (``postmaster`` has no domain)."""
    try:
        return parse_forward_path(f"<{address}>", utf8=True).local_unquoted
    except RemoteProtocolError:
        return address.rpartition("@")[0] or address


def delivered_to(data: bytes) -> frozenset[str]:
    """The addresses in the message's Delivered-To headers, lower-case, for loop checks."""
    found = _DELIVERED_TO.findall(header_section(data))
    return frozenset(v.decode("utf-8", "replace").strip().strip("<>").lower() for v in found)


# --- results ------------------------------------------------------------------------


def from_problem(problem: Problem) -> Result:
    text = clean(problem.text)
    if problem.status.startswith("4"):
        return Result.deferred(problem.status, text)
    return Result.failed(problem.status, text)


def trouble(exc: Exception, where: str) -> Result:
    """A delivery that raised: deferred, with an RFC 3463 status that says why."""
    if isinstance(exc, MailboxLocked | UnsafeMailbox):
        return Result.deferred("4.2.0", clean(f"{where}: {exc}"))
    if isinstance(exc, ConfigError):
        return Result.deferred("4.3.5", clean(f"{where}: {exc}"))
    if isinstance(exc, TimeoutError):
        return Result.deferred("4.3.0", clean(f"{where}: took too long"))
    if isinstance(exc, OSError):
        status = {errno.ENOSPC: "4.3.1", errno.EDQUOT: "4.2.2"}.get(exc.errno or 0, "4.3.0")
        why = exc.strerror or str(exc)
        if isinstance(exc.filename, str) and exc.filename not in why:
            why = f"{exc.filename}: {why}"
        return Result.deferred(status, clean(f"{where}: {why}"))
    return Result.deferred("4.3.0", clean(f"{where}: {type(exc).__name__}: {exc}"))


def combine(address: str, results: list[Result]) -> Result:
    """One result for a recipient whose alias made several copies."""
    if len(results) == 1:
        return results[0]
    if not results:
        return Result.failed("5.1.1", clean(f"{address}: the alias has no targets"))
    deferred = [r for r in results if r.outcome is Outcome.DEFERRED]
    failed = [r for r in results if r.outcome is Outcome.FAILED]
    total = len(results)
    if deferred:
        first = deferred[0]
        text = f"{len(deferred)} of {total} copies deferred: {first.text}"
        return Result(Outcome.DEFERRED, first.code, first.status, clean(text))
    if failed:
        first = failed[0]
        text = f"{total - len(failed)} of {total} copies delivered; {first.text}"
        return Result(Outcome.FAILED, first.code, first.status, clean(text))
    return delivered(f"delivered {total} copies")


def target_key(target: Target) -> str:
    """A stable name for a target, under which its result is recorded between attempts."""
    if isinstance(target, UserTarget):
        return f"user:{target.name}"
    if isinstance(target, FileTarget):
        return f"file:{target.path}"
    if isinstance(target, CommandTarget):
        return "command:" + " ".join(target.argv)
    return f"forward:{target.address}"


def describe(target: Target) -> str:
    if isinstance(target, UserTarget):
        return f"mailbox of {target.name}"
    if isinstance(target, FileTarget):
        return f"file {target.path}"
    if isinstance(target, CommandTarget):
        return f"command {target.argv[0]}"
    return f"forward to {target.address}"


# --- the agent ----------------------------------------------------------------------


class LocalAgent:
    """Delivers to this host's mailboxes, files, commands, and forwards by re-spooling.

    The entry point of the local delivery process: `deliver` (the `Agent` contract).
    As root it switches to each recipient per delivery step; otherwise it writes as
    the current user. Alias expansion runs in a worker thread, never on the loop.
    """

    def __init__(
        self,
        local: LocalConfig,
        local_domains: tuple[str, ...],
        spool: Spool,
        *,
        locks: LockPolicy | None = None,
        default_user: str | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.local = local
        self.spool = spool
        self.directory = Directory(local, local_domains, self.read_include)
        self.locks = locks or LockPolicy()
        self.default_user = default_user or local.default_user
        self.notify = notify  # told the queue id of each forwarded copy (QueueRunner.notify)
        self.virtual: Identity | None = None
        if os.geteuid() == 0 and any(account(u) is None for u in self.directory.users):
            self.virtual = virtual_identity(local.virtual_user)  # 78 at start-up

    async def deliver(
        self,
        envelope: Envelope,
        data: bytes,
        rcpts: Sequence[int],
        expansions: Expansions | None = None,
    ) -> dict[int, Result]:
        """One result per recipient; a mailbox two recipients share gets one copy.

        `expansions` holds what each alias target got in earlier attempts; without it
        (an agent used on its own) forwarded copies are simply spooled.
        """
        memo = _Memo({}, asyncio.Semaphore(CHILDREN))
        loops = delivered_to(data)
        known = expansions or UnrecordedExpansions(self.spool, self.notify)
        parts = [
            self._keyed(i, self._recipient(envelope, data, i, loops, memo, known)) for i in rcpts
        ]
        return await each_settled(parts, expansions)

    @staticmethod
    async def _keyed(index: int, result: Awaitable[Result]) -> dict[int, Result]:
        return {index: await result}

    async def close(self) -> None:
        """Nothing is kept open between messages."""

    async def _recipient(
        self,
        envelope: Envelope,
        data: bytes,
        index: int,
        loops: frozenset[str],
        memo: _Memo,
        known: Expansions,
    ) -> Result:
        address = envelope.recipients[index].address
        if address.lower() in loops:
            return Result.failed("5.4.6", clean(f"mail forwarding loop for {address}"))
        try:
            name = lookup_name(local_part(address))
            expansion = await asyncio.to_thread(self.directory.expand, name)
        except ConfigError as exc:
            return Result.deferred("4.3.5", clean(str(exc)))
        copy = Copy(envelope.sender, address, data)
        known.expanding(index, [target_key(t) for t in expansion.targets])
        done: list[Result] = []
        waits: list[Awaitable[Result]] = []
        remote: list[RemoteTarget] = []
        for target in expansion.targets:
            earlier = known.result(index, target_key(target))
            if earlier is not None:
                done.append(earlier)  # this target got it (or failed) in an earlier attempt
            elif isinstance(target, RemoteTarget):
                remote.append(target)
            else:
                waits.append(self._recorded(known, index, target, self._once(memo, target, copy)))
        if remote:
            waits.append(self._forward(envelope, index, data, remote, known))
        results = done + list(await asyncio.gather(*waits))
        return combine(address, results + [from_problem(p) for p in expansion.problems])

    @staticmethod
    async def _recorded(
        known: Expansions, index: int, target: Target, delivery: Awaitable[Result]
    ) -> Result:
        result = await delivery
        known.record(index, target_key(target), result)
        return result

    def _once(self, memo: _Memo, target: Target, copy: Copy) -> asyncio.Task[Result]:
        task = memo.tasks.get(target)
        if task is None:
            task = asyncio.ensure_future(self._guarded(target, copy, memo.children))
            memo.tasks[target] = task
        return task

    async def _guarded(self, target: Target, copy: Copy, children: asyncio.Semaphore) -> Result:
        """Deliver to one target; whatever goes wrong defers it rather than lose the mail."""
        async with children:
            return await self._target(target, copy)

    async def _target(self, target: Target, copy: Copy) -> Result:
        try:
            if isinstance(target, UserTarget):
                return await self._to_mailbox(target.name, copy)
            if isinstance(target, FileTarget):
                return await self._to_file(target, copy)
            if isinstance(target, CommandTarget):
                return await self._to_command(target, copy)
            raise TypeError(f"not a local target: {target!r}")
        except Exception as exc:
            return trouble(exc, describe(target))

    # -- mailboxes ----------------------------------------------------------------------
    def mailbox(self, name: str) -> UserMailbox | Result:
        """The mailbox path of user `name` and who writes it, or why there is none."""
        if not valid_user(name):
            return Result.failed("5.1.1", clean(f"no such user: {name}"))
        template = self.local.path_template
        found = account(name)
        if "{home}" in template and found is None and name == POSTMASTER:
            found = account("root")  # postmaster without an account: root's mailbox
        path = template.replace("{user}", name)
        if "{home}" in template:
            if found is None:
                return Result.deferred("4.3.5", f"no home directory for {name}")
            path = path.replace("{home}", found.pw_dir)
        if not os.path.isabs(path):
            return Result.deferred("4.3.5", clean(f"mailbox path {path} is not absolute"))
        path = os.path.normpath(path)
        shared = shared_directory(template, path)
        return UserMailbox(path, *mailbox_writer(found, shared, self._virtual))

    def _virtual(self) -> Identity:
        return self.virtual or virtual_identity(self.local.virtual_user)

    async def _to_mailbox(self, name: str, copy: Copy) -> Result:
        box = self.mailbox(name)
        if isinstance(box, Result):
            return box
        text = unix_text(copy)
        if self.local.mailbox == "maildir":
            step = partial(_maildir_step, box.path, text, box.owner)
        else:
            entry = mbox_entry(copy, time.time())
            step = partial(_mbox_step, box.path, entry, box.owner, self.locks)
        await run_as(box.writer, step, timeout=self.locks.timeout + FILE_GRACE)
        return delivered(f"delivered to the {self.local.mailbox} of {name}")

    # -- what the aliases name ------------------------------------------------------
    def runs_as(self, uid: int, gid: int) -> Identity | None:
        """Who a command or file named in a file owned by uid runs as (None: as we are)."""
        if os.geteuid() != 0:
            return None
        if uid == 0:
            return default_identity(self.default_user)
        try:
            return identity_of(pwd.getpwuid(uid))
        except KeyError:
            return Identity(str(uid), uid, gid, (gid,), "/")

    def read_include(self, path: str, uid: int, gid: int) -> IncludeFile:
        """An include file read with the rights of (uid, gid), in a child (see aliases).

        Called from the expansion's worker thread, never on the event loop.
        """
        reader = None if uid == 0 else self.runs_as(uid, gid)
        try:
            payload = run_as_blocking(reader, partial(_include_step, path), timeout=INCLUDE_TIMEOUT)
        except StepError as exc:
            raise OSError(errno.EIO, str(exc), path) from None
        return IncludeFile(str(payload["text"]), int(payload["uid"]), int(payload["gid"]))

    async def _to_file(self, target: FileTarget, copy: Copy) -> Result:
        writer = self.runs_as(target.uid, target.gid)
        entry = mbox_entry(copy, time.time())
        step = partial(_mbox_step, target.path, entry, None, self.locks)
        await run_as(writer, step, timeout=self.locks.timeout + FILE_GRACE)
        return delivered(f"appended to {target.path}")

    async def _to_command(self, target: CommandTarget, copy: Copy) -> Result:
        identity = self.runs_as(target.uid, target.gid)
        return await run_command(
            target.argv,
            unix_text(copy),
            identity=identity,
            timeout=self.local.command_timeout,
            env=command_env(copy, identity),
        )

    async def _forward(
        self,
        envelope: Envelope,
        index: int,
        data: bytes,
        targets: list[RemoteTarget],
        known: Expansions,
    ) -> Result:
        """Spool a new message to the remote targets, once (`known.forward` sees to it)."""
        original = envelope.recipients[index]
        orcpt = original.orcpt or (
            f"rfc822;{original.address}" if original.address.isascii() else None
        )
        forward = Envelope(
            sender=envelope.sender,
            recipients=tuple(Recipient(t.address, original.notify, orcpt) for t in targets),
            client=envelope.client,
            received=envelope.received,
            body=envelope.body,
            # A UTF-8 target needs SMTPUTF8 at every hop, whatever the original asked for
            # (RFC 6531 3.2); the sendmail command marks its UTF-8 recipients the same way.
            smtputf8=envelope.smtputf8 or not all(t.address.isascii() for t in targets),
            ret=envelope.ret,
            envid=envelope.envid,
        )
        marked = b"Delivered-To: %s\r\n" % header_value(original.address) + data
        try:
            qid = await known.forward(index, [target_key(t) for t in targets], forward, marked)
        except OSError as exc:
            return trouble(exc, "spooling the forwarded copy")
        names = ", ".join(t.address for t in targets)
        # The copy carries NOTIFY and ORCPT on: its own delivery reports success.
        return replace(delivered(f"forwarded to {names} as {qid}"), handoff=Handoff.PASSED)


@dataclass(frozen=True)
class _Memo:
    """One message's targets: each delivered once, by at most CHILDREN children at once."""

    tasks: dict[Target, asyncio.Task[Result]]
    children: asyncio.Semaphore


# --- the steps (run in the delivery child, as the writer) -------------------------------


def _maildir_step(path: str, message: bytes, owner: int | None) -> Payload:
    return {"name": write_maildir(path, message, owner)}


def _mbox_step(path: str, entry: bytes, owner: int | None, locks: LockPolicy) -> Payload:
    append_mbox(path, entry, owner, locks)
    return {}


def _include_step(path: str) -> Payload:
    found = read_include(path)
    return {"text": found.text, "uid": found.uid, "gid": found.gid}
