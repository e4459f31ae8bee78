"""The naive baseline's Celery app: one task per item that loads the model inside the task.

The common anti-pattern the runner replaces: every task loads tokenizer and weights from the local
directory with transformers, generates its one item (greedy, EOS off, as the runner's benchmark does),
puts it to S3 with boto3 and writes a row with SQLAlchemy. Only the model load is naive: the S3
client and the database engine are kept per process, which flatters the baseline.

    celery -A bench.naive_tasks worker -Q naive --pool solo
"""

from __future__ import annotations

import hashlib
import os
import time
from functools import lru_cache
from typing import cast

from celery import Celery
from sqlalchemy import BigInteger, Column, Float, Integer, MetaData, String, Table, create_engine, insert

app = Celery("naive", broker=os.environ.get("AIGC_BROKER_URL", "memory://"))
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"], event_serializer="json",
    task_ignore_result=True, task_acks_late=True, worker_prefetch_multiplier=1, task_default_queue="naive",
    worker_hijack_root_logger=False, broker_connection_retry_on_startup=True,
)

metadata = MetaData()
outputs = Table(
    "naive_outputs", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("run_id", String(64), index=True, nullable=False),
    Column("index", Integer, nullable=False),
    Column("key", String(512), nullable=False),
    Column("sha256", String(64), nullable=False),
    Column("finished_at", Float, nullable=False),  # epoch seconds, the worker's clock
)


def db_url() -> str:
    url = os.environ["AIGC_DATABASE_URL"]
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


@lru_cache(maxsize=1)
def _engine():
    return create_engine(db_url())


@lru_cache(maxsize=1)
def _s3():
    import boto3
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=os.environ.get("AIGC_S3_ENDPOINT_URL"), region_name="us-east-1",
                        config=Config(s3={"addressing_style": "path"}))


@app.task(name="naive.generate_one", acks_late=True)
def generate_one(run_id: str, index: int, prompt: str, model_dir: str, new_tokens: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(int(os.environ.get("AIGC_TORCH_THREADS", "1")))
    tok = AutoTokenizer.from_pretrained(model_dir)  # the anti-pattern: a load per item
    model = AutoModelForCausalLM.from_pretrained(model_dir, use_safetensors=True).eval()
    with torch.inference_mode():
        enc = tok(prompt, return_tensors="pt")
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    # One sequence decodes to one str (transformers types decode as str | list[str]).
    data = cast(str, tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)).encode()
    bucket, _, prefix = os.environ["AIGC_STORAGE_URL"].removeprefix("s3://").partition("/")
    key = f"{prefix}/naive/{run_id}/{index:06d}.txt".lstrip("/")
    _s3().put_object(Bucket=bucket, Key=key, Body=data, ContentType="text/plain; charset=utf-8")
    with _engine().begin() as c:
        c.execute(insert(outputs).values(run_id=run_id, index=index, key=key,
                                         sha256=hashlib.sha256(data).hexdigest(), finished_at=time.time()))
