"""The serve image's entrypoint: verify every archive of the model store, then exec TorchServe.

A ``.mar`` carries the handler code TorchServe executes, so no archive loads unless its sha256
matches its ``<name>.mar.sha256`` (signed with the HMAC key in ``MEDXAI_ARCHIVE_KEY_FILE`` when it
is set) or a separately stored ``--digests`` list (``MEDXAI_ARCHIVE_DIGESTS``, e.g. a ConfigMap).
A mismatch exits 1 with one line and TorchServe never starts. ``exec`` keeps TorchServe as PID 1,
so the image's STOPSIGNAL and the preStop hook behave as before.

    python /opt/medxai/entrypoint.py --model-store /home/model-server/model-store \
        --ts-config /opt/medxai/config.properties [other torchserve options]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="entrypoint.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-store", required=True, help="TorchServe model store folder (verified first)")
    parser.add_argument("--ts-config", help="TorchServe config.properties (passed on)")
    parser.add_argument("--digests", default=os.environ.get("MEDXAI_ARCHIVE_DIGESTS"),
                        help="separately stored sha256sum list (default: each archive's <name>.mar.sha256)")
    args, rest = parser.parse_known_args(argv)
    from medxplain_contract.integrity import ArchiveIntegrityError, read_digest_list, signing_key, verify_store

    try:
        digests = read_digest_list(Path(args.digests)) if args.digests else None
        checked = verify_store(Path(args.model_store), signing_key(), digests)
    except (ArchiveIntegrityError, OSError) as err:
        sys.exit(f"TorchServe not started: {err}")
    for name, sha in checked.items():
        print(f"verified {name} ({sha[:12]})", flush=True)
    cmd = ["torchserve", "--start", "--foreground", "--ncs", "--model-store", args.model_store]
    if args.ts_config:
        cmd += ["--ts-config", args.ts_config]
    os.execv(shutil.which("torchserve") or "torchserve", cmd + rest)


if __name__ == "__main__":
    main()
