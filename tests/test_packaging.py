"""The two distributions (issue 14): `netserver` installs and runs with no mail library,
`leafmail` depends on it and on the mail libraries, and each ships its py.typed.

The static tests read every import statement under src/ (lazy ones inside functions
too). The install test builds both wheels offline from a copy of the checkout (nothing
is written into the tree), installs the netserver wheel alone into a fresh venv with no
other package, imports every netserver module and runs the command there.
"""

from __future__ import annotations

import ast
import email.parser
import shutil
import subprocess
import sys
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import ROOT

SRC = ROOT / "src"
BUILD_TIMEOUT = 180.0
# Offline, with the dev venv's setuptools and wheel (the dev extra pins them).
PIP = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
OFFLINE = ["--no-deps", "--no-index", "--no-build-isolation"]
DISTRIBUTIONS = {"netserver": ROOT, "leafmail": ROOT / "packages" / "leafmail"}
# Import name -> distribution, for every third-party import under src/.
PROVIDERS = {
    "netserver": "netserver",
    "uvloop": "uvloop",
    "dns": "dnspython",
    "rich": "rich",
    "spf": "pyspf",
    "dkim": "dkimpy",
}
MAIL_MODULES = ("dns", "aiosmtplib", "rich", "spf", "dkim", "leafmail")
# netserver modules that need an extra (netserver[dns]); the CLI imports them lazily.
NEEDS_DNSPYTHON = frozenset({"netserver.dnsresolver"})


def project(name: str) -> dict[str, object]:
    table = tomllib.loads((DISTRIBUTIONS[name] / "pyproject.toml").read_text())["project"]
    assert isinstance(table, dict)
    return table


def requirement_name(spec: str) -> str:
    """The distribution a requirement names ("dkimpy[ed25519]>=1" -> "dkimpy")."""
    end = next((i for i, c in enumerate(spec) if c in "[<>=!~; "), len(spec))
    return spec[:end].lower()


