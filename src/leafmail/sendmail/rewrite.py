"""The address headers of a local submission, completed as Postfix's cleanup does.

Programs that call sendmail often write bare names (``To: root``, ``From: cron``). The
envelope gets ``@origin`` added; so do the address headers (From, Sender, Reply-To,
To, Cc, Resent-*, ...), as Postfix's append_at_myorigin does for local submissions,
or a reader would see ``root`` and reply to nowhere. Masquerading (Postfix's
masquerade_domains, dma's and nullmailer's most asked-for feature) then turns
``user@host.example.org`` into ``user@example.org``: the first listed domain that the
address's domain is a subdomain of wins.

Only the addr-specs change: display names, comments, groups and folding stay as the
user wrote them. A header that is not clearly an address list is left alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .addresses import address_spans, has_domain, masquerade
from .errors import BadInput
from .headers import Draft, Field

ADDRESS_HEADERS = frozenset(
    {
        "from",
        "sender",
        "reply-to",
        "to",
        "cc",
        "bcc",
        "resent-from",
        "resent-sender",
        "resent-reply-to",
        "resent-to",
        "resent-cc",
        "resent-bcc",
        "return-receipt-to",
        "errors-to",
        "disposition-notification-to",
        "mail-followup-to",
        "mail-reply-to",
        "apparently-to",
    }
)


def complete_address(spec: str, origin: str, domains: Sequence[str]) -> str:
    """A header's addr-spec with ``@origin`` added to a bare name, then masqueraded."""
    qualified = spec if has_domain(spec) else f"{spec}@{origin}"
    return masquerade(qualified, domains)


def rewrite_headers(message: Draft, origin: str, domains: Sequence[str]) -> None:
    """Qualify and masquerade the addresses of every address header, in place."""
    for field in message.fields:
        if field.name in ADDRESS_HEADERS:
            rewrite_field(field, lambda spec: complete_address(spec, origin, domains))


def rewrite_field(field: Field, change: Callable[[str], str]) -> None:
    """Apply `change` to each addr-spec of the field, keeping the rest of its text and
    its physical lines; an address folded across two lines is left as it is."""
    try:
        texts = [line.decode("utf-8") for line in field.lines]
    except UnicodeDecodeError:
        return
    head, _, first = texts[0].partition(":")
    parts = [first, *texts[1:]]
    starts = [sum(len(p) for p in parts[:i]) for i in range(len(parts))]
    try:
        spans = address_spans("".join(parts))
    except BadInput:
        return
    for start, end in reversed(spans):
        i = max(n for n, at in enumerate(starts) if at <= start)
        a, b = start - starts[i], end - starts[i]
        if b <= len(parts[i]):
            parts[i] = parts[i][:a] + change(parts[i][a:b]) + parts[i][b:]
    field.lines = [f"{head}:{parts[0]}".encode(), *(p.encode() for p in parts[1:])]
