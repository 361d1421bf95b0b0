"""One module per stage (download, ...); each holds one typed config and `run(cfg, ctx)`."""
