"""All shard I/O: naming, listing, rank split, atomic writing, markers, parquet sidecars,
webdataset reading and the wids shard index. Imports nothing else from the project."""
