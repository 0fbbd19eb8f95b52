"""Move model archives between a machine and object storage; used by the images and by people.

A model release lives under one S3 prefix in the layout KServe's TorchServe runtime also reads:

    s3://<bucket>/<release prefix>/config/config.properties
    s3://<bucket>/<release prefix>/model-store/<name>.mar      (+ <name>.mar.json digest files)

Commands (storage settings from the ``MEDXAI_S3_*`` environment, see ``medxplain_client/s3.py``):

    python archives.py buckets medxai medxai-models            create buckets that do not exist yet
    python archives.py upload --source build/model-store --dest s3://medxai-models/releases/1.0 \
        [--config docker/serve/config.properties]
    python archives.py fetch --source s3://medxai-models/releases/1.0 --dest /home/model-server/model-store \
        [--models ddsm,adni]

Every uploaded object carries its sha256 in user metadata; ``fetch`` checks it, so a torn or
tampered download stops the init container instead of serving a different model.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
from pathlib import Path

SHA_KEY = "x-amz-meta-sha256"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _storage():
    # Imported here so `--help` works without the storage settings.
    from medxplain_client.s3 import S3Config, parse_s3_url

    return S3Config.from_env().client(), parse_s3_url


def cmd_buckets(args: argparse.Namespace) -> None:
    client, _ = _storage()
    for bucket in args.buckets:
        if client.bucket_exists(bucket):
            print(f"bucket {bucket}: exists")
        else:
            client.make_bucket(bucket)
            print(f"bucket {bucket}: created")


def cmd_upload(args: argparse.Namespace) -> None:
    client, parse_s3_url = _storage()
    bucket, prefix = parse_s3_url(args.dest)
    files = sorted(Path(args.source).glob("*.mar")) + sorted(Path(args.source).glob("*.mar.json"))
    if not any(f.suffix == ".mar" for f in files):
        sys.exit(f"no .mar archives in {args.source} (build them with `make archives`)")
    uploads = [(f, f"model-store/{f.name}") for f in files]
    if args.config:
        uploads.append((Path(args.config), "config/config.properties"))
    if not client.bucket_exists(bucket):
        client.make_bucket(bucket)
    for path, rel in uploads:
        key = f"{prefix}/{rel}" if prefix else rel
        client.fput_object(bucket, key, str(path), metadata={"sha256": _sha256(path)})
        print(f"uploaded s3://{bucket}/{key}")


def cmd_fetch(args: argparse.Namespace) -> None:
    client, parse_s3_url = _storage()
    bucket, prefix = parse_s3_url(args.source)
    store = f"{prefix}/model-store/" if prefix else "model-store/"
    wanted = {m.strip() for m in args.models.split(",") if m.strip()} if args.models else None
    dest = Path(args.dest)
    dest.mkdir(parents=True, exist_ok=True)
    fetched = []
    for obj in client.list_objects(bucket, prefix=store):
        name = obj.object_name[len(store):]
        if "/" in name or not name.endswith((".mar", ".mar.json")):
            continue
        if wanted is not None and name.split(".mar")[0] not in wanted:
            continue
        part = dest / f".{name}.part"
        client.fget_object(bucket, obj.object_name, str(part))
        expected = (client.stat_object(bucket, obj.object_name).metadata or {}).get(SHA_KEY)
        actual = _sha256(part)
        if expected and expected != actual:
            part.unlink()
            sys.exit(f"sha256 mismatch for s3://{bucket}/{obj.object_name}: {actual} != {expected}")
        part.replace(dest / name)  # atomic: TorchServe never sees a half-written archive
        fetched.append(name)
        print(f"fetched {name} ({actual[:12]})")
    missing = (wanted or set()) - {n.split(".mar")[0] for n in fetched if n.endswith(".mar")}
    if not any(n.endswith(".mar") for n in fetched) or missing:
        sys.exit(f"no archive for {sorted(missing) or 'any model'} under s3://{bucket}/{store}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="archives.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("buckets", help="create buckets that do not exist yet")
    p.add_argument("buckets", nargs="+")
    p.set_defaults(func=cmd_buckets)
    p = sub.add_parser("upload", help="upload *.mar (+ .mar.json, config) as a model release")
    p.add_argument("--source", required=True, help="folder holding <name>.mar files")
    p.add_argument("--dest", required=True, help="s3://bucket/release-prefix")
    p.add_argument("--config", help="config.properties stored as config/config.properties (KServe layout)")
    p.set_defaults(func=cmd_upload)
    p = sub.add_parser("fetch", help="download a release's archives into a model store folder")
    p.add_argument("--source", required=True, help="s3://bucket/release-prefix")
    p.add_argument("--dest", required=True, help="model store folder")
    p.add_argument("--models", help="comma list of model names (default: every archive of the release)")
    p.set_defaults(func=cmd_fetch)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:  # S3ConfigError: missing or malformed settings, a message for people
        sys.exit(str(err))


if __name__ == "__main__":
    main()
