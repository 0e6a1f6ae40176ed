"""Differential test: our hosts_access decisions against tcpdmatch(8) itself.

A seeded generator writes hosts.allow / hosts.deny pairs over addresses, prefixes,
net/masks (valid and not), IPv6 ``[net]/len``, wildcards, ``.suffix`` patterns,
``ALL``/``LOCAL``/``KNOWN``/``UNKNOWN``/``PARANOID``, ``user@host``, ``daemon@host``,
nested ``EXCEPT``, comments and continuation lines.  Each case runs tcpdmatch in a
directory holding the files (``-d``) and our `check_lines` on the same files, and
compares the verdict, the client/server lines and the rule that matched.

Clients are numeric, so tcpdmatch simulates a failed name lookup (the name is
"unknown") and so do we; servers (``daemon@server``) are addresses no hosts file
names, and tcpdmatch runs in a network namespace with only loopback when one can be
made, so its reverse lookups fail at once.  Debian's tcpdmatch no longer prints which
rule matched (its "matched:" line goes to syslog), so every rule carries a ``banners``
option whose file names the rule: tcpdmatch copies it to stdout when the rule matches.
"""

from __future__ import annotations

import ipaddress
import random
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from netserver.tcpd.access import load_hosts
from netserver.tcpd.check import check_lines
from netserver.tcpd.names import FixedHostNames

TCPDMATCH = shutil.which("tcpdmatch") or (
    "/usr/sbin/tcpdmatch" if Path("/usr/sbin/tcpdmatch").exists() else None
)
pytestmark = pytest.mark.skipif(
    TCPDMATCH is None, reason="tcpdmatch is not installed (Debian package tcpd; .ci/run has it)"
)

SEED = 20260514
CASES = 320

V4 = ["10.0.0.1", "10.0.0.2", "10.1.2.3", "10.200.0.7", "192.168.1.10", "192.168.1.200",
      "172.16.5.4", "127.0.0.1", "8.8.8.8"]  # fmt: skip
V6 = ["::1", "2001:db8::1", "2001:db8:1::5", "2001:db9::1", "fe80::1", "2001:db8::"]
DAEMONS = ["sshd", "in.fingerd", "ftpd"]
SERVERS = ["10.0.0.9", "10.0.0.10", "2001:db8::9"]
KEYWORDS = ["ALL", "LOCAL", "KNOWN", "UNKNOWN", "PARANOID", "all", "unknown", "Known"]
NAMES = [".example.com", "host.example.com", "localhost", ".com", "@staff", "#", "UNK*", "*N?WN"]


def _masked(address: str, length: int) -> str:
    return str(ipaddress.ip_network(f"{address}/{length}", strict=False).network_address)


