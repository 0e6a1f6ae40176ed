"""leafmail's log lines and start-up errors, as an operator reads them.

The queue runner delivers to the real aiosmtpd smarthost with an injected clock and
writes to an in-memory `ServerLog`; the daemon runs as a real `leafmail serve` process
whose stderr is read back; TLS files come from trustme.
"""

from __future__ import annotations

import asyncio
import io
import json
import smtplib
import ssl
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
import trustme
from conftest import FakeClock
from leafmail_fixtures import LeafmailFactory, leafmail_servers, run_leafmail, write_config
from smarthost import Smarthost

from leafmail.config import Config, SmtpConfig, format_duration
from leafmail.daemon import tls_context
from leafmail.delivery.smarthost import SmarthostAgent, SmarthostSettings
from leafmail.envelope import Envelope, Recipient
from leafmail.queue import QueueRunner
from leafmail.retry import RetryPolicy
from leafmail.spool import Spool
from netserver.connlog import ServerLog
from netserver.errors import ConfigError

SENDER = "alice@src.test"
BUSY = "451 4.2.1 mailbox busy"


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[LeafmailFactory]:
    yield from leafmail_servers(tmp_path)


def runner_with_log(
    spool: Spool, sink: Smarthost, clock: FakeClock, policy: RetryPolicy
) -> tuple[QueueRunner, io.StringIO]:
    settings = SmarthostSettings(host="127.0.0.1", port=sink.port, helo="leaf.test", tls="none")
    log = io.StringIO()
    runner = QueueRunner(
        spool,
        SmarthostAgent(settings),
        policy,
        hostname="leaf.test",
        clock=clock,
        log=ServerLog(log, program="leafmail"),
    )
    return runner, log


def put(spool: Spool, rcpt: str, qid: str | None = None) -> str:
    data = f"From: <{SENDER}>\r\nSubject: log\r\n\r\nHello.\r\n".encode()
    return spool.commit(Envelope(SENDER, (Recipient(rcpt),)), data, qid)


# --- the line formats ---------------------------------------------------------------------


def test_text_lines_start_with_the_program_name() -> None:
    out = io.StringIO()
    ServerLog(out, program="leafmail").event("delivery", qid="Q1", result="delivered")
    ServerLog(out).info("listening", on="127.0.0.1:25")
    assert out.getvalue().splitlines() == [
        "leafmail: delivery qid=Q1 result=delivered",
        "netserver: info msg=listening on=127.0.0.1:25",  # netserver's own is unchanged
    ]


def test_json_lines_carry_an_rfc3339_time_and_the_program() -> None:
    out = io.StringIO()
    before = time.time()
    ServerLog(out, json_lines=True, program="leafmail").event("delivery", qid="Q1")
    after = time.time()
    line = json.loads(out.getvalue())
    assert list(line) == ["time", "program", "event", "qid"]
    assert (line["program"], line["event"], line["qid"]) == ("leafmail", "delivery", "Q1")
    assert line["time"].endswith("Z") and "T" in line["time"]
    stamp = datetime.fromisoformat(line["time"]).timestamp()  # RFC 3339 parses as ISO 8601
    assert before - 0.001 <= stamp <= after


# --- what the queue runner logs ----------------------------------------------------------


def test_a_delivery_after_a_deferral_is_logged_without_the_old_error(
    spool: Spool, sink: Smarthost
) -> None:
    sink.behaviour.rcpt_replies["busy@dst.test"] = BUSY
    qid = put(spool, "busy@dst.test")
    runner, log = runner_with_log(spool, sink, FakeClock(), RetryPolicy())

    asyncio.run(runner.run_once())
    sink.behaviour.rcpt_replies.clear()
    asyncio.run(runner.run_once(force=True))

    assert log.getvalue().splitlines() == [
        f'leafmail: delivery qid={qid} result=deferred error="{BUSY}"',
        f"leafmail: delivery qid={qid} result=delivered",
    ]


