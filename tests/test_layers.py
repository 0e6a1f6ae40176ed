"""The test layers (tests/layers.py): the rule that marks a test slow, and the guard
that fails a fast test which starts a process, run on small test files by pytester (in
this process). The guard's tests are slow by hand: under the guard of a fast test, the
inner session's verdicts would be the outer guard's, not the one under test."""

from __future__ import annotations

import textwrap

import pytest

CONFTEST = 'pytest_plugins = ["layers"]\n'

# Every way to start a process, as the body of a test (indented into a try block).
PROCESS_WAYS = {
    "subprocess": """
        import subprocess
        subprocess.run(['true'], check=True)
    """,
    "fork": """
        pid = os.fork()
        if pid == 0:
            os._exit(0)
        os.waitpid(pid, 0)
    """,
    "asyncio": """
        import asyncio
        async def run():
            proc = await asyncio.create_subprocess_exec('true')
            await proc.wait()
        asyncio.run(run())
    """,
    "multiprocessing": """
        import multiprocessing
        p = multiprocessing.get_context('fork').Process(target=print)
        p.start()
        p.join()
    """,
    "spawn": "os.posix_spawn('/bin/true', ['true'], dict(os.environ))",
    "system": "os.system('true')",
}


# A helper module of a test tree: a launcher two calls deep, a class whose method starts
# one, and helpers that only use the subprocess module to wait or to name a type.
HELPERS = """
import subprocess

def _start():
    return subprocess.Popen(['true'])

def launch():
    return _start()

class Launcher:
    def go(self):
        return launch()

class Handle:
    def stop(self, proc):
        try:
            proc.wait(1)
        except subprocess.TimeoutExpired:
            proc.kill()

def pure():
    return 1
"""


def sneaky_test(body: str) -> str:
    """A test module whose test starts a process and swallows whatever that raises; the
    import sits inside the function, so the module rule sees nothing."""
    code = textwrap.indent(textwrap.dedent(body).strip(), " " * 8)
    return (
        f"import os\n\ndef test_it():\n    try:\n{code}\n    except BaseException:\n        pass\n"
    )


@pytest.mark.slow
@pytest.mark.parametrize("way", sorted(PROCESS_WAYS))
def test_a_fast_test_that_starts_a_process_fails(pytester: pytest.Pytester, way: str) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_sneaky=sneaky_test(PROCESS_WAYS[way]))
    result = pytester.runpytest("-m", "fast", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*StartedProcess: a fast test called *"])


@pytest.mark.slow
def test_the_same_test_marked_slow_by_hand_runs(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    source = sneaky_test(PROCESS_WAYS["fork"]).replace("except BaseException:", "finally:")
    pytester.makepyfile(
        test_marked="import pytest\n"
        + source.replace("def test_it", "@pytest.mark.slow\ndef test_it")
    )
    result = pytester.runpytest("-m", "slow", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


@pytest.mark.slow
def test_the_guard_also_covers_fixtures(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(
        test_fixture="import os, pytest\n\n@pytest.fixture\ndef child():\n"
        "    yield\n    os.posix_spawnp('true', ['true'], dict(os.environ))\n\n"
        "def test_it(child):\n    pass\n"
    )
    result = pytester.runpytest("-m", "fast", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, errors=1)  # the teardown is the error
    result.stdout.fnmatch_lines(["*a fast test called os.posix_spawnp*"])


@pytest.mark.parametrize(
    "source",
    [
        "import subprocess\n",
        "from subprocess import run\n",
        "from multiprocessing import Process\n",
        "from helpers import launch\n",
        "from helpers import Launcher\n",
    ],
)
def test_a_module_that_can_start_processes_is_slow(pytester: pytest.Pytester, source: str) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(helpers=HELPERS)
    pytester.makepyfile(test_mod=f"{source}\ndef test_a():\n    pass\n\ndef test_b():\n    pass\n")
    fast = pytester.runpytest("-m", "fast", "-p", "no:cacheprovider")
    fast.assert_outcomes(deselected=2)
    slow = pytester.runpytest("-m", "slow", "-p", "no:cacheprovider")
    slow.assert_outcomes(passed=2)


def test_a_module_with_helpers_that_start_nothing_is_fast(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(helpers=HELPERS)
    pytester.makepyfile(test_mod="from helpers import pure, Handle\n\ndef test_a():\n    pass\n")
    result = pytester.runpytest("-m", "fast", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)


def test_a_test_using_the_process_fixture_is_slow(pytester: pytest.Pytester) -> None:
    pytester.makeconftest(
        CONFTEST + "import pytest\n\n@pytest.fixture\ndef netserver_proc():\n    return None\n"
    )
    pytester.makepyfile(
        test_mod="def test_daemon(netserver_proc):\n    pass\n\ndef test_pure():\n    pass\n"
    )
    result = pytester.runpytest("-m", "fast", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, deselected=1)