def _v4_mask(length: int) -> str:
    return str(ipaddress.IPv4Address((0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF))


class Generator:
    """Random rules and requests drawn from pools chosen to hit each other often."""

    def __init__(self, seed: int, pattern_file: Path) -> None:
        self.rng = random.Random(seed)
        self.pattern_file = pattern_file

    def pick(self, items: list[str]) -> str:
        return self.rng.choice(items)

    def v4_pattern(self) -> str:
        address = self.pick(V4)
        kind = self.rng.randrange(9)
        length = self.rng.choice([0, 1, 8, 16, 24, 25, 31, 32, 33])
        if kind == 0:
            return address
        if kind == 1:
            return ".".join(address.split(".")[: self.rng.randint(1, 3)]) + "."
        if kind == 2:
            return f"{_masked(address, min(length, 32))}/{length}"
        if kind == 3:
            return f"{_masked(address, min(length, 32))}/{_v4_mask(min(length, 32))}"
        if kind == 4:
            return f"{address}/{self.rng.choice([8, 24, 32])}"  # host bits set
        if kind == 5:
            chars = list(address)
            for _ in range(self.rng.randint(1, 2)):
                chars[self.rng.randrange(len(chars))] = self.pick(["*", "?"])
            return "".join(chars)
        if kind == 6:
            return "." + address.rsplit(".", self.rng.randint(1, 2))[-1]
        if kind == 7:
            return f"{_masked(address, 16)}/255.0.255.0"  # not contiguous
        return self.pick(["0.0.0.0/0.0.0.0", "10.0.0.0/8x", "10.0.0.0/+8", "012.0.0.0/8"])

    def v6_pattern(self) -> str:
        address = self.pick(V6)
        kind = self.rng.randrange(4)
        if kind == 0:
            return f"[{address}]"
        if kind == 1:
            length = self.rng.choice([0, 16, 32, 48, 64, 127, 128, 129])
            net = _masked(address, min(length, 128)) if self.rng.random() < 0.7 else address
            return f"[{net}]/{length}"
        if kind == 2:
            return self.pick(["2001*", "fe80*", "*::1", "2001:db8::?"]).replace(":", "*")
        return f"[{address}]/{self.pick(['', 'x', '32x'])}"

    def host_pattern(self) -> str:
        roll = self.rng.random()
        if roll < 0.42:
            return self.v4_pattern()
        if roll < 0.64:
            return self.v6_pattern()
        if roll < 0.80:
            return self.pick(KEYWORDS)
        if roll < 0.90:
            return self.pick(NAMES)
        return str(self.pattern_file)

    def client_pattern(self) -> str:
        host = self.host_pattern()
        if self.rng.random() < 0.12:
            return f"{self.pick(['ALL', 'KNOWN', 'UNKNOWN', 'joe', 'jo*'])}@{host}"
        return host

    def client_list(self) -> str:
        parts = [self.client_pattern() for _ in range(self.rng.randint(1, 3))]
        for _ in range(self.rng.choice([0, 0, 1, 1, 2])):
            parts += ["EXCEPT"] + [self.client_pattern() for _ in range(self.rng.randint(1, 2))]
        separator = self.pick([" ", ", ", "\t", ",", " \\\n  "])
        return separator.join(parts)

    def daemon_list(self) -> str:
        return self.pick(
            ["ALL", "sshd", "in.fingerd", "ftpd", "ALL EXCEPT sshd", "in.", ".fingerd", "*d",
             "s?hd", "SSHD", "KNOWN", "SSH*", "IN.*D", "sshd, ftpd", "sshd@10.0.0.9",
             "ALL@10.0.0.0/8",
             "ALL@[2001:db8::]/32", "ftpd@UNKNOWN", "ALL EXCEPT ALL@10.0.0.9",
             "ALL EXCEPT in.fingerd EXCEPT in.fingerd@[2001:db8::9]"]
        )  # fmt: skip

    def options(self, banner_dir: Path) -> list[str]:
        options = [f"banners {banner_dir}"]
        if self.rng.random() < 0.15:
            options.append(self.pick(["severity auth.notice", "severity warning"]))
        roll = self.rng.random()
        if roll < 0.2:
            options.append("allow")
        elif roll < 0.4:
            options.append("DENY")
        elif roll < 0.43:
            options.append("twist /bin/echo 421 go away")
        return options

    def table(self, name: str, directory: Path) -> str:
        lines: list[str] = []
        for number in range(self.rng.randint(1, 5)):
            if self.rng.random() < 0.15:
                lines.append(self.pick(["# a comment", "", "   ", "#ALL: ALL \\\n# still"]))
            banner_dir = directory / f"{name}{number}"
            fields = [self.daemon_list(), self.client_list(), *self.options(banner_dir)]
            lines.append(": ".join(fields))
        if name == "deny" and self.rng.random() < 0.25:
            lines.append(f"ALL: ALL: banners {directory / 'deny9'}")
        return "".join(line + "\n" for line in lines)

    def request(self) -> tuple[str, str]:
        daemon = self.pick(DAEMONS)
        if self.rng.random() < 0.3:
            daemon += "@" + self.pick(SERVERS)
        client = self.pick(V4) if self.rng.random() < 0.6 else self.pick(V6)
        if self.rng.random() < 0.08:
            client = "joe@" + client
        return daemon, client


@dataclass
class Case:
    number: int
    allow: str
    deny: str
    daemon: str
    client: str

    def describe(self) -> str:
        return (
            f"case {self.number}: tcpdmatch -d {self.daemon} {self.client}\n"
            f"--- hosts.allow\n{self.allow}--- hosts.deny\n{self.deny}"
        )


def make_cases(directory: Path) -> list[Case]:
    pattern_file = directory / "patterns"
    pattern_file.write_text("10.0.0.2\n  192.168.1.0/255.255.255.0 [2001:db8:1::]/48\n# 8.8.8.8\n")
    generator = Generator(SEED, pattern_file)
    return [
        Case(n, generator.table("allow", directory), generator.table("deny", directory),
             *generator.request())
        for n in range(CASES)
    ]  # fmt: skip


def in_namespace() -> list[str]:
    """A prefix running tcpdmatch without a network, so its lookups fail fast."""
    probe = subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False)
    return ["unshare", "-n"] if probe.returncode == 0 else []


