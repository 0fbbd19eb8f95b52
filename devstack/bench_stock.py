"""Reference for ``make bench``: stock TorchServe's ``image_classifier`` handler on the same ResNet weights.

Builds, in a temp dir, a TorchScript torchvision ResNet carrying the ddsm archive's weights (the
parameter names are torchvision's), archives it with ``--handler image_classifier`` and times the
same handler class REST vs in-process (``ts.context.Context``, as TorchServe's worker builds it),
alternating request by request. It shows what TorchServe itself costs per request on this machine,
whatever the handler does. Differences from ours, all on both of its sides: the stock handler
resizes to 256 and crops 224 (an 8-bit RGB copy of the same patch is sent), pools by average and
returns its top 5 classes, so the head is padded to 5 outputs (2 of them never win).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import requests
import torch
from PIL import Image
from torch import nn
from torchvision import models

from devstack.bench import percentiles, sample_patch, timed
from devstack.services import TorchServeServer
from medxplain_contract.integrity import signing_key, write_digest
from medxplain_models.bundle import ModelBundle

STOCK_CLASSES = 5  # ImageClassifier.topk: torch.topk fails on fewer classes


def stock_model(model_dir: Path) -> nn.Module:
    """torchvision ResNet of the bundle's depth with its weights; head padded to STOCK_CLASSES outputs."""
    bundle = ModelBundle.load(model_dir)
    net = getattr(models, f"resnet{bundle.model.config.depth}")(weights=None, num_classes=STOCK_CLASSES)
    state = {k: v for k, v in bundle.model.state_dict().items() if not k.startswith("fc.")}
    net.load_state_dict(state, strict=False)
    with torch.no_grad():
        fc = bundle.model.fc
        net.fc.weight.zero_()
        net.fc.bias.fill_(-1e4)
        net.fc.weight[:fc.out_features] = fc.weight
        net.fc.bias[:fc.out_features] = fc.bias
    return net.eval()


def build_archive(model_dir: Path, out: Path, threads: int) -> Path:
    """stock.mar (TorchScript + image_classifier) in ``out``, with its sha256 as every loader needs."""
    traced = torch.jit.trace(stock_model(model_dir), torch.zeros(1, 3, 224, 224))
    traced.save(str(out / "stock.pt"))
    (out / "stock.yaml").write_text(f"minWorkers: 1\nmaxWorkers: 1\nbatchSize: 1\nmaxBatchDelay: 1\n"
                                    f"# threads: {threads} (the worker's default = cores)\n")
    store = out / "store"
    store.mkdir()
    archiver = Path(sys.executable).with_name("torch-model-archiver")
    subprocess.run([str(archiver), "--model-name", "stock", "--version", "1", "--serialized-file", str(out / "stock.pt"),
                    "--handler", "image_classifier", "--config-file", str(out / "stock.yaml"),
                    "--export-path", str(store), "-f"], check=True)
    mar = store / "stock.mar"
    write_digest(mar, signing_key())
    return mar


def in_process_handler(mar: Path, workdir: Path):
    """The stock handler initialised the way TorchServe's worker does, in this process."""
    import ts
    from ts.context import Context, RequestProcessor
    from ts.metrics.metric_cache_yaml_impl import MetricsCacheYamlImpl
    from ts.torch_handler.image_classifier import ImageClassifier
    from ts.utils.util import get_yaml_config

    model_dir = workdir / "stock-model"
    with zipfile.ZipFile(mar) as zf:
        zf.extractall(model_dir)
    manifest = json.loads((model_dir / "MAR-INF" / "MANIFEST.json").read_text())
    metrics = MetricsCacheYamlImpl(str(Path(ts.__file__).parent / "configs" / "metrics.yaml"))
    metrics.initialize_cache()
    config = get_yaml_config(str(model_dir / manifest["model"]["configFile"]))  # as ts.service.Service reads it
    context = Context("stock", str(model_dir), manifest, 1, None, ts.__version__, metrics=metrics,
                      model_yaml_config=config)
    handler = ImageClassifier()
    handler.initialize(context)
    # what ts.service.Service.predict sets before every call, for a batch of one request
    context.request_processor = [RequestProcessor({"body": {"content-type": "application/octet-stream"}})]
    context.request_ids = metrics.request_ids = {0: "bench"}
    return lambda body: handler.handle([{"body": body}], context)


def rgb_patch(data_dir: Path) -> bytes:
    """The bench's patch as an 8-bit RGB PNG (what the stock handler's ImageNet transform takes)."""
    import io

    grey = np.asarray(Image.open(io.BytesIO(sample_patch(data_dir))), dtype=np.float32)
    eight = np.clip(grey / max(float(grey.max()), 1.0) * 255, 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(eight).convert("RGB").save(buf, "PNG")
    return buf.getvalue()


def bench_stock(mar: Path, data_dir: Path, n: int, threads: int) -> tuple[list[float], list[float]]:
    torch.set_num_threads(threads)
    payload = rgb_patch(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        with zipfile.ZipFile(mar) as zf:
            zf.extractall(work / "ddsm-model")
        stock = build_archive(work / "ddsm-model", work, threads)
        local_call = in_process_handler(stock, work)
        server = TorchServeServer(workdir=work / "ts", model_store=stock.parent, models={"stock": stock.name})
        server.start()
        try:
            session, headers = requests.Session(), server.auth_header()
            url = f"{server.inference_url}/predictions/stock"

            def rest_call() -> None:
                session.post(url, data=payload, headers=headers, timeout=120).raise_for_status()

            for _ in range(3):
                local_call(payload)
                rest_call()
            local, remote = [], []
            for i in range(n):
                for side in (("local", "rest") if i % 2 == 0 else ("rest", "local")):
                    if side == "local":
                        local.append(timed(lambda: local_call(payload))[0])
                    else:
                        remote.append(timed(rest_call)[0])
        finally:
            server.stop()
    return local, remote


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m devstack.bench_stock", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mar", type=Path, default=Path("build/model-store/ddsm.mar"), help="the ddsm archive")
    parser.add_argument("--data", type=Path, default=Path("build/data/ddsm"))
    parser.add_argument("-n", type=int, default=60, help="requests per side")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads in-process")
    args = parser.parse_args(argv)
    local, remote = bench_stock(args.mar, args.data, args.n, args.threads)
    lp, rp = percentiles(local), percentiles(remote)
    print(f"\nReference: stock TorchServe image_classifier, same ResNet weights, {args.n} requests per side, alternating")
    print(f"  {'':24}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}")
    print(f"  {'in-process handler':24}" + "".join(f"{v:10.1f}" for v in lp))
    print(f"  {'TorchServe REST':24}" + "".join(f"{v:10.1f}" for v in rp))
    print(f"  {'ratio REST / in-process':24}" + "".join(f"{r / lo:9.2f}x" for r, lo in zip(rp, lp)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
