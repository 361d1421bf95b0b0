"""`python -m stages.caption MANIFEST [--force]`:
the same as `python -m pipeline run MANIFEST --stage caption`."""

import sys

from pipeline.cli import main as pipeline_main

sys.exit(pipeline_main(["run", *sys.argv[1:2], "--stage", "caption", *sys.argv[2:]]))
