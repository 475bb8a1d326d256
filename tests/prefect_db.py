"""A Prefect server database with every migration applied, made once per test session and copied for each server a
test starts.

Every test starts its Prefect servers on a fresh PREFECT_HOME, and on a fresh database a server's start-up runs all
of Prefect's migrations and registers its block types: most of the CPU time of a start. A copy of a database that
has been through both starts like a user's second `make server`: the migrations find nothing to do. The servers are
real and unchanged; only the file they open already holds Prefect's schema.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from filelock import FileLock

TEMPLATE_ENV = "CTCOMPARE_TESTS_PREFECT_DB"  # where the template is, for the test processes and their children
DEFAULT_DATABASE = "prefect.db"  # the file of Prefect's default connection URL, in PREFECT_HOME

# The two start-up steps of prefect.server.api.server.create_app's lifespan (run_migrations, add_block_types).
_MIGRATE = """
import asyncio, os, sys
os.environ["PREFECT_SERVER_DATABASE_CONNECTION_URL"] = "sqlite+aiosqlite:///" + sys.argv[1]
from prefect.server.database import provide_database_interface
from prefect.server.models.block_registration import run_block_auto_registration

async def main():
    db = provide_database_interface()
    await db.create_db()
    session = await db.session()
    async with session:
        await run_block_auto_registration(session=session)

asyncio.run(main())
"""


def migrated_database(shared_dir: Path) -> Path:
    """shared_dir/prefect-VERSION-template.db, made by the first test process that asks (the others wait on its
    lock)."""
    template = Path(shared_dir) / f"prefect-{version('prefect')}-template.db"  # another Prefect, another schema
    with FileLock(str(template) + ".lock"):
        if not template.is_file():
            partial = template.with_name(f"{template.stem}.partial.db")
            partial.unlink(missing_ok=True)
            env = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
            env["PREFECT_HOME"] = str(Path(shared_dir) / "prefect-template-home")
            env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
            subprocess.run([sys.executable, "-c", _MIGRATE, str(partial)], check=True, env=env, timeout=600,
                           stdin=subprocess.DEVNULL, capture_output=True)
            partial.rename(template)
    return template


def seed_database(directory: Path, name: str = DEFAULT_DATABASE) -> None:
    """Copy the session's template (TEMPLATE_ENV) to directory/name unless a database is there already; without a
    template, nothing (the server then migrates a fresh database itself)."""
    template = os.environ.get(TEMPLATE_ENV)
    target = Path(directory) / name
    if template and Path(template).is_file() and not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(template, target)
