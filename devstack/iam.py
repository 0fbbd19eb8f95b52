"""One storage identity per component, with an IAM policy that allows only what that component does.

| component | may | may not |
| --- | --- | --- |
| ``ui`` | list and read ``runs/`` and ``annotations/``, add objects under ``annotations/`` | delete anything, write runs, inputs or models, read or list models or inputs (their keys are the hospital's file names), read a run's ``private/`` objects |
| ``batch`` | read ``inputs/``, ``runs/`` and the models bucket; write and delete under ``runs/`` | write models or annotations |
| ``serve`` | list and read the models bucket | write anything, read results |
| ``release`` | read and write ``releases/`` of the models bucket (publishing archives) | touch results |

Bucket creation, policies and users stay with the storage administrator (MinIO's root user); no
component holds those credentials. Annotations cannot be overwritten by accident (each save is a
new key with a uuid, see ``ui/annotations.py``); with one UI identity for all annotators, "only
your own objects" is not expressible in the store's policy language, so that rule lives in the UI.

The policies are plain AWS IAM JSON, so they also work on external S3 (``policies`` writes them).
MinIO's admin API is driven with the ``minio`` SDK's :class:`minio.minioadmin.MinioAdmin`.

    python -m devstack.iam apply --credentials-dir /run/secrets [--results-bucket medxai] [--models-bucket medxai-models]
    python -m devstack.iam policies --out build/policies
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

COMPONENTS = ("ui", "batch", "serve", "release")
RESULTS_BUCKET, MODELS_BUCKET = "medxai", "medxai-models"


def _arn(*parts: str) -> str:
    return "arn:aws:s3:::" + "/".join(parts)


def policy(component: str, results: Iterable[str] = (RESULTS_BUCKET,), models: Iterable[str] = (MODELS_BUCKET,)) -> dict:
    """The IAM policy document of one component over the given results and models buckets."""
    results, models = list(results), list(models)

    def buckets(names: list[str]) -> dict:  # GetBucketLocation: the SDK asks for the region first
        return {"Effect": "Allow", "Action": ["s3:GetBucketLocation", "s3:ListBucket"],
                "Resource": [_arn(b) for b in names]}

    def objects(actions: list[str], keys: list[str]) -> dict:
        return {"Effect": "Allow", "Action": actions, "Resource": [_arn(k) for k in keys]}

    if component == "ui":
        statements = [{"Effect": "Allow", "Action": ["s3:GetBucketLocation"], "Resource": [_arn(b) for b in results]},
                      {"Effect": "Allow", "Action": ["s3:ListBucket"], "Resource": [_arn(b) for b in results],
                       "Condition": {"StringLike": {"s3:prefix": ["runs", "runs/*", "annotations", "annotations/*"]}}},
                      objects(["s3:GetObject"], [f"{b}/{p}/*" for b in results for p in ("runs", "annotations")]),
                      objects(["s3:PutObject"], [f"{b}/annotations/*" for b in results]),
                      # a run's private/ objects map pseudonymous ids back to source keys: never for the UI
                      {"Effect": "Deny", "Action": ["s3:GetObject"],
                       "Resource": [_arn(f"{b}/runs/*/private/*") for b in results]}]
    elif component == "batch":
        statements = [buckets(results + models),
                      objects(["s3:GetObject"], [f"{b}/{p}/*" for b in results for p in ("inputs", "runs")]
                              + [f"{b}/*" for b in models]),
                      objects(["s3:PutObject", "s3:DeleteObject"], [f"{b}/runs/*" for b in results])]
    elif component == "serve":
        statements = [buckets(models), objects(["s3:GetObject"], [f"{b}/*" for b in models])]
    elif component == "release":
        statements = [buckets(models), objects(["s3:GetObject", "s3:PutObject"], [f"{b}/releases/*" for b in models])]
    else:
        raise ValueError(f"unknown component {component!r} (one of {', '.join(COMPONENTS)})")
    return {"Version": "2012-10-17", "Statement": statements}


def policy_name(component: str) -> str:
    return f"medxai-{component}"


@dataclass(frozen=True)
class Credentials:
    access_key: str
    secret_key: str = field(repr=False)

    @classmethod
    def generate(cls, component: str) -> Credentials:
        return cls(f"medxai-{component}-{secrets.token_hex(4)}", secrets.token_urlsafe(24))

    @classmethod
    def from_dir(cls, directory: Path, component: str) -> Credentials:
        """``<component>_s3_access_key`` / ``_secret_key`` files (compose secrets, projected Secrets)."""
        try:
            return cls(*(Path(directory, f"{component}_s3_{k}").read_text().strip() for k in ("access_key", "secret_key")))
        except OSError as err:
            raise ValueError(f"cannot read the {component} credentials in {directory}: {err.strerror}") from None


def admin_client(config):
    """MinioAdmin for an :class:`medxplain_contract.storage.S3Config` holding the administrator's keys."""
    from minio.credentials import StaticProvider
    from minio.minioadmin import MinioAdmin

    return MinioAdmin(endpoint=config.host, credentials=StaticProvider(config.access_key, config.secret_key),
                      secure=config.secure, region=config.region or "")


def apply(config, users: dict[str, Credentials], results: Iterable[str] = (RESULTS_BUCKET,),
          models: Iterable[str] = (MODELS_BUCKET,)) -> None:
    """Create the buckets, one policy and one user per component, and attach them (idempotent)."""
    from minio.error import MinioAdminException

    results, models = list(results), list(models)
    from medxplain_contract.storage import Bucket

    admin = admin_client(config)
    for bucket in results + models:
        Bucket(config, bucket).ensure(create=True)
    for component, creds in users.items():
        name = policy_name(component)
        admin.policy_add(name, policy=policy(component, results, models))
        admin.user_add(creds.access_key, creds.secret_key)
        try:
            admin.attach_policy([name], user=creds.access_key)
        except MinioAdminException as err:  # re-applying: the policy is attached already
            if "already" not in str(err).lower():
                raise


def _apply(args: argparse.Namespace) -> None:
    from medxplain_contract.storage import S3Config

    users = {c: Credentials.from_dir(args.credentials_dir, c) for c in args.components.split(",") if c}
    apply(S3Config.from_env(), users, args.results_bucket.split(","), args.models_bucket.split(","))
    for component, creds in users.items():
        print(f"{component}: user {creds.access_key} with policy {policy_name(component)}")


def _policies(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    for component in COMPONENTS:
        path = args.out / f"{policy_name(component)}.json"
        doc = policy(component, args.results_bucket.split(","), args.models_bucket.split(","))
        path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.iam", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("apply", help="create buckets, per-component users and policies (MinIO admin API; "
                       "administrator credentials from MEDXAI_S3_*)")
    p.add_argument("--credentials-dir", type=Path, required=True,
                   help="folder with <component>_s3_access_key and <component>_s3_secret_key files")
    p.add_argument("--components", default=",".join(COMPONENTS), help="comma list (default: all)")
    p.add_argument("--results-bucket", default=RESULTS_BUCKET, help="comma list of results buckets")
    p.add_argument("--models-bucket", default=MODELS_BUCKET, help="comma list of model buckets")
    p.set_defaults(func=_apply)
    p = sub.add_parser("policies", help="write the policy documents as JSON (for external S3)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--results-bucket", default=RESULTS_BUCKET)
    p.add_argument("--models-bucket", default=MODELS_BUCKET)
    p.set_defaults(func=_policies)
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:  # S3ConfigError, unknown component, unreadable credentials
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
