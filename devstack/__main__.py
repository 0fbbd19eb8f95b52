"""``python -m devstack``: run MinIO and TorchServe locally in the background, and the demo.

    start   start MinIO and TorchServe on 127.0.0.1, print endpoints, token file and credentials
    stop    stop what `start` started
    demo    start the stack and send one prediction to each model
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from devstack.services import ServiceError
from devstack.stack import print_endpoints, start, stop


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="start MinIO and TorchServe in the background")
    p.add_argument("--model-store", type=Path, default=Path("build/model-store"))
    p.add_argument("--state", type=Path, default=Path("build/stack"))
    p = sub.add_parser("stop", help="stop the background services")
    p.add_argument("--state", type=Path, default=Path("build/stack"))
    p = sub.add_parser("demo", help="start the stack and run one prediction per model")
    p.add_argument("--build", type=Path, default=Path("build"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "start":
            print_endpoints(start(args.state, args.model_store))
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
