"""Sender ownership: a logged-in user may send only as addresses they own.

Postfix's ``smtpd_sender_login_maps`` with ``reject_sender_login_mismatch``: without
it, any user with a password can put anyone's address in MAIL FROM, and the mail
leaves with our reputation (and passes the SPF of every domain we send for).

Who owns what (``[auth] senders``, documented in README):

* a login listed in ``senders`` owns exactly its entries: ``alice@example.org`` is that
  address, ``@example.net`` is any address in that domain;
* a login not listed owns its own name at each local domain (``alice`` ->
  ``alice@<each of relay.local_domains>``), or, when the login is itself an address
  (``alice@example.org``), that address alone;
* the null sender ``<>`` is allowed to everyone, as Postfix allows it: a user's
  vacation program or a mail client's read receipt sends it, and it can carry no
  forged identity.

Comparison ignores case (Postfix lower-cases its lookup keys). Clients that did not
log in are not judged here: relay control and the content checks handle them.
"""

from __future__ import annotations

from collections.abc import Iterable

from netserver.smtp.addresses import Mailbox
from netserver.smtp.replies import Reply

from . import ACCEPT, Check, CheckContext, Reject, Verdict, ascii_line


def _norm_domain(domain: str) -> str:
    return domain.lower().rstrip(".")


class SenderLogins:
    """The sender addresses and domains each login owns."""

    def __init__(self, senders: Iterable[tuple[str, Iterable[str]]], local_domains: Iterable[str]):
        self._listed: dict[str, tuple[frozenset[str], frozenset[str]]] = {}
        for user, entries in senders:
            addresses, domains = set(), set()
            for entry in entries:
                local, _, domain = entry.rpartition("@")
                if local:
                    addresses.add(f"{local.lower()}@{_norm_domain(domain)}")
                else:
                    domains.add(_norm_domain(domain))
            self._listed[user] = (frozenset(addresses), frozenset(domains))
        self._local = frozenset(_norm_domain(d) for d in local_domains)

    def owns(self, user: str, sender: Mailbox) -> bool:
        """True when `user` may use `sender` in MAIL FROM."""
        address = f"{sender.local_unquoted.lower()}@{_norm_domain(sender.domain)}"
        listed = self._listed.get(user)
        if listed is not None:
            addresses, domains = listed
            return address in addresses or _norm_domain(sender.domain) in domains
        if "@" in user:
            local, _, domain = user.rpartition("@")
            return address == f"{local.lower()}@{_norm_domain(domain)}"
        local_part, _, domain = address.rpartition("@")
        return local_part == user.lower() and domain in self._local


def not_owned(user: str) -> Reply:
    return Reply(553, "5.7.1", ascii_line(f"Sender address rejected: not owned by user {user}"))


def sender_login_check(logins: SenderLogins) -> Check:
    """The MAIL-stage check: 553 5.7.1 for a logged-in user's sender they do not own."""

    def check(session: CheckContext) -> Verdict:
        user, sender = session.user, session.sender
        if user is None or sender is None or logins.owns(user, sender):
            return ACCEPT
        return Reject(not_owned(user))

    return check
