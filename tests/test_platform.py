"""The core as a platform: a service is one package plus one registration.

The toy service (tests/support/toy) is registered here, in the tests, beside the real ones; it
gets ``keel serve``, ``keel run``, ``keel db upgrade``, API keys, its own CLI group, a bench
command and a ``/ready`` that checks its migrations, with no edit to ``keel.core`` or ``keel.cli``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

import keel
from keel.cli import build_app
from keel.registry import services
from tests.support.live_server import free_port, wait_until
from tests.support.toy.app import ToySettings, create_app
from tests.support.toy.registration import SERVICE as TOY

ROOT = Path(__file__).resolve().parents[1]
CORE = Path(keel.__file__).parent / "core"
runner = CliRunner(env={"COLUMNS": "200"})  # wide enough for every service name in a help line
cli = build_app({**services(), "toy": TOY})


def test_core_names_no_service() -> None:
    names = {*services(), "ledger", "firehose", "inventory"}
    word = re.compile(rf"\b({'|'.join(sorted(names))})\b")
    found = [
        f"{path.relative_to(CORE)}:{n}: {line.strip()}"
        for path in sorted(CORE.rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if word.search(line)
    ]
    assert found == []


def test_keel_help_loads_no_app_database_or_server() -> None:
    probe = (
        "import sys, keel.cli; heavy = ('sqlalchemy', 'alembic', 'uvicorn', 'fastapi', 'httpx');"
        " print(sorted(m for m in heavy if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "[]"


def test_the_toy_gets_every_command() -> None:
    helps = {
        args[0] if args else "keel": runner.invoke(cli, [*args, "--help"]).output
        for args in ([], ["serve"], ["db", "upgrade"], ["apikey", "create"], ["bench"], ["prove"])
    }
    assert re.search(r"toy\s+Notes, for the platform's tests\.", helps["keel"])
    assert "ledger" in helps["keel"]  # registered services stay beside it
    for command in ("serve", "db", "apikey"):
        assert "toy" in helps[command], command
    assert re.search(r"^│ toy ", helps["bench"], re.M), helps["bench"]
    assert re.search(r"^│ toy\s+Check that the database holds", helps["prove"], re.M)
    assert re.search(r"^│ inventory ", helps["prove"], re.M), helps["prove"]


async def _ready(url: str) -> httpx.Response:
    app = create_app(ToySettings(database_url=url, access_log=False))
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://toy") as c,
    ):
        return await c.get("/ready")


def test_db_upgrade_readiness_keys_and_cli_group_for_the_toy(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'toy.db'}"
    before = asyncio.run(_ready(url))
    assert before.status_code == 503
    assert "migrations pending for: core, toy" in before.json()["detail"]

    upgraded = runner.invoke(cli, ["db", "upgrade", "toy", "--database-url", url])
    assert upgraded.exit_code == 0, upgraded.output
    assert "toy: schema up to date" in upgraded.output
    assert asyncio.run(_ready(url)).status_code == 200

    created = runner.invoke(
        cli, ["apikey", "create", "--scope", "write", "--service", "toy", "--database-url", url]
    )
    assert created.exit_code == 0, created.output
    counted = runner.invoke(cli, ["toy", "count", "--database-url", url])
    assert counted.exit_code == 0, counted.output
    assert "0 notes" in counted.output
    proven = runner.invoke(cli, ["prove", "toy", "--notes", "0", "--database-url", url])
    assert proven.exit_code == 0, proven.output
    refuted = runner.invoke(cli, ["prove", "toy", "--notes", "1", "--database-url", url])
    assert refuted.exit_code == 1, refuted.output
    assert "0 notes, 1 expected" in refuted.output


@pytest.fixture
def stopped_on_exit() -> Iterator[list[subprocess.Popen[bytes]]]:
    processes: list[subprocess.Popen[bytes]] = []
    yield processes
    for process in processes:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)


def _toy_keel(
    args: list[str], cwd: Path, env: dict[str, str], log: Path
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-c", "from tests.support.toy.main import app; app()", *args],
            cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT), "KEEL_ACCESS_LOG": "false", **env},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _serving(process: subprocess.Popen[bytes], url: str, log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"exited {process.returncode}: {log.read_text()}")
    try:
        return httpx.get(url, timeout=2.0).status_code == 200
    except httpx.TransportError:
        return False


def test_keel_serve_runs_the_toy_migrated(
    tmp_path: Path, stopped_on_exit: list[subprocess.Popen[bytes]]
) -> None:
    url, port, log = f"sqlite:///{tmp_path / 'served.db'}", free_port(), tmp_path / "serve.log"
    args = ["serve", "toy", "--port", str(port), "--database-url", url]
    stopped_on_exit.append(process := _toy_keel(args, ROOT, {}, log))
    ready = f"http://127.0.0.1:{port}/ready"
    wait_until(lambda: _serving(process, ready, log), 120, ready)  # SQLite: migrated by serve
    created = runner.invoke(cli, ["apikey", "create", "--scope", "write", "--database-url", url])
    headers = {"Authorization": f"Bearer {created.output.strip().splitlines()[-1]}"}
    posted = httpx.post(f"http://127.0.0.1:{port}/notes", json={"text": "hi"}, headers=headers)
    assert posted.status_code == 201, posted.text
    assert "1 notes" in runner.invoke(cli, ["toy", "count", "--database-url", url]).output


def test_keel_run_starts_every_registered_service(
    tmp_path: Path, stopped_on_exit: list[subprocess.Popen[bytes]]
) -> None:
    """With only the toy registered, ``keel run`` serves it on its port with a dev admin key."""
    port, log = free_port(), tmp_path / "run.log"
    env = {"TOY_ONLY": "1", "TOY_TEST_PORT": str(port)}
    stopped_on_exit.append(process := _toy_keel(["run"], tmp_path, env, log))
    ready = f"http://127.0.0.1:{port}/ready"
    wait_until(lambda: _serving(process, ready, log), 120, ready)
    key = (tmp_path / "data" / "dev-admin-key").read_text().strip()
    counted = httpx.get(
        f"http://127.0.0.1:{port}/notes/count", headers={"Authorization": f"Bearer {key}"}
    )
    assert counted.json() == {"count": 0}
    assert (tmp_path / "data" / "toy.db").exists()


def test_the_toy_benches_its_own_scenarios_beside_the_references() -> None:
    refused = runner.invoke(cli, ["bench", "toy", "--scenario", "nosuch"])
    assert refused.exit_code == 2
    choices = refused.output.split("choose from", 1)[1]
    assert "sqlite-notes" in choices and "reference-bare" in choices
    assert "sqlite-post-spread" not in choices  # the ledger's stay the ledger's
