"""``python -m harness.tracking import runs/clearml``: upload offline sessions to a server."""

from __future__ import annotations

import argparse
import logging
import sys

from harness.errors import HarnessError

from . import import_offline_sessions, install_log_redaction


def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m harness.tracking")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import offline session zips into the ClearML server")
    imp.add_argument("folder", nargs="?", default="runs/clearml")
    imp.add_argument("--force", action="store_true", help="re-import zips already imported")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    install_log_redaction()
    try:
        done = import_offline_sessions(args.folder, force=args.force)
    except HarnessError as exc:  # no server, unreachable server: one line, like `harness`
        print(f"error: {exc}", file=sys.stderr)
        return 2
    logging.getLogger("harness.tracking").info("imported %d session(s)", len(done))
    return 0


if __name__ == "__main__":
    sys.exit(main())
