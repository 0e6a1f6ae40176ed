"""The examples, each in every mode it fits, served by `netserver serve` over real sockets."""

from __future__ import annotations

import io
import re
import sys
import time
from datetime import datetime, timedelta

import pytest
from conftest import ROOT, ServerFactory
from netclient import Client, exchange
from nltk.chat.eliza import pairs as ELIZA_PAIRS

if str(ROOT) not in sys.path:  # the examples package lives at the project root
    sys.path.insert(0, str(ROOT))
import examples.daytime
import examples.eliza

SYNC_MODES = ("fork", "prefork", "thread")
QUIT_ANSWERS = dict(ELIZA_PAIRS)["quit"]
DAYTIME = re.compile(rb"^(\w+, \w+ \d\d, \d{4} \d\d:\d\d:\d\d)-(\S+)\r\n$")


def serve(netserver_proc: ServerFactory, handler: str, mode: str) -> str:
    server = netserver_proc(["--listen", "127.0.0.1:0", "--mode", mode, "--handler", handler])
    return server.addresses[0]


def conversation_start(client: Client) -> bytes:
    """Read eliza's greeting up to the first prompt."""
    return client.read_until(examples.eliza.PROMPT.encode())


# -- echo ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("handler", "mode", "sent", "expected"),
    [
        *[("main", mode, b"one\r\ntwo\n", b"one\ntwo\n") for mode in SYNC_MODES],
        *[("binary", mode, b"one\r\ntwo\n", b"one\r\ntwo\n") for mode in SYNC_MODES],
        ("async_main", "async", b"one\r\ntwo\n", b"one\r\ntwo\n"),
        ("async_chunks", "async", b"one\r\ntwo\n", b"one\r\ntwo\n"),
    ],
)
def test_echo(
    netserver_proc: ServerFactory, handler: str, mode: str, sent: bytes, expected: bytes
) -> None:
    address = serve(netserver_proc, f"examples.echo:{handler}", mode)
    assert exchange(address, sent) == expected


# -- daytime ---------------------------------------------------------------------------


def check_daytime(answer: bytes) -> None:
    """One CRLF line in the example's format, within a few seconds of now."""
    match = DAYTIME.match(answer)
    assert match is not None, answer
    stamp = datetime.strptime(match.group(1).decode(), "%A, %B %d, %Y %H:%M:%S")
    assert abs(stamp - datetime.now()) < timedelta(seconds=10)
    assert match.group(2).decode() in time.tzname


@pytest.mark.parametrize(
    ("handler", "mode"), [*[("main", mode) for mode in SYNC_MODES], ("async_main", "async")]
)
def test_daytime(netserver_proc: ServerFactory, handler: str, mode: str) -> None:
    address = serve(netserver_proc, f"examples.daytime:{handler}", mode)
    with Client(address) as client:  # the client sends nothing: daytime needs no request
        check_daytime(client.read_all())


def test_daytime_string_is_fixed_for_a_given_time() -> None:
    when = time.mktime((1982, 2, 22, 17, 37, 43, 0, 0, -1))
    assert examples.daytime.daytime(when).startswith("Monday, February 22, 1982 17:37:43-")


# -- eliza -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_eliza_conversation(netserver_proc: ServerFactory, mode: str) -> None:
    address = serve(netserver_proc, "examples.eliza:main", mode)
    with Client(address) as client:
        greeting = conversation_start(client)
        assert greeting.startswith(b"Therapist\r\n")
        assert b"How are you feeling today?\r\n" in greeting
        client.send(b"I need my holiday!\r\n")
        answer = client.read_until(b"\r\n")
        assert b"your holiday" in answer  # "my" reflected, "!" dropped
        assert client.read_until(b"> ") == b"> "
        client.send(b"quit\r\n")
        goodbye = client.read_all()
        assert goodbye.endswith(b"\r\n")
        assert goodbye.decode().strip() in QUIT_ANSWERS


@pytest.mark.parametrize("mode", SYNC_MODES)
def test_eliza_ends_at_eof(netserver_proc: ServerFactory, mode: str) -> None:
    address = serve(netserver_proc, "examples.eliza:main", mode)
    with Client(address) as client:
        conversation_start(client)
        client.send(b"I am sad\n")
        client.shut_write()
        rest = client.read_all()  # the server closes once it reads EOF
    assert b"sad" in rest
    assert rest.endswith(b"\r\n> ")


def test_eliza_thread_mode_keeps_conversations_apart(netserver_proc: ServerFactory) -> None:
    """`make run` serves eliza in thread mode: two patients at once, each their own answers."""
    address = serve(netserver_proc, "examples.eliza:main", "thread")
    with Client(address) as first, Client(address) as second:
        conversation_start(first)
        conversation_start(second)
        first.send(b"I need apples\n")
        second.send(b"I need pears\n")
        to_first, to_second = first.read_until(b"\r\n"), second.read_until(b"\r\n")
        assert b"apples" in to_first and b"pears" not in to_first
        assert b"pears" in to_second and b"apples" not in to_second
        for client in (first, second):
            client.send(b"quit\n")
            assert client.read_all().decode().split("\r\n")[0].strip("> ") in QUIT_ANSWERS


def test_eliza_answers_follow_the_patterns() -> None:
    assert "a holiday" in examples.eliza.respond("I need a holiday!")
    assert "your mother" in examples.eliza.respond("I need my mother.")
    assert examples.eliza.respond("quit") in QUIT_ANSWERS


def test_eliza_main_reads_until_quit(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO("\nI need sleep\nquit\nnever read\n"))
    monkeypatch.setattr(sys, "stdout", out)
    examples.eliza.main()
    lines = out.getvalue().split("\r\n")
    assert lines[0] == "Therapist"
    prompts = out.getvalue().count(examples.eliza.PROMPT)
    assert prompts == 3  # the empty line gets a new prompt, no answer
    assert "sleep" in out.getvalue()
    assert "never read" not in out.getvalue()


def test_eliza_main_ends_at_eof(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdin", io.StringIO("I need sleep\n"))
    monkeypatch.setattr(sys, "stdout", out)
    examples.eliza.main()
    assert out.getvalue().endswith("\r\n> ")


def test_dialup_example_config_is_the_documented_setup() -> None:
    """examples/leafmail-dialup.toml loads, only spools, and sends with STARTTLS and AUTH."""
    from leafmail import config

    loaded = config.load(str(ROOT / "examples" / "leafmail-dialup.toml"), env={})
    assert loaded.delivery.effective_mode == "offline"
    assert loaded.delivery.smarthost == "smtp.provider.example:587"
    assert loaded.delivery.tls == "starttls"
    assert loaded.delivery.username and loaded.delivery.password_file
    assert loaded.smtp.listen == ("127.0.0.1:2525",)
    assert config.split_hostport(loaded.delivery.smarthost, loaded.delivery.tls) == (
        "smtp.provider.example",
        587,
    )
