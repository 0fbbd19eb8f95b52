"""Move model archives between a machine and object storage; used by the images and by people.

A model release lives under one S3 prefix in the layout KServe's TorchServe runtime also reads:

    s3://<bucket>/<release prefix>/config/config.properties
    s3://<bucket>/<release prefix>/model-store/<name>.mar      (+ .mar.json, .mar.sha256, .mar.sha256.sig)

Commands (storage settings from the ``MEDXAI_S3_*`` environment, see ``medxplain_contract/storage.py``):

    python archives.py buckets medxai medxai-models            create buckets that do not exist yet
    python archives.py upload --source build/model-store --dest s3://medxai-models/releases/1.0 \
        [--config docker/serve/config.properties]
    python archives.py fetch --source s3://medxai-models/releases/1.0 --dest /home/model-server/model-store \
        [--models ddsm,adni] [--digests digests.txt]
    python archives.py verify --store /home/model-server/model-store [--digests digests.txt]

Every uploaded object carries its sha256 in user metadata; ``fetch`` checks it (a torn download),
and then checks each archive against its ``<name>.mar.sha256`` signed with the HMAC key in
``MEDXAI_ARCHIVE_KEY_FILE`` (a Secret apart from any storage credential), or against a separately
stored ``--digests`` list. Without either it refuses: whoever can write the bucket could otherwise
ship Python code that TorchServe runs. ``verify`` repeats the check on a local folder.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path


def _sha256(path: Path) -> str:
    from medxplain_contract.integrity import sha256_file  # imported lazily like the other model_store helpers here

    return sha256_file(path)


def _bucket(url_or_name: str):
    """(Bucket, prefix) of ``s3://bucket/prefix`` or a bare bucket name, over the contract's storage layer.

    Imported here so `--help` works without the storage settings.
    """
    from medxplain_contract.storage import Bucket, S3Config, parse_s3_url

    name, prefix = parse_s3_url(url_or_name) if "://" in url_or_name else (url_or_name, "")
    return Bucket(S3Config.from_env(), name), prefix


def cmd_buckets(args: argparse.Namespace) -> None:
    for name in args.buckets:
        bucket, _ = _bucket(name)
        existed = bucket.exists_bucket()
        bucket.ensure(create=True)
        print(f"bucket {name}: {'exists' if existed else 'created'}")


SIDECARS = (".mar.json", ".mar.sha256", ".mar.sha256.sig")  # written by `python -m model_store archive`


def cmd_upload(args: argparse.Namespace) -> None:
    """Upload a model store folder; with MEDXAI_ARCHIVE_KEY_FILE, sign each checked digest on the way."""
    from medxplain_contract.integrity import ArchiveIntegrityError, signature, signing_key, verify_archive

    key = signing_key()
    source = Path(args.source)
    archives = sorted(source.glob("*.mar"))
    if not archives:
        sys.exit(f"no .mar archives in {args.source} (build them with `make archives`)")
    signatures = {}
    for mar in archives:
        try:
            verify_archive(mar)  # the local digest file must match before anyone signs it
        except ArchiveIntegrityError as err:
            sys.exit(f"refused: {err} (rebuild with `python -m model_store archive`)")
        if key:
            signatures[f"{mar.name}.sha256.sig"] = (signature(key, mar.with_name(mar.name + ".sha256").read_text())
                                                    + "\n").encode()
    bucket, prefix = _bucket(args.dest)
    files = archives + sorted(f for suffix in SIDECARS for f in source.glob(f"*{suffix}") if f.name not in signatures)
    uploads = [(f, f"model-store/{f.name}") for f in files]
    if args.config:
        uploads.append((Path(args.config), "config/config.properties"))
    bucket.ensure(create=True)

    def where(rel: str) -> str:
        return f"{prefix}/{rel}" if prefix else rel

    for path, rel in uploads:
        bucket.put_file(where(rel), path)
        print(f"uploaded s3://{bucket.name}/{where(rel)}")
    for name, body in signatures.items():
        bucket.put(where(f"model-store/{name}"), body)
        print(f"signed and uploaded s3://{bucket.name}/{where(f'model-store/{name}')}")


def _model_of(name: str) -> str:
    return name.split(".mar")[0]


def cmd_fetch(args: argparse.Namespace) -> None:
    """Download into a staging folder, verify every archive there, then move the files into place."""
    from medxplain_contract.integrity import ArchiveIntegrityError, read_digest_list, signing_key, verify_archive

    key = signing_key()
    digests = read_digest_list(Path(args.digests)) if args.digests else None
    if key is None and digests is None:
        sys.exit("refusing to fetch archives unverified: set MEDXAI_ARCHIVE_KEY_FILE (signed digests) "
                 "or pass --digests FILE (a separately stored sha256 list)")
    bucket, prefix = _bucket(args.source)
    store = f"{prefix}/model-store/" if prefix else "model-store/"
    wanted = {m.strip() for m in args.models.split(",") if m.strip()} if args.models else None
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".incoming-", dir=dest))  # same filesystem: moves are atomic
    try:
        fetched = []
        for object_key, _ in bucket.list(store):
            name = object_key[len(store):]
            if "/" in name or not name.endswith((".mar", *SIDECARS)):
                continue
            if wanted is not None and _model_of(name) not in wanted:
                continue
            expected = bucket.get_file(object_key, staging / name)
            actual = _sha256(staging / name)
            if expected and expected != actual:
                sys.exit(f"sha256 mismatch for s3://{bucket.name}/{object_key}: {actual} != {expected}")
            fetched.append(name)
        archives = [n for n in fetched if n.endswith(".mar")]
        missing = (wanted or set()) - {_model_of(n) for n in archives}
        if not archives or missing:
            sys.exit(f"no archive for {sorted(missing) or 'any model'} under s3://{bucket.name}/{store}")
        for name in archives:
            try:
                actual = verify_archive(staging / name, key, digests)
            except ArchiveIntegrityError as err:
                sys.exit(f"refused: {err}")
            print(f"verified {name} ({actual[:12]}, {'signed digest' if digests is None else 'digest list'})")
        for name in sorted(fetched, key=lambda n: n.endswith(".mar")):  # archives last
            (staging / name).replace(dest / name)  # atomic: TorchServe never sees a half-written archive
            print(f"fetched {name}")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def cmd_verify(args: argparse.Namespace) -> None:
    from medxplain_contract.integrity import ArchiveIntegrityError, read_digest_list, signing_key, verify_store

    try:
        digests = read_digest_list(Path(args.digests)) if args.digests else None
        checked = verify_store(Path(args.store), signing_key(), digests)
    except ArchiveIntegrityError as err:
        sys.exit(f"refused: {err}")
    if not checked:
        sys.exit(f"no .mar archives in {args.store}")
    for name, sha in checked.items():
        print(f"verified {name} ({sha[:12]})")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="archives.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("buckets", help="create buckets that do not exist yet")
    p.add_argument("buckets", nargs="+")
    p.set_defaults(func=cmd_buckets)
    p = sub.add_parser("upload", help="upload *.mar (+ digests, config) as a model release; signs the digests "
                       "when MEDXAI_ARCHIVE_KEY_FILE is set")
    p.add_argument("--source", required=True, help="folder holding <name>.mar files")
    p.add_argument("--dest", required=True, help="s3://bucket/release-prefix")
    p.add_argument("--config", help="config.properties stored as config/config.properties (KServe layout)")
    p.set_defaults(func=cmd_upload)
    p = sub.add_parser("fetch", help="download a release's archives into a model store folder")
    p.add_argument("--source", required=True, help="s3://bucket/release-prefix")
    p.add_argument("--dest", required=True, help="model store folder")
    p.add_argument("--models", help="comma list of model names (default: every archive of the release)")
    p.add_argument("--digests", help="separately stored sha256sum list to check the archives against "
                   "(default: the release's <name>.mar.sha256, signed with MEDXAI_ARCHIVE_KEY_FILE)")
    p.set_defaults(func=cmd_fetch)
    p = sub.add_parser("verify", help="check every archive of a model store folder against its digest")
    p.add_argument("--store", required=True, help="model store folder")
    p.add_argument("--digests", help="separately stored sha256sum list (default: <name>.mar.sha256 files)")
    p.set_defaults(func=cmd_verify)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:  # S3ConfigError: missing or malformed settings, a message for people
        sys.exit(str(err))


if __name__ == "__main__":
    main()
