"""The Spark session the data stages run in (params.yaml section `spark`)."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from m2rec.errors import ConfigError

log = logging.getLogger(__name__)
JAVA_17 = Path("/usr/lib/jvm/java-17-openjdk-amd64")  # Debian's; Spark 4 runs on Java 17 or 21


@dataclass
class SparkParams:
    """Whether and where the data stages run on Spark (params.yaml section `spark`)."""

    enabled: bool = False  # the data stages on Spark: prepare and the feature tables (or `--engine spark`)
    master: str = "local[*]"  # a cluster: spark://HOST:7077, yarn, k8s://...
    driver_memory: str = "4g"
    shuffle_partitions: int = 8  # small data, few cores; raise it on a cluster
    java_home: str | None = None  # None: $JAVA_HOME, else Debian's Java 17 when present


def use_java(java_home: str | None = None) -> str | None:
    """Point $JAVA_HOME (which Spark's launcher, here or in a `feast` subprocess, reads) at `java_home`, else keep
    $JAVA_HOME, else Debian's Java 17 when present; return it (None: the `java` on the PATH)."""
    java_home = java_home or os.environ.get("JAVA_HOME") or (str(JAVA_17) if JAVA_17.is_dir() else None)
    if java_home:
        os.environ["JAVA_HOME"] = java_home
    return java_home


def spark_conf(params: SparkParams) -> dict[str, str]:
    """The session's settings: those of `params`, in UTC (timestamps are instants), with Spark's UI off. Also what
    Feast's Spark offline store starts its session with (feature_store.yaml `offline_store.spark_conf`)."""
    return {"spark.master": params.master,
            "spark.app.name": "m2rec",
            "spark.driver.memory": params.driver_memory,
            "spark.sql.shuffle.partitions": str(params.shuffle_partitions),
            "spark.sql.session.timeZone": "UTC",
            "spark.sql.parquet.outputTimestampType": "TIMESTAMP_MICROS",
            "spark.ui.enabled": "false",
            "spark.ui.showConsoleProgress": "false"}


def spark_session(params: SparkParams | None = None):
    """A SparkSession for `params` (`spark_conf`)."""
    params = params or SparkParams()
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise ConfigError("the Spark engine needs pyspark", "pip install 'm2rec[spark]' (and a Java 17 runtime)") \
            from None
    java_home = use_java(params.java_home)
    log.info("starting Spark (%s, Java at %s)", params.master, java_home or "the PATH")
    builder = SparkSession.builder
    for key, value in spark_conf(params).items():
        builder = builder.config(key, value)
    return builder.getOrCreate()
