"""Addresses from the command line and from -t's headers: RFC 5322 address lists
read into addr-specs, then checked as SMTP paths.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from netserver.smtp import RemoteProtocolError
from netserver.smtp.addresses import parse_forward_path, parse_reverse_path

from .context import Submitter
from .errors import BadInput

_TOKEN = re.compile(r'[^\s()<>\[\]:;@,"]+')


def address_list(text: str) -> list[str]:
    """The addr-specs of an RFC 5322 address list, as written (quotes kept).

    Display names, comments and group names are dropped; ``Name <a@b>``, ``a@b (Name)``,
    ``list: a@b, c@d;`` and ``undisclosed-recipients:;`` all work. Anything that is not
    clearly an address list raises BadInput: a recipient is never guessed.
    """
    return [_addr_spec(item, text) for item in _items(text)]


def address_spans(text: str) -> list[tuple[int, int]]:
    """Where each addr-spec of an address list sits in `text`: (start, end) offsets, so
    a header can be rewritten in place (comments, names and folding kept)."""
    address_list(text)  # BadInput unless it is clearly an address list
    spans: list[tuple[int, int]] = []
    for item in _items(text):
        tokens = [(t, at) for t, at in _spec_tokens(item) if t != " "]
        if tokens:
            last, at = tokens[-1]
            spans.append((tokens[0][1], at + len(last)))
    return spans


def _spec_tokens(item: list[tuple[str, int]]) -> list[tuple[str, int]]:
    """The tokens of an item's addr-spec: inside <>, else all; no obsolete source route
    (<@a,@b:user@c>)."""
    words = [t for t, _ in item]
    if "<" in words:
        start = words.index("<")
        end = words.index(">", start) if ">" in words[start:] else len(item)
        item = item[start + 1 : end]
    words = [t for t, _ in item]
    if [w for w in words if w != " "][:1] == ["@"] and ":" in words:
        item = item[words.index(":") + 1 :]
    return item


def _items(text: str) -> list[list[tuple[str, int]]]:
    """The items of an address list: each a list of (token, offset); groups opened."""
    items: list[list[tuple[str, int]]] = [[]]
    angle = in_group = False
    for part, at in _tokens(text):
        if part == "<":
            angle = True
        elif part == ">":
            angle = False
        if angle or part not in (",", ";", ":"):
            items[-1].append((part, at))
        elif part == ",":
            items.append([])
        elif part == ";":
            if not in_group:  # "a@b;c@d" is not a list: guessing could add a recipient
                raise BadInput(f"bad address {text!r}: ';' outside a group")
            in_group = False
            items.append([])
        else:
            if in_group or any(t in ("@", "<", ">") for t, _ in items[-1]):
                # "a@b\nBcc: c@d" must not become c@d: only a phrase names a group
                raise BadInput(f"bad address {text!r}: ':' after an address")
            in_group = True
            items[-1] = []  # a group name: what follows are its members
    if angle:
        raise BadInput(f"bad address {text!r}: missing '>'")
    return [item for item in items if any(t != " " for t, _ in item)]


def _tokens(text: str) -> list[tuple[str, int]]:
    """Words, quoted strings, domain literals and specials, each with its offset; a
    space (or comment) is the token " "."""
    tokens: list[tuple[str, int]] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char.isspace() or char == "(":
            at = i
            i = _skip_comment(text, i) if char == "(" else i + 1
            if tokens and tokens[-1][0] != " ":
                tokens.append((" ", at))
            continue
        end = _token_end(text, i)
        tokens.append((text[i:end], i))
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


def _addr_spec(item: list[tuple[str, int]], text: str) -> str:
    """The address of one list item: what is inside <>, else the whole item."""
    words = [t for t, _ in item]
    if "<" in words:
        end = words.index(">", words.index("<")) if ">" in words else len(words)
        if any(t != " " for t in words[end + 1 :]):
            raise BadInput(f"bad address {text!r}: text after '>'")
    words = [t for t, _ in _spec_tokens(item)]
    for i in range(len(words) - 2):
        if words[i + 1] == " " and _is_word(words[i]) and _is_word(words[i + 2]):
            raise BadInput(f"bad address {text!r}: a space inside an address")
    return "".join(t for t in words if t != " ")


def _is_word(token: str) -> bool:
    return token not in (" ", "@", "<", ">", ":", ";", ",") and token[:1] != "."


def mailbox(address: str, hostname: str, *, role: str = "recipient") -> str:
    """`address` checked as an SMTP path, with ``@hostname`` added to a bare local name."""
    if not has_domain(address):
        address = f"{address}@{hostname}"
    path, utf8 = f"<{address}>", not address.isascii()
    try:
        if role == "recipient":
            return str(parse_forward_path(path, utf8=utf8))
        return str(parse_reverse_path(path, utf8=utf8))
    except RemoteProtocolError as exc:
        raise BadInput(f"bad {role} address {address!r}: {exc.reply.lines[0]}") from None


def has_domain(address: str) -> bool:
    """True if an unquoted "@" follows the local part."""
    if address.startswith('"'):
        end = _token_end(address, 0) if address.count('"') > 1 else len(address)
        return "@" in address[end:]
    return "@" in address


def masquerade(address: str, domains: Sequence[str]) -> str:
    """``user@host.example.org`` as ``user@example.org`` when example.org is listed."""
    local, at, domain = address.rpartition("@")
    if not at or domain.startswith("["):
        return address
    name = domain.lower().rstrip(".")
    for masq in domains:
        if name.endswith("." + masq):
            return f"{local}@{masq}"
    return address


def sender_address(given: str | None, identity: Submitter, hostname: str) -> str:
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
