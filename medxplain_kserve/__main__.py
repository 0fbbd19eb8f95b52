"""``python -m medxplain_kserve``: serve the model store's archives with KServe's ModelServer (OIP v1/v2, gRPC)."""

from __future__ import annotations

import argparse
import logging
import secrets
import sys
from pathlib import Path

MAX_REQUEST_BYTES = 64 * 1024 * 1024  # as TorchServe's max_request_size (docker/serve/config.properties)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m medxplain_kserve", description=__doc__,
                                epilog="Each archive must match its <name>.mar.sha256 (and signature with "
                                       "MEDXAI_ARCHIVE_KEY_FILE), as for TorchServe. Token auth is on unless --no-auth.")
    p.add_argument("--model-store", type=Path, required=True, help="folder with <name>.mar and <name>.mar.sha256")
    p.add_argument("--models", default="ddsm,adni", help="comma-separated archive names to serve (default: %(default)s)")
    p.add_argument("--host", default="127.0.0.1", help="listen address of both servers (default: %(default)s)")
    p.add_argument("--http-port", type=int, default=8080, help="REST port: v1 and v2 (default: %(default)s)")
    p.add_argument("--grpc-port", type=int, default=8081, help="gRPC port: OIP GRPCInferenceService (default: %(default)s)")
    auth = p.add_mutually_exclusive_group(required=True)
    auth.add_argument("--token-file", type=Path, help="file holding the bearer token (created with a random token "
                      "if missing, mode 0600)")
    auth.add_argument("--no-auth", action="store_true", help="no token check: only behind an authenticating ingress")
    p.add_argument("--max-request-bytes", type=int, default=MAX_REQUEST_BYTES,
                   help="larger REST bodies get 413 before they are read; gRPC message limit (default: %(default)s)")
    return p.parse_args(argv)


def read_or_create_token(path: Path) -> str:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.touch(mode=0o600)
        path.write_text(secrets.token_urlsafe(32) + "\n")
    token = path.read_text().strip()
    if len(token) < 16:
        raise SystemExit(f"error: the token in {path} is shorter than 16 characters")
    return token


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.argv = sys.argv[:1]  # kserve parses sys.argv when imported: it must not see our options
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    token = None if args.no_auth else read_or_create_token(args.token_file)
    from batch.archive import ArchiveError
    from medxplain_kserve.model import EngineModel
    from medxplain_kserve.server import GuardedModelServer

    models = []
    for name in [n.strip() for n in args.models.split(",") if n.strip()]:
        model = EngineModel(name, args.model_store / f"{name}.mar")
        try:
            model.load()
        except ArchiveError as err:  # missing, tampered or unsafe archive: one line, nothing served
            print(f"error: not serving {name}: {err}", file=sys.stderr)
            return 2
        models.append(model)
    GuardedModelServer(args.host, args.http_port, args.grpc_port, token, args.max_request_bytes).start(models)
    return 0


if __name__ == "__main__":
    sys.exit(main())
