"""Container health check for TorchServe that works with token authorization on.

TorchServe's ``/ping`` needs the inference key when token authorization is on (it answers 400
without it). The keys are random per start, written to ``key_file.json`` in the server's working
directory, and expire (60 minutes by default). So this check:

1. reads the key file (none: token authorization is off, ``/ping`` is called bare);
2. renews the inference key when it expires within ``--renew-before`` seconds, through the
   management API on loopback (``/token?type=inference`` with the file's non-expiring API key):
   TorchServe rewrites the key file, where other readers (the compose UI) pick the new key up;
3. calls ``/ping`` with the key. Exit 0 only on HTTP 200, i.e. every model has its workers up.

    python healthcheck.py [--url http://127.0.0.1:8080/ping] [--key-file key_file.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from datetime import UTC, datetime
from pathlib import Path


def http_status(url: str, key: str | None, timeout: float) -> int | None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError) as err:
        print(f"{url} unreachable: {err}", file=sys.stderr)
        return None


def seconds_left(entry: dict) -> float | None:
    try:  # Java's Instant.toString(), e.g. 2026-11-22T04:01:47.123456Z
        expires = datetime.fromisoformat(str(entry["expiration time"]))  # 3.11 reads Z and 9 digits
    except (KeyError, ValueError):
        return None
    return (expires - datetime.now(UTC)).total_seconds()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8080/ping")
    parser.add_argument("--management-url", default="http://127.0.0.1:8081", help="loopback management API")
    parser.add_argument("--key-file", default="key_file.json", help="relative to the working directory")
    parser.add_argument("--renew-before", type=float, default=600.0, help="seconds; 0 = never renew")
    parser.add_argument("--timeout", type=float, default=3.0)
    args = parser.parse_args(argv)
    key = None
    key_file = Path(args.key_file)
    if key_file.exists():
        try:
            keys = json.loads(key_file.read_text())
            key = keys["inference"]["key"]
        except (ValueError, KeyError, TypeError):
            print("key file not written yet", file=sys.stderr)  # TorchServe creates it before filling it
            return 1
        left = seconds_left(keys["inference"])
        api_key = (keys.get("API") or {}).get("key")
        if args.renew_before > 0 and left is not None and left < args.renew_before and api_key:
            status = http_status(f"{args.management_url}/token?type=inference", api_key, args.timeout)
            print(f"inference key expires in {left:.0f}s: renewal -> {status}")
            if status == 200:
                key = json.loads(key_file.read_text())["inference"]["key"]
    status = http_status(args.url, key, args.timeout)
    print(f"/ping -> {status}")
    return 0 if status == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
