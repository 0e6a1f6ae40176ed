"""Parse listen addresses and open listening sockets.

Accepted forms (``--listen``):

* ``127.0.0.1:7000``, ``[::1]:7000`` -- one address; port 0 picks a free port, which
  `Listener.endpoint` then reports (tests rely on this instead of guessing ports);
* ``:7000`` or ``*:7000`` -- every interface, IPv6 and IPv4 on one dual-stack socket
  (falls back to IPv4 where the kernel has no IPv6);
* ``localhost:7000`` -- a name, bound on every address it resolves to;
* ``unix:/run/x.sock`` or a path starting with ``/`` or ``./`` -- a unix stream socket;
* ``fd:3`` -- an already listening descriptor; ``systemd`` -- all of ``$LISTEN_FDS``;
  ``systemd:NAME`` -- only those whose ``$LISTEN_FDNAMES`` entry is NAME (a socket
  unit's ``FileDescriptorName=``), so one process can tell several services' sockets apart.

Every socket is non-inheritable (close-on-exec), so a command run per connection never
holds a listener open.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import socket
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field

from ..endpoint import Endpoint
from ..errors import ConfigError, UnavailableError, UsageError

SD_LISTEN_FDS_START = 3
DEFAULT_BACKLOG = 1024


@dataclass(frozen=True)
class ListenSpec:
    """A parsed ``--listen`` value; `kind` is ``tcp``, ``unix``, ``fd`` or ``systemd``."""

    text: str
    kind: str
    host: str = ""
    port: int = 0
    path: str = ""
    fd: int = -1
    name: str = ""


@dataclass
class Listener:
    """A bound, listening socket and the endpoint it actually got.

    `family` and `local` are worked out once, for the accept path: `local` is the local
    end of every connection it accepts when that is known without asking the kernel (a
    socket we bound ourselves to a unix path or to an IP that is not a wildcard), None
    when each connection must be asked (``getsockname``) which address the client
    reached: a wildcard, or a socket handed to us (``fd:``, systemd), which may be
    transparent (IP_TRANSPARENT: any destination, whatever it is bound to).
    """

    sock: socket.socket
    spec: ListenSpec
    endpoint: Endpoint
    family: int = field(init=False)
    local: Endpoint | None = field(init=False)

    def __post_init__(self) -> None:
        self.family = int(self.sock.family)
        ip = self.endpoint.ip
        ours = self.spec.kind in ("tcp", "unix")
        self.local = self.endpoint if ours and (ip is None or not ip.is_unspecified) else None

    def close(self) -> None:
        """Close the socket and remove a unix socket file this process created (once)."""
        if self.sock.fileno() < 0:
            return
        self.sock.close()
        if self.spec.kind == "unix":
            with contextlib.suppress(OSError):
                os.unlink(self.spec.path)


def _parse_port(text: str, spec: str) -> int:
    if not text.isdigit() or int(text) > 65535:
        raise UsageError(f"bad listen address {spec!r}: port must be a number 0-65535")
    return int(text)


def parse_listen(spec: str) -> ListenSpec:
    """Parse one ``--listen`` value; raises UsageError with a one-line reason."""
    text = spec.strip()
    if not text:
        raise UsageError("empty listen address")
    if text.startswith("unix:"):
        return ListenSpec(text, "unix", path=text[5:] or _missing(spec))
    if text.startswith(("/", "./")):
        return ListenSpec(text, "unix", path=text)
    if text == "systemd":
        return ListenSpec(text, "systemd")
    if text.startswith("systemd:"):
        name = text[8:]
        if not name or ":" in name:
            raise UsageError(f"bad listen address {spec!r}: expected systemd:NAME")
        return ListenSpec(text, "systemd", name=name)
    if text.startswith("fd:"):
        fd_text = text[3:]
        if not fd_text.isdigit():
            raise UsageError(f"bad listen address {spec!r}: fd: takes a descriptor number")
        return ListenSpec(text, "fd", fd=int(fd_text))
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise UsageError(f"bad listen address {spec!r}: expected [IPV6]:PORT")
        _check_ip(host, spec)
        return ListenSpec(text, "tcp", host=host, port=_parse_port(rest[1:], spec))
    host, sep, port = text.rpartition(":")
    if not sep:
        raise UsageError(
            f"bad listen address {spec!r}: expected HOST:PORT, [IPV6]:PORT or unix:PATH"
        )
    if ":" in host:
        raise UsageError(f"bad listen address {spec!r}: write IPv6 addresses as [ADDR]:PORT")
    if host in ("", "*"):
        host = ""
    return ListenSpec(text, "tcp", host=host, port=_parse_port(port, spec))


def _missing(spec: str) -> str:
    raise UsageError(f"bad listen address {spec!r}: no path after unix:")


def _check_ip(host: str, spec: str) -> None:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        raise UsageError(f"bad listen address {spec!r}: {host!r} is not an IP address") from None


def open_listeners(specs: list[ListenSpec], backlog: int = DEFAULT_BACKLOG) -> list[Listener]:
    """Bind every spec; on a failure close what was opened and raise (69 or 78)."""
    opened: list[Listener] = []
    try:
        for spec in specs:
            opened.extend(_open(spec, backlog))
    except BaseException:
        for listener in opened:
            listener.close()
        raise
    return opened


def _open(spec: ListenSpec, backlog: int) -> Iterator[Listener]:
    if spec.kind == "tcp":
        yield from _open_tcp(spec, backlog)
    elif spec.kind == "unix":
        yield _open_unix(spec, backlog)
    elif spec.kind == "fd":
        yield _adopt(spec, spec.fd)
    else:
        for fd in systemd_fds(spec.name):
            yield _adopt(spec, fd)


def _finish(sock: socket.socket, spec: ListenSpec) -> Listener:
    sock.setblocking(False)
    sock.set_inheritable(False)
    return Listener(sock, spec, Endpoint.from_sockaddr(sock.family, sock.getsockname()))


def _open_tcp(spec: ListenSpec, backlog: int) -> Iterator[Listener]:
    if spec.host == "":
        yield _finish(_bind_wildcard(spec, backlog), spec)
        return
    try:
        infos = socket.getaddrinfo(
            spec.host, spec.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(f"cannot resolve listen address {spec.text!r}: {exc.strerror}") from None
    seen: set[tuple[int, str]] = set()
    for family, _type, _proto, _name, sockaddr in infos:
        key = (family, str(sockaddr[0]))
        if key in seen:
            continue
        seen.add(key)
        yield _finish(_bind(family, sockaddr, spec, backlog, v6only=True), spec)


def _bind_wildcard(spec: ListenSpec, backlog: int) -> socket.socket:
    if socket.has_ipv6:
        try:
            return _bind(socket.AF_INET6, ("::", spec.port), spec, backlog, v6only=False)
        except UnavailableError:
            pass
    return _bind(socket.AF_INET, ("0.0.0.0", spec.port), spec, backlog, v6only=False)  # noqa: S104


def _bind(
    family: int, sockaddr: tuple[object, ...], spec: ListenSpec, backlog: int, *, v6only: bool
) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
        sock.bind(sockaddr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise UnavailableError(f"cannot listen on {spec.text}: {exc.strerror or exc}") from None
    return sock


def _open_unix(spec: ListenSpec, backlog: int) -> Listener:
    _remove_stale_socket(spec.path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(spec.path)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise UnavailableError(f"cannot listen on {spec.text}: {exc.strerror or exc}") from None
    return _finish(sock, spec)


def _remove_stale_socket(path: str) -> None:
    """Unlink a leftover socket file nobody listens on; refuse to touch anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"cannot listen on unix:{path}: the path exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        return
    except OSError:
        return
    finally:
        probe.close()
    raise UnavailableError(f"cannot listen on unix:{path}: another server is listening there")