def tcpdmatch_lines(work: Path, prefix: list[str], daemon: str, client: str) -> list[str]:
    """What `tcpdmatch -d DAEMON CLIENT` prints, run in `work` (its hosts.* files)."""
    assert TCPDMATCH is not None
    done = subprocess.run(
        [*prefix, TCPDMATCH, "-d", daemon, client],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.replace("\r", "").splitlines()


def run_tcpdmatch(case: Case, work: Path, prefix: list[str]) -> tuple[list[str], str | None]:
    """tcpdmatch's report lines and the rule its banner named ("allow3"), if any."""
    assert TCPDMATCH is not None
    (work / "hosts.allow").write_text(case.allow)
    (work / "hosts.deny").write_text(case.deny)
    daemon = case.daemon.split("@")[0]
    for table in ("allow", "deny"):
        for number in range(10):
            banner_dir = work.parent / f"{table}{number}"
            banner_dir.mkdir(exist_ok=True)
            (banner_dir / daemon).write_text(f"RULE {table}{number}\n")
    lines = tcpdmatch_lines(work, prefix, case.daemon, case.client)
    rule = next((line.split()[1] for line in lines if line.startswith("RULE ")), None)
    return [line for line in lines if not line.startswith("RULE ")], rule


def run_ours(case: Case, work: Path) -> tuple[list[str], str | None]:
    """Our report (without the lines tcpdmatch no longer prints) and the matched rule."""
    access = load_hosts(work / "hosts.allow", work / "hosts.deny")
    lines = check_lines(access, case.daemon, case.client, FixedHostNames())
    matched = next((line for line in lines if line.startswith("matched:")), None)
    rule = None
    if matched is not None:
        path, line_number = matched.split()[1], int(matched.split()[-1])
        table = "allow" if path.endswith("hosts.allow") else "deny"
        rule = f"{table}{_rule_index(work / f'hosts.{table}', line_number)}"
    shown = [line for line in lines if not line.startswith(("matched:", "option:"))]
    return shown, rule


def _rule_index(path: Path, line_number: int) -> int:
    """Which generated rule ends on *line_number* (its banner directory's number)."""
    table = load_hosts(path, None).allow
    for rule in table.rules:
        if rule.line == line_number:
            found = re.search(r"(\d+)$", rule.options[0].value or "")
            assert found is not None
            return int(found.group(1))
    raise AssertionError(f"no rule ends on line {line_number}")


def test_decisions_equal_tcpdmatch(tmp_path: Path) -> None:
    cases = make_cases(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    prefix = in_namespace()
    verdicts: dict[str, int] = {}
    failures: list[str] = []
    for case in cases:
        theirs, their_rule = run_tcpdmatch(case, work, prefix)
        ours, our_rule = run_ours(case, work)
        verdict = theirs[-1].split()[-1] if theirs else "?"
        verdicts[verdict] = verdicts.get(verdict, 0) + 1
        if theirs != ours or their_rule != our_rule:
            failures.append(
                f"{case.describe()}tcpdmatch: {theirs} rule={their_rule}\n"
                f"ours:      {ours} rule={our_rule}\n"
            )
    assert not failures, f"{len(failures)} of {len(cases)} differ:\n" + "\n".join(failures[:5])
    assert len(cases) >= 200
    # The corpus must exercise both outcomes, not just one.
    assert verdicts.get("granted", 0) >= 50 and verdicts.get("denied", 0) >= 50, verdicts
