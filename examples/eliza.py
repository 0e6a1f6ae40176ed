"""Eliza, the 1966 Rogerian psychotherapist, as a stdio handler (the seed's demo server).

The patterns and the first/second-person reflections ship with nltk
(``nltk.chat.eliza``), so no data download is needed. nltk's own ``Chat.converse``
prompts with ``input(">")`` and keeps going after EOF; this loop reads ``sys.stdin``
itself, ends at EOF or "quit", and writes CRLF line ends for telnet clients.

    netserver serve --listen 127.0.0.1:2525 --mode thread --handler examples.eliza:main
"""

from __future__ import annotations

import sys

from nltk.chat.eliza import pairs, reflections
from nltk.chat.util import Chat

GREETING = (
    "Therapist",
    "---------",
    "Talk to the program by typing in plain English, using normal upper-",
    'and lower-case letters and punctuation.  Enter "quit" when done.',
    "=" * 72,
    "Hello.  How are you feeling today?",
)
PROMPT = "> "
QUIT = "quit"

# Built once per process: a fork or prefork child inherits it, and thread mode shares it
# (Chat.respond keeps no state between calls).
_chat = Chat(pairs, reflections)


def respond(text: str) -> str:
    """Eliza's answer to one line (trailing '!' and '.' dropped, as nltk's loop does)."""
    text = text.strip().rstrip("!.")
    answer = _chat.respond(text)
    return str(answer) if answer is not None else "Please go on."


def say(text: str) -> None:
    """One line to the client, CRLF-terminated."""
    sys.stdout.write(text + "\r\n")


def main() -> None:
    """Greet, then answer line by line until EOF or "quit"."""
    for line in GREETING:
        say(line)
    while True:
        sys.stdout.write(PROMPT)
        sys.stdout.flush()  # netserver flushes before a read anyway; a terminal does not
        line = sys.stdin.readline()
        if not line:
            return
        text = line.strip()
        if not text:
            continue
        say(respond(text))
        if text.lower().rstrip("!.") == QUIT:
            return


if __name__ == "__main__":
    main()