def _adopt(spec: ListenSpec, fd: int) -> Listener:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ConfigError(f"cannot use descriptor {fd}: {exc.strerror or exc}") from None
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_ACCEPTCONN
    ):
        sock.detach()
        raise ConfigError(f"descriptor {fd} is not a listening stream socket")
    return _finish(sock, spec)


# The sd_listen_fds(3) hand-over, read once: the variables are removed from the
# environment (children must not adopt them), yet several services may each ask for
# their named descriptors afterwards.
_inherited: list[tuple[int, str]] | None = None


def inherited_fds() -> list[tuple[int, str]]:
    """The descriptors passed by socket activation and their LISTEN_FDNAMES names.

    Empty when $LISTEN_PID names another process (the variables were meant for it).
    A descriptor without a name gets systemd's default, ``unknown``.
    """
    global _inherited
    if _inherited is None:
        _inherited = _read_listen_env()
    return list(_inherited)


def _read_listen_env() -> list[tuple[int, str]]:
    if os.environ.get("LISTEN_PID", str(os.getpid())) != str(os.getpid()):
        return []
    count = os.environ.get("LISTEN_FDS", "0")
    names = os.environ.get("LISTEN_FDNAMES", "")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if not count.isdigit():
        return []
    labels = names.split(":") if names else []
    fds = range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count))
    return [(fd, labels[i] if i < len(labels) else "unknown") for i, fd in enumerate(fds)]


def systemd_fds(name: str = "") -> list[int]:
    """The inherited descriptors named `name` (all of them for ""); ConfigError if none."""
    fds = [fd for fd, label in inherited_fds() if not name or label == name]
    if fds:
        return fds
    if not name:
        raise ConfigError("listen address 'systemd' given, but $LISTEN_FDS names no descriptor")
    known = ", ".join(sorted({label for _fd, label in inherited_fds()})) or "none"
    raise ConfigError(
        f"listen address 'systemd:{name}': no descriptor named {name!r} in "
        f"$LISTEN_FDNAMES (names: {known})"
    )
