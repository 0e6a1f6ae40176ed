"""Addresses from the command line and from -t's headers: RFC 5322 address lists
read into addr-specs, then checked as SMTP paths.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from netserver.smtp import RemoteProtocolError
from netserver.smtp.addresses import parse_forward_path, parse_reverse_path

from .context import Identity
from .errors import BadInput

_TOKEN = re.compile(r'[^\s()<>\[\]:;@,"]+')


def address_list(text: str) -> list[str]:
    """The addr-specs of an RFC 5322 address list, as written (quotes kept).

    Display names, comments and group names are dropped; ``Name <a@b>``, ``a@b (Name)``,
    ``list: a@b, c@d;`` and ``undisclosed-recipients:;`` all work. Anything that is not
    clearly an address list raises BadInput: a recipient is never guessed.
    """
    items: list[list[str]] = [[]]
    angle = in_group = False
    for part in _tokens(text):
        if part == "<":
            angle = True
        elif part == ">":
            angle = False
        if angle or part not in (",", ";", ":"):
            items[-1].append(part)
        elif part == ",":
            items.append([])
        elif part == ";":
            if not in_group:  # "a@b;c@d" is not a list: guessing could add a recipient
                raise BadInput(f"bad address {text!r}: ';' outside a group")
            in_group = False
            items.append([])
        else:
            if in_group or any(t in ("@", "<", ">") for t in items[-1]):
                # "a@b\nBcc: c@d" must not become c@d: only a phrase names a group
                raise BadInput(f"bad address {text!r}: ':' after an address")
            in_group = True
            items[-1] = []  # a group name: what follows are its members
    if angle:
        raise BadInput(f"bad address {text!r}: missing '>'")
    return [_addr_spec(item, text) for item in items if any(t != " " for t in item)]


def _tokens(text: str) -> list[str]:
    """Words, quoted strings, domain literals and specials; a space is the token " "."""
    tokens: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace() or char == "(":
            i = _skip_comment(text, i) if char == "(" else i + 1
            if tokens and tokens[-1] != " ":
                tokens.append(" ")
            continue
        end = _token_end(text, i)
        tokens.append(text[i:end])
        i = end
    return tokens


def _token_end(text: str, i: int) -> int:
    char = text[i]
    if char == '"':
        j = i + 1
        while j < len(text) and text[j] != '"':
            j += 2 if text[j] == "\\" else 1
        if j >= len(text):
            raise BadInput(f"bad address {text!r}: unclosed quote")
        return j + 1
    if char == "[":
        j = text.find("]", i)
        if j < 0:
            raise BadInput(f"bad address {text!r}: unclosed '['")
        return j + 1
    match = _TOKEN.match(text, i)
    return match.end() if match else i + 1


def _skip_comment(text: str, i: int) -> int:
    """Index after the (possibly nested) comment opening at `i`."""
    depth = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 1
        elif char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise BadInput(f"bad address {text!r}: unclosed comment")


def _addr_spec(item: list[str], text: str) -> str:
    """The address of one list item: what is inside <>, else the whole item."""
    if "<" in item:
        start = item.index("<")
        end = item.index(">", start) if ">" in item[start:] else len(item)
        if any(t != " " for t in item[end + 1 :]):
            raise BadInput(f"bad address {text!r}: text after '>'")
        item = item[start + 1 : end]
    for i in range(len(item) - 2):
        if item[i + 1] == " " and _is_word(item[i]) and _is_word(item[i + 2]):
            raise BadInput(f"bad address {text!r}: a space inside an address")
    spec = "".join(t for t in item if t != " ")
    if spec.startswith("@") and ":" in spec:  # obsolete source route: <@a,@b:user@c>
        spec = spec.split(":", 1)[1]
    return spec


def _is_word(token: str) -> bool:
    return token not in (" ", "@", "<", ">", ":", ";", ",") and token[:1] != "."


def mailbox(address: str, hostname: str, *, role: str = "recipient") -> str:
    """`address` checked as an SMTP path, with ``@hostname`` added to a bare local name."""
    if not _has_domain(address):
        address = f"{address}@{hostname}"
    path, utf8 = f"<{address}>", not address.isascii()
    try:
        if role == "recipient":
            return str(parse_forward_path(path, utf8=utf8))
        return str(parse_reverse_path(path, utf8=utf8))
    except RemoteProtocolError as exc:
        raise BadInput(f"bad {role} address {address!r}: {exc.reply.lines[0]}") from None


def _has_domain(address: str) -> bool:
    """True if an unquoted "@" follows the local part."""
    if address.startswith('"'):
        end = _token_end(address, 0) if address.count('"') > 1 else len(address)
        return "@" in address[end:]
    return "@" in address


def sender_address(given: str | None, identity: Identity, hostname: str) -> str:
    """The envelope sender: -f/-r ("" for ``<>``), else LOGIN@HOSTNAME."""
    if given is None:
        return mailbox(identity.login, hostname, role="sender")
    found = address_list(given.strip() or "<>")
    if len(found) > 1:
        raise BadInput(f"bad sender address {given!r}: one address, please")
    if not found or not found[0]:
        return ""
    return mailbox(found[0], hostname, role="sender")


def recipients_from(texts: Iterable[str], hostname: str) -> list[str]:
    """Every address in these address lists, checked, each once, in order."""
    found: list[str] = []
    for text in texts:
        for spec in address_list(text):
            if not spec:
                raise BadInput(f"bad recipient address {text!r}: empty")
            address = mailbox(spec, hostname)
            if address not in found:
                found.append(address)
    return found