def test_expiry_is_told_in_human_units(spool: Spool, sink: Smarthost) -> None:
    sink.behaviour.rcpt_replies["busy@dst.test"] = BUSY
    clock = FakeClock()
    policy = RetryPolicy(initial=1.0, maximum=1.0, lifetime=3.0)
    qid = put(spool, "busy@dst.test")
    runner, log = runner_with_log(spool, sink, clock, policy)
    asyncio.run(runner.run_once())  # deferred
    clock.advance(10.0)
    asyncio.run(runner.run_once())  # expired
    bounced = log.getvalue().splitlines()[1]
    assert bounced == (
        f'leafmail: delivery qid={qid} result=bounced error="451 4.4.7 message expired '
        f'after 3 s in the queue; last error: {BUSY}"'
    )


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0.4, "0 s"),
        (3.0, "3 s"),
        (90.0, "1 min 30 s"),
        (4 * 3600.0 + 1800.0, "4 h 30 min"),
        (86400.0, "1 day"),
        (5 * 86400.0, "5 days"),
        (86400.0 + 6 * 3600.0, "1 day 6 h"),
        (86400.0 + 60.0, "1 day"),  # never "1 day 0 h 1 min"
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


# --- the daemon's own lines ----------------------------------------------------------------


@pytest.mark.parametrize("form", ["text", "json"])
def test_the_daemon_logs_as_leafmail(servers: LeafmailFactory, tmp_path: Path, form: str) -> None:
    config = write_config(tmp_path, 'hostname = "leaf.test"\n[delivery]\nmode = "offline"\n')
    args = ["--config", str(config), "--listen", "127.0.0.1:0", "--log-format", form]
    daemon = servers.spawn(args, spool_path=tmp_path / "xdg-data" / "leafmail" / "spool")
    host, port = daemon.addresses[0]
    with smtplib.SMTP(host, port, timeout=10) as client:
        client.sendmail(SENDER, ["bob@dst.test"], b"Subject: x\r\n\r\nhi\r\n")
    daemon.terminate()
    daemon.proc.wait(10)
    lines = daemon.log().splitlines()
    assert lines, "the daemon logged nothing"
    if form == "text":
        assert all(line.startswith("leafmail: ") for line in lines), lines
    else:
        records = [json.loads(line) for line in lines]
        assert all(r["program"] == "leafmail" for r in records), records
        assert all(datetime.fromisoformat(r["time"]) for r in records)
        assert "conn" in {r["event"] for r in records}


# --- TLS files that cannot be loaded -------------------------------------------------------


def tls_files(tmp_path: Path) -> tuple[Path, Path]:
    cert = trustme.CA().issue_cert("leaf.test")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


def context_error(cert: Path, key: Path) -> str:
    config = Config(hostname="leaf.test", smtp=SmtpConfig(tls_cert=str(cert), tls_key=str(key)))
    with pytest.raises(ConfigError) as caught:
        tls_context(config.smtp)
    return str(caught.value)


def test_tls_files_that_load(tmp_path: Path) -> None:
    cert, key = tls_files(tmp_path)
    config = Config(hostname="leaf.test", smtp=SmtpConfig(tls_cert=str(cert), tls_key=str(key)))
    assert isinstance(tls_context(config.smtp), ssl.SSLContext)


def test_a_missing_tls_file_is_named(tmp_path: Path) -> None:
    cert, key = tls_files(tmp_path)
    gone = tmp_path / "nope.pem"
    assert context_error(gone, key) == (
        f"smtp.tls_cert {gone}: cannot read the TLS certificate: No such file or directory"
    )
    assert (
        context_error(cert, gone)
        == f"smtp.tls_key {gone}: cannot read the TLS private key: No such file or directory"
    )


def test_tls_files_of_the_wrong_kind_are_named(tmp_path: Path) -> None:
    cert, key = tls_files(tmp_path)
    assert context_error(key, key) == f"smtp.tls_cert {key}: no PEM TLS certificate in it"
    assert context_error(cert, cert) == f"smtp.tls_key {cert}: no PEM TLS private key in it"


def test_a_key_that_does_not_match_names_both_files(tmp_path: Path) -> None:
    cert, _ = tls_files(tmp_path)
    other = tmp_path / "other"
    other.mkdir()
    _, other_key = tls_files(other)
    text = context_error(cert, other_key)
    assert text.startswith(f"cannot load TLS certificate {cert} with key {other_key}: ")
    assert "VALUES_MISMATCH" in text


def test_serve_exits_78_naming_the_tls_file(tmp_path: Path) -> None:
    gone = tmp_path / "missing-cert.pem"
    config = write_config(
        tmp_path,
        f'hostname = "leaf.test"\n[smtp]\ntls_cert = "{gone}"\ntls_key = "{gone}"\n',
    )
    done = run_leafmail(tmp_path, "serve", "--config", str(config), "--listen", "127.0.0.1:0")
    assert done.returncode == 78
    assert done.stderr.decode() == (
        f"leafmail: smtp.tls_cert {gone}: cannot read the TLS certificate: "
        "No such file or directory\n"
    )
