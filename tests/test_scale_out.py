"""Scale-out: `serve --no-worker` and a separate `dicom-node worker`, Redis broker, PostgreSQL state."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import pytest
from sqlalchemy import select

from dicom_node.db import Job, JobStatus, NodeDatabase
from tests.conftest import dcmtk_tool, run_tool, sample_file, wait_for

pytestmark = pytest.mark.slow

REDIS_URL = os.environ.get("DICOM_NODE_TEST_REDIS", "redis://127.0.0.1:6379/11")
POSTGRES = os.environ.get("DICOM_NODE_TEST_POSTGRES", "postgresql+psycopg://postgres@127.0.0.1/")


@pytest.fixture
def redis_url() -> str:
    redis = pytest.importorskip("redis")
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.skip(f"no Redis at {REDIS_URL} (.ci/run starts one)")
    client.flushdb()
    return REDIS_URL


@pytest.fixture
def postgres_url():
    psycopg = pytest.importorskip("psycopg")
    name = f"dicom_node_{uuid.uuid4().hex[:12]}"
    dsn = POSTGRES.replace("postgresql+psycopg://", "postgresql://")
    try:
        admin = psycopg.connect(dsn + "postgres", autocommit=True)
    except psycopg.OperationalError:
        pytest.skip(f"no PostgreSQL at {POSTGRES} (.ci/run starts one)")
    admin.execute(f'CREATE DATABASE "{name}"')
    yield POSTGRES + name
    admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.close()


def test_receiving_host_and_worker_host_share_redis_and_postgresql(node_factory, redis_url,
                                                                   postgres_url):
    node = node_factory({"broker": {"url": redis_url}, "database_url": postgres_url,
                         "audit": {"database_url": postgres_url},
                         "worker": {"embedded": False}})
    node.start()
    worker = subprocess.Popen([sys.executable, "-m", "dicom_node", "--config", str(node.config),
                               "worker"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        sent = run_tool(dcmtk_tool("storescu"), "-aet", "STORESCU", "-aec", "DICOM_NODE",
                        "127.0.0.1", str(node.port), str(sample_file("RG3_UNCI.dcm")))
        assert sent.returncode == 0, sent.stderr
        db = NodeDatabase(postgres_url)

        def finished_job() -> Job | None:
            with db.session() as session:
                job = session.scalars(select(Job)).first()
                return job if job is not None and job.status.finished else None

        job = wait_for(finished_job, 180, "the worker to finish the job")
        assert job.status is JobStatus.SKIPPED
        db.dispose()
        assert node.stop() == 0
    finally:
        worker.terminate()
        worker.wait(60)
