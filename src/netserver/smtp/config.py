"""What an SMTP server offers and the limits it enforces: the engine's configuration.

A `ServerConfig` is built once per listener by the program that runs the engine and
handed to each `netserver.smtp.protocol.ServerProtocol`; it is checked when it is made,
so a session never meets a bad limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from .readers import BareNewline

__all__ = ["ServerConfig"]


@dataclass(frozen=True)
class ServerConfig:
    """What the server offers and the limits it enforces."""

    hostname: str
    max_message_size: int = 35 * 1024 * 1024
    max_recipients: int = 100  # RFC 5321 4.5.3.1.8: at least 100 must be accepted
    max_errors: int = 20  # 0 = unlimited
    max_junk_commands: int = 100  # NOOP/RSET/VRFY/HELP before they count as errors; 0 = unlimited
    # RCPTs refused with 5xx in a session before 421 (a directory harvest); 0 = unlimited
    max_refused_recipients: int = 0
    # RCPTs answered 452 past max_recipients in one transaction before each further one
    # counts as an error (Postfix's smtpd_recipient_overshoot_limit); 0 = never counts
    max_recipient_overshoot: int = 1000
    tls_available: bool = False
    auth_enabled: bool = False
    auth_plaintext_allowed: bool = False  # offer AUTH without TLS (tests, loopback)
    bare_newline: BareNewline = BareNewline.REJECT
    command_timeout: float = 300.0  # RFC 5321 4.5.3.2.7: at least 5 minutes
    data_timeout: float = 300.0

    def __post_init__(self) -> None:
        if not self.hostname or not self.hostname.isprintable() or " " in self.hostname:
            raise ValueError(f"bad hostname: {self.hostname!r}")
        if self.max_message_size < 1:
            raise ValueError("max_message_size must be positive")
        if self.max_recipients < 1:
            raise ValueError("max_recipients must be at least 1")
        counts = (
            self.max_errors,
            self.max_junk_commands,
            self.max_refused_recipients,
            self.max_recipient_overshoot,
        )
        if min(counts) < 0:
            raise ValueError(
                "max_errors, max_junk_commands, max_refused_recipients and"
                " max_recipient_overshoot must not be negative"
            )
        if self.command_timeout <= 0 or self.data_timeout <= 0:
            raise ValueError("timeouts must be positive")
