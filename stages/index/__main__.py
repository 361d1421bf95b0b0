"""`python -m stages.index MANIFEST [--force]`:
the same as `python -m pipeline run MANIFEST --stage index`."""

import sys

from pipeline.cli import main as pipeline_main

sys.exit(pipeline_main(["run", *sys.argv[1:2], "--stage", "index", *sys.argv[2:]]))
