"""`convert bulk`: caption and embed many images with a `convert blip` output, into Parquet shards,
on this machine (a process pool) or on a Ray cluster (a Ray Data pipeline). See `run`."""
