"""`python -m stages.evaluate MANIFEST [--force]`:
the same as `python -m pipeline run MANIFEST --stage evaluate`."""

import sys

from pipeline.cli import main as pipeline_main

sys.exit(pipeline_main(["run", *sys.argv[1:2], "--stage", "evaluate", *sys.argv[2:]]))
