"""`netserver import-inetd`: inetd.conf -> `netserver run` TOML, then run what it made.

Port names come from a services file the test writes (--services), so nothing depends
on the machine's /etc/services.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import ROOT
from inetd_support import current_user, start_run, write_config
from netclient import exchange


def import_inetd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "netserver.cli", "import-inetd", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )


def free_ports(count: int) -> list[int]:
    """Ports the kernel just handed out (closed again; the run binds them next)."""
    socks = [socket.socket() for _ in range(count)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in socks]
    for sock in socks:
        sock.close()
    return ports


SAMPLE = """\
# a Debian-style inetd.conf
finger  stream  tcp   nowait      nobody        /usr/sbin/tcpd  in.fingerd -w
ftp     stream  tcp   nowait.40   root          /usr/sbin/tcpd  /usr/sbin/in.ftpd -l
echo    stream  tcp   nowait      root          internal
talk    dgram   udp   wait        nobody.tty    /usr/sbin/in.talkd  in.talkd
exim    stream  tcp6  nowait      mail:mail     /usr/sbin/exim  exim -bs
ident   stream  tcp   wait        identd        /usr/sbin/identd  identd
"""
SERVICES = "finger 79/tcp\nftp 21/tcp\necho 7/tcp\ntalk 517/udp\nexim 25/tcp smtp\n"


def test_converts_tcpd_lines_and_warns_about_the_rest(tmp_path: Path) -> None:
    conf = write_config(tmp_path, SAMPLE, "inetd.conf")
    services = write_config(tmp_path, SERVICES, "services")
    result = import_inetd(str(conf), "--services", str(services))
    assert result.returncode == 0, result.stderr
    data = tomllib.loads(result.stdout)
    by_name = {s["name"]: s for s in data["service"]}
    assert set(by_name) == {"finger", "ftp", "exim"}
    finger = by_name["finger"]
    assert finger["listen"] == ["0.0.0.0:79"]
    assert finger["command"] == ["/usr/sbin/in.fingerd", "-w"]
    assert finger["daemon_name"] == "in.fingerd"
    assert finger["hosts_allow"] == "/etc/hosts.allow"
    assert finger["user"] == "nobody"
    assert by_name["ftp"]["command"] == ["/usr/sbin/in.ftpd", "-l"]
    assert by_name["ftp"]["user"] == "root"
    assert "at most 40 starts a minute" in result.stdout
    exim = by_name["exim"]
    assert exim["listen"] == ["[::]:25"] and exim["group"] == "mail"
    assert exim["command"] == ["/usr/sbin/exim", "-bs"] and "hosts_allow" not in exim
    warnings = result.stderr.splitlines()
    assert len(warnings) == 3
    assert any(":4: skipped" in w and "internal" in w for w in warnings)
    assert any(":5: skipped" in w and "udp" in w for w in warnings)
    assert any(":7: skipped" in w and "wait" in w for w in warnings)


def test_the_imported_config_runs(tmp_path: Path) -> None:
    me = current_user()
    cat_port, greet_port = free_ports(2)
    conf = write_config(
        tmp_path,
        f"127.0.0.1:cat stream tcp nowait {me} /usr/sbin/tcpd /bin/cat\n"
        f"127.0.0.1:{greet_port} stream tcp nowait {me} /bin/echo echo hello there\n",
        "inetd.conf",
    )
    services = write_config(tmp_path, f"cat {cat_port}/tcp\n", "services")
    allow = write_config(tmp_path, "cat: 127.0.0.1\n", "hosts.allow")
    deny = write_config(tmp_path, "ALL: ALL\n", "hosts.deny")
    result = import_inetd(
        str(conf), "--services", str(services), "--hosts-allow", str(allow),
        "--hosts-deny", str(deny),
    )  # fmt: skip
    assert result.returncode == 0 and result.stderr == "", result.stderr
    server = start_run(write_config(tmp_path, result.stdout, "imported.toml"), tmp_path)
    try:
        assert server.addresses == [f"127.0.0.1:{cat_port}", f"127.0.0.1:{greet_port}"]
        assert exchange(server.addresses[0], b"meow\n") == b"meow\n"
        assert exchange(server.addresses[1]) == b"hello there\n"
    finally:
        assert server.stop() == 0


def test_unknown_service_name_is_skipped(tmp_path: Path) -> None:
    conf = write_config(tmp_path, "nosuchsvc stream tcp nowait nobody /bin/cat cat\n", "i.conf")
    services = write_config(tmp_path, "", "services")
    result = import_inetd(str(conf), "--services", str(services))
    assert result.returncode == 0
    assert "unknown service name" in result.stderr
    assert "[[service]]" not in result.stdout
