"""`python -m stages.download MANIFEST [--force]`:
the same as `python -m pipeline run MANIFEST --stage download`."""

import sys

from pipeline.cli import main as pipeline_main

sys.exit(pipeline_main(["run", *sys.argv[1:2], "--stage", "download", *sys.argv[2:]]))
