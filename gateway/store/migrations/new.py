"""Write a new migration by comparing the models with a database at head.

    python -m gateway.store.migrations.new "add column x"  [--db URL]

Uses a throw-away SQLite file unless --db is given, so it needs no server.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from alembic import command

from gateway.store.db import alembic_config, make_engine, upgrade_to_head


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("message")
    ap.add_argument("--db", default=None)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(args.db or f"sqlite:///{Path(tmp) / 'rev.db'}")
        upgrade_to_head(engine)
        with engine.begin() as conn:
            command.revision(alembic_config(conn), message=args.message, autogenerate=True)
        engine.dispose()


if __name__ == "__main__":
    main()
