"""devstack.load (the load test in `make bench`) against the session's real TorchServe, briefly.

The burst here is small (20 requests from 20 clients): it checks that every kind of request in the
mix is answered without an error and that the percentiles are printed, not how fast they are.
"""

from __future__ import annotations

from collections import Counter

import pytest

from devstack.load import DEFAULT_CONCURRENCY, KINDS, label, main, schedule
from devstack.services import BASE_TORCHSERVE_CONFIG, TorchServeServer, free_port, read_properties


def _args(torchserve, ddsm_data, adni_data, *extra: str) -> list[str]:
    return ["--url", torchserve.inference_url, "--grpc", f"127.0.0.1:{torchserve.grpc_port}",
            "--ddsm-data", str(ddsm_data), "--adni-data", str(adni_data), *extra]


def _table(out: str) -> dict[str, list[str]]:
    """Rows of the printed table: label -> [n, errors, p50, p95, p99]."""
    names = [label(k) for k in KINDS] + ["all"]
    rows = {}
    for line in out.splitlines():
        for name in names:
            if line.startswith(f"  {name} ") and line[2 + len(name):].split()[0].isdigit():
                rows[name] = line[2 + len(name):].split()
    return rows


@pytest.fixture(autouse=True)
def _no_token_from_env(monkeypatch):
    monkeypatch.delenv("MEDXPLAIN_TOKEN", raising=False)


def test_a_mixed_burst_over_rest_and_grpc_has_no_errors(torchserve, ddsm_data, adni_data, capsys):
    rc = main(_args(torchserve, ddsm_data, adni_data, "--key-file", str(torchserve.key_file),
                    "--requests", "20", "--concurrency", "20", "--time-limit", "900"))
    out = capsys.readouterr().out
    assert rc == 0, out
    header = next(line for line in out.splitlines() if "p50 ms" in line)
    assert all(f"{p} ms" in header for p in ("p50", "p95", "p99")), out
    rows = _table(out)
    assert set(rows) == {label(k) for k in KINDS} | {"all"}, out
    for name, (n, errors, *ms) in rows.items():
        assert int(n) >= 1 and int(errors) == 0, (name, out)
        p50, p95, p99 = map(float, ms)
        assert 0 < p50 <= p95 <= p99, (name, out)
    assert int(rows["all"][0]) == 20
    assert "errors 0" in out and "requests/s" in out


def test_refused_requests_fail_the_run_and_only_status_codes_are_printed(torchserve, ddsm_data, adni_data,
                                                                         capsys, monkeypatch):
    monkeypatch.setenv("MEDXPLAIN_TOKEN", "not-the-key")
    rc = main(_args(torchserve, ddsm_data, adni_data, "--requests", "10", "--concurrency", "10", "--no-warmup"))
    out = capsys.readouterr().out
    assert rc == 1, out
    first = next(line for line in out.splitlines() if "first errors:" in line)
    statuses = {entry.rpartition(": ")[2] for entry in first.split("first errors: ")[1].split("; ")}
    # TorchServe 0.12 refuses a wrong token with HTTP 400 over REST and PERMISSION_DENIED over gRPC.
    assert statuses == {"400", "grpc PERMISSION_DENIED"}, out
    assert "Authorization failed" not in out, out  # TorchServe's message (the body) is not echoed
    assert int(_table(out)["all"][1]) == 10


def test_nothing_is_sent_after_the_time_limit(ddsm_data, adni_data, capsys):
    port = free_port()  # nothing listens there: a request that were sent would fail as connection_failed
    rc = main(["--url", f"http://127.0.0.1:{port}", "--grpc", f"127.0.0.1:{port}", "--ddsm-data", str(ddsm_data),
               "--adni-data", str(adni_data), "--requests", "30", "--concurrency", "5", "--no-warmup",
               "--time-limit", "0.000001"])
    out = capsys.readouterr().out
    assert rc == 1
    assert "not_sent_time_limit" in out and "connection_failed" not in out, out
    assert _table(out)["all"][:2] == ["30", "30"]


def test_a_remote_server_is_refused(ddsm_data, adni_data, capsys):
    with pytest.raises(SystemExit) as caught:
        main(["--url", "http://192.0.2.1:8080", "--grpc", "192.0.2.1:7070", "--ddsm-data", str(ddsm_data),
              "--adni-data", str(adni_data)])
    assert caught.value.code == 2 and "loopback" in capsys.readouterr().err


def test_the_mix_interleaves_every_kind_by_weight():
    total = sum(k.weight for k in KINDS)
    assert {label(k) for k in schedule(KINDS, total)} == {label(k) for k in KINDS}
    counts = Counter(label(k) for k in schedule(KINDS, 200))
    for kind in KINDS:
        assert abs(counts[label(kind)] - 200 * kind.weight / total) < 1, counts
    transports = {k.transport for k in KINDS}
    assert transports == {"rest-raw", "rest-multipart", "rest-json", "grpc"}
    assert {k.model for k in KINDS} == {"ddsm", "adni"} and {k.input for k in KINDS} == {"patch", "full", "volume"}


def test_the_job_queue_holds_the_default_burst(tmp_path):
    """A full job queue answers 503: the image's config and the devstack's must fit the burst."""
    image = int(read_properties(BASE_TORCHSERVE_CONFIG)["job_queue_size"])
    devstack = int(TorchServeServer(workdir=tmp_path, model_store=tmp_path, models={}).config()["job_queue_size"])
    assert image == devstack >= DEFAULT_CONCURRENCY
