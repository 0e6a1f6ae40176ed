"""Run ``leafmail ARGS`` as USER: ``python run_as.py USER ARGS...`` (as root).

The interpreter and its libraries may live where USER cannot read them (here under
/root), so they are loaded first, as root; then every id becomes USER's for good
(netserver.privileges.drop: setgroups, setresgid, setresuid, checked) before
`leafmail.cli.main` reads a single byte of input. From then on the command has exactly
USER's rights, as if USER had run it.
"""

from __future__ import annotations

import sys

from leafmail import cli, daemon, flush, sendmail  # cli loads the last three on demand
from netserver import privileges

PRELOADED = (daemon, flush, sendmail)


def main() -> int:
    user, args = sys.argv[1], sys.argv[2:]
    privileges.drop(privileges.resolve(user))
    return cli.main(args)


if __name__ == "__main__":
    sys.exit(main())
