"""download -> caption -> export through the CLI on one manifest: real img2dataset against 127.0.0.1,
the retrieval backend with a tiny open_clip model, then the export read back through webdataset."""

from __future__ import annotations

import json

import yaml

from shards.reader import iter_samples
from tests.conftest import run_cli, snapshot, write_url_table


def test_download_caption_export(tmp_path, image_server, tiny_models):
    urls = [image_server.url(f"/img/{i}.jpg") for i in range(24)] + [image_server.url("/missing.jpg")]
    write_url_table(
        tmp_path / "urls.parquet", urls, [f"alt {i}" for i in range(25)], [i % 5 for i in range(25)]
    )
    (tmp_path / "bank.txt").write_text(
        "\n".join(
            f"a {c} {s}" for c in ("red", "blue", "green", "cyan") for s in ("circle", "square", "shape")
        )
        + "\n"
    )
    manifest = tmp_path / "m.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {
                "run": {"root": "run", "seed": 0},
                "stages": {
                    "download": {
                        "url_list": "urls.parquet",
                        "caption_col": "caption",
                        "label_col": "label",
                        "samples_per_shard": 10,
                        "processes": 1,
                        "threads": 4,
                        "image_size": 32,
                    },
                    "caption": {
                        "backend": "retrieval",
                        "model": tiny_models["clip_arch"],
                        "captions_per_image": 3,
                        "num_workers": 1,
                        "retrieval": {
                            "pretrained": str(tiny_models["clip_checkpoint"]),
                            "bank": "bank.txt",
                            "config_dir": str(tiny_models["clip_configs"]),
                            "threshold": -1.0,
                        },
                    },
                },
            }
        )
    )

    plan = run_cli("plan", str(manifest), cwd=tmp_path)
    assert "download: 3 units, 0 done, 3 pending" in plan.stdout and "caption: waiting" in plan.stdout
    result = run_cli("run", str(manifest), cwd=tmp_path)
    assert result.returncode == 0, result.stderr

    status = json.loads(run_cli("status", str(manifest), "--json", cwd=tmp_path).stdout)
    assert status["download"]["is_complete"] and status["caption"]["is_complete"]
    assert status["caption"]["counts"] == {
        "images": 24,
        "captions": 72,
        "images_without_captions": 0,
        "corrupt_images": 0,
    }
    resolved = yaml.safe_load((tmp_path / "run" / "manifest.resolved.yaml").read_text())
    assert set(resolved["fingerprints"]) == {"download", "caption"}

    before = snapshot(tmp_path / "run")
    assert run_cli("run", str(manifest), "--from", "caption", cwd=tmp_path).returncode == 0
    assert snapshot(tmp_path / "run") == before

    exported = run_cli("export", str(manifest), "--captions", "retrieval", "--to", "export", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    samples = list(iter_samples(sorted((tmp_path / "export").glob("*.tar"))))
    assert len(samples) == 24
    for sample in samples:
        meta = json.loads(sample["json"])
        assert sample["txt"].decode() == meta["captions"][0] and len(meta["captions"]) == 3
        assert meta["scores"] == sorted(meta["scores"], reverse=True)
        assert meta["alt_text"] == f"alt {int(sample['__key__'])}"
