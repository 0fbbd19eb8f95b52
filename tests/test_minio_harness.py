"""The MinIO fixture is a real server with non-default credentials on a loopback port."""

from __future__ import annotations

import io

import pytest
from minio import Minio
from minio.error import S3Error


def test_object_round_trip(minio_server):
    client = minio_server.client()
    client.make_bucket("harness")
    client.put_object("harness", "a/b.txt", io.BytesIO(b"hello"), length=5)
    assert client.get_object("harness", "a/b.txt").read() == b"hello"
    assert minio_server.access_key != "minioadmin"


def test_wrong_credentials_are_refused(minio_server):
    intruder = Minio(minio_server.endpoint, access_key="minioadmin", secret_key="minioadmin", secure=False)
    with pytest.raises(S3Error):
        intruder.list_buckets()
