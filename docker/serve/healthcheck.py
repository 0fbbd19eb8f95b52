"""Container health check for TorchServe that works with token authorization on.

TorchServe's ``/ping`` needs the inference key when token authorization is on (it answers 400
without it), and the key is random per start, written to ``key_file.json`` in the server's working
directory. This reads that file when it exists and sends the key; with token authorization off (no
key file) it calls ``/ping`` bare. Exit 0 only on HTTP 200, i.e. every model has its workers up.

    python healthcheck.py [--url http://127.0.0.1:8080/ping] [--key-file key_file.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080/ping")
    parser.add_argument("--key-file", default="key_file.json", help="relative to the working directory")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    headers = {}
    key_file = Path(args.key_file)
    if key_file.exists():
        try:
            headers["Authorization"] = f"Bearer {json.loads(key_file.read_text())['inference']['key']}"
        except (ValueError, KeyError, TypeError):
            print("key file not written yet", file=sys.stderr)  # TorchServe creates it before filling it
            return 1
    try:
        with urllib.request.urlopen(urllib.request.Request(args.url, headers=headers), timeout=args.timeout) as r:
            status = r.status
    except urllib.error.HTTPError as err:
        status = err.code
    except (urllib.error.URLError, OSError) as err:
        print(f"unreachable: {err}", file=sys.stderr)
        return 1
    print(f"/ping -> {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
