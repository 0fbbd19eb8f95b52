"""``python -m devstack``: run MinIO, TorchServe and Orthanc (a local PACS) in the background, and the demo.

    start   start MinIO, TorchServe, Orthanc and the UI on 127.0.0.1, print endpoints, token file and credentials
    stop    stop what `start` started
    demo    start the stack, predict online, run both batch jobs into MinIO, start the UI
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from devstack.services import ServiceError
from devstack.stack import print_endpoints, start, start_ui, stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start MinIO, TorchServe and the UI in the background")
    p.add_argument("--model-store", type=Path, default=Path("build/model-store"))
    p.add_argument("--state", type=Path, default=Path("build/stack"))
    p = sub.add_parser("stop", help="stop the background services")
    p.add_argument("--state", type=Path, default=Path("build/stack"))
    p = sub.add_parser("demo", help="start the stack, predict, run the batch jobs, open the UI")
    p.add_argument("--build", type=Path, default=Path("build"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "start":
            start(args.state, args.model_store)
            print_endpoints(start_ui(args.state))
        elif args.command == "stop":
            stop(args.state)
        else:
            from devstack.demo import run_demo
            run_demo(args.build)
    except ServiceError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