def imports(package: str) -> Iterator[tuple[str, str]]:
    """(module file, top-level name) for every absolute import in a package's source."""
    for path in sorted((SRC / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                yield str(path.relative_to(SRC)), name.partition(".")[0]


def third_party(package: str) -> dict[str, set[str]]:
    """Top-level import names outside the standard library -> the files importing them."""
    found: dict[str, set[str]] = {}
    for path, name in imports(package):
        if name not in sys.stdlib_module_names and name != package:
            found.setdefault(name, set()).add(path)
    return found


def test_netserver_imports_no_mail_library_and_nothing_of_leafmail() -> None:
    found = third_party("netserver")
    assert set(found) <= {"uvloop", "dns"}, found  # only its optional extras
    for name in MAIL_MODULES:
        if name == "dns":  # dnspython backs --dns-server only: netserver[dns]
            modules = {p.removesuffix(".py").replace("/", ".") for p in found.get(name, ())}
            assert modules <= NEEDS_DNSPYTHON, modules
        else:
            assert name not in found, found[name]


def test_netserver_needs_nothing_and_offers_its_optional_parts_as_extras() -> None:
    meta = project("netserver")
    assert meta["dependencies"] == []
    extras = meta["optional-dependencies"]
    assert isinstance(extras, dict)
    assert [requirement_name(r) for r in extras["uvloop"]] == ["uvloop"]
    assert [requirement_name(r) for r in extras["dns"]] == ["dnspython"]


def test_leafmail_declares_every_library_it_imports() -> None:
    meta = project("leafmail")
    declared = {requirement_name(r) for r in meta["dependencies"]}  # type: ignore[attr-defined]
    used = {PROVIDERS[name] for name in third_party("leafmail")}  # KeyError: an unknown one
    assert used <= declared, used - declared
    assert {"netserver", "dnspython", "dkimpy", "pyspf", "rich"} <= declared
    # Delivery speaks SMTP with netserver.smtp.client; aiosmtplib is a test client only.
    assert "aiosmtplib" not in declared


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_license_is_an_spdx_expression(name: str) -> None:
    assert project(name)["license"] == "MIT"


# --- built and installed -----------------------------------------------------------------


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Both wheels, built offline from a copy of the checkout's packaging inputs."""
    tmp = tmp_path_factory.mktemp("wheels")
    source = tmp / "source"
    ignore = shutil.ignore_patterns("*.egg-info", "__pycache__", "build")
    shutil.copytree(SRC, source / "src", ignore=ignore)
    shutil.copytree(ROOT / "packages", source / "packages", ignore=ignore)
    shutil.copytree(ROOT / "man", source / "man")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    out = tmp / "dist"
    done = subprocess.run(
        [
            *PIP,
            "wheel",
            "-q",
            *OFFLINE,
            "-w",
            str(out),
            str(source),
            str(source / "packages/leafmail"),
        ],
        capture_output=True,
        text=True,
        timeout=BUILD_TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return {name: next(out.glob(f"{name}-*.whl")) for name in DISTRIBUTIONS}


def wheel_files(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist()


def wheel_metadata(wheel: Path) -> email.message.Message:
    with zipfile.ZipFile(wheel) as archive:
        (name,) = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        return email.parser.BytesParser().parsebytes(archive.read(name))


def test_each_wheel_holds_its_own_package_and_py_typed(wheels: dict[str, Path]) -> None:
    for name, wheel in wheels.items():
        files = wheel_files(wheel)
        packages = {f.partition("/")[0] for f in files if f.endswith(".py")}
        assert packages == {name}, packages
        assert f"{name}/py.typed" in files
        meta = wheel_metadata(wheel)
        assert meta["License-Expression"] == "MIT"
    requires = wheel_metadata(wheels["leafmail"]).get_all("Requires-Dist") or []
    assert {requirement_name(r) for r in requires if "extra ==" not in r} >= {
        "netserver",
        "dnspython",
        "dkimpy",
        "pyspf",
        "rich",
    }
    assert not [
        r
        for r in wheel_metadata(wheels["netserver"]).get_all("Requires-Dist") or []
        if "extra ==" not in r
    ]


@pytest.mark.parametrize("name", sorted(DISTRIBUTIONS))
def test_each_wheel_installs_its_man_page(wheels: dict[str, Path], name: str) -> None:
    with zipfile.ZipFile(wheels[name]) as archive:
        pages = {
            Path(member).name: archive.read(member)
            for member in archive.namelist()
            if "/data/share/man/man8/" in member
        }
    assert list(pages) == [f"{name}.8"]
    assert pages[f"{name}.8"] == (ROOT / "man" / f"{name}.8").read_bytes()


def netserver_modules(wheel: Path) -> list[str]:
    files = [f for f in wheel_files(wheel) if f.endswith(".py")]
    return sorted(f.removesuffix(".py").removesuffix("/__init__").replace("/", ".") for f in files)


IMPORT_ALL = """
import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
for name in {mail!r}:
    try:
        importlib.import_module(name)
    except ModuleNotFoundError:
        continue
    raise SystemExit(f"{{name}} is importable in the bare venv")
print("imported", len(sys.argv) - 1)
"""


def test_netserver_alone_in_a_fresh_venv_imports_and_runs(
    wheels: dict[str, Path], tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    install = [*PIP, "--python", str(python), "install", "-q", *OFFLINE, str(wheels["netserver"])]
    done = subprocess.run(install, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert done.returncode == 0, done.stderr

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        # -I: the checkout (cwd, PYTHONPATH) cannot lend a module the venv lacks
        return subprocess.run(
            argv, cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False
        )

    # netserver.__main__ runs the command when imported (`python -m netserver`): it is
    # run below instead, as users run it.
    modules = [
        m
        for m in netserver_modules(wheels["netserver"])
        if m not in NEEDS_DNSPYTHON and m != "netserver.__main__"
    ]
    assert "netserver.smtp.protocol" in modules and "netserver.cli" in modules
    script = IMPORT_ALL.format(mail=MAIL_MODULES)
    done = run(str(python), "-I", "-c", script, *modules)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.split() == ["imported", str(len(modules))]

    done = run(str(venv / "bin" / "netserver"), "--help")
    assert done.returncode == 0, done.stderr
    assert "serve" in done.stdout
    done = run(str(python), "-I", "-m", "netserver", "--help")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: netserver ")

    # The one feature that needs dnspython says what to install, in one line (69).
    args = ["check", "--dns-server", "127.0.0.1:53", "--allow", ".example.com", "192.0.2.7"]
    done = run(str(venv / "bin" / "netserver"), *args)
    assert (done.returncode, done.stderr.strip().count("\n")) == (69, 0), done.stderr
    assert "pip install 'netserver[dns]'" in done.stderr
