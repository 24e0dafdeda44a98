"""The data stages on Spark, for data beyond one machine: prepare (read, k-core, ids, split) and the feature
tables, writing the same tables as the single-machine path. Needs the `spark` extra (`pip install 'm2rec[spark]'`)
and a Java 17 runtime; `local[*]` here, a cluster URL in production (`spark.master`)."""
