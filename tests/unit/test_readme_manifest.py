"""The manifest shown in README.md validates as written: its yaml blocks between "### Manifest" and the
next section are one manifest; the files it names are made in a temp folder, as a user would have them."""

from __future__ import annotations

import re
import shutil

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.manifest import load_manifest
from pipeline.runner import check_inputs
from tests.conftest import REPO


def readme_manifest() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("### Manifest", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    assert len(blocks) >= 4, "the README's manifest section lost its yaml blocks"
    return "".join(blocks)


def test_the_readme_manifest_validates_as_written(tmp_path):
    manifest = tmp_path / "my.yaml"
    # the evaluation folders exist on the user's machine (validate checks them): made here under tmp_path
    text = readme_manifest().replace(" /data/", f" {tmp_path}/data/")
    manifest.write_text(text)
    for folder in ("GPR1200/images", "products", "imagenet/val"):
        (tmp_path / "data" / folder).mkdir(parents=True)
    pq.write_table(
        pa.table({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"], "label": ["x"]}),
        tmp_path / "urls.parquet",
    )
    pq.write_table(pa.table({"caption": ["a photo of a cat"]}), tmp_path / "cc12m_captions.parquet")
    (tmp_path / "imagenet_names.json").write_text('{"x": "cat"}')
    shutil.copytree(REPO / "launch" / "deepspeed", tmp_path / "launch" / "deepspeed")

    loaded = load_manifest(manifest)
    check_inputs(loaded)
    assert loaded.configured_stages() == ["download", "caption", "finetune", "realign", "evaluate"]
    assert loaded.stages.finetune.model == "ViT-SO400M-14-SigLIP-384"  # the paper's headline model
    assert loaded.slurm.resources("finetune").gpus_per_node == 8
