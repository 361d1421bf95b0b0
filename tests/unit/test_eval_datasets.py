"""Evaluation inputs: GPR1200 folder, image-folder tree, Karpathy captions, class names."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from stages.errors import StageConfigError
from stages.evaluate import datasets
from stages.evaluate.scoring import alternate_split, class_prompts


def _image(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 0, 0)).save(path)
    return path


def test_gpr1200_folder_labels_and_subsets(tmp_path):
    for name in ("0_a.jpg", "0_b.jpg", "205_x.jpg", "1199_last.jpg", "630_q.png"):
        _image(tmp_path / name)
    (tmp_path / "notes.txt").write_text("not an image")
    images = datasets.gpr1200_folder(tmp_path)
    assert [r.path.name for r in images.refs] == [
        "0_a.jpg",
        "0_b.jpg",
        "1199_last.jpg",
        "205_x.jpg",
        "630_q.png",
    ]
    assert images.labels.tolist() == ["0", "0", "1199", "205", "630"]
    assert images.groups.tolist() == ["Landmarks", "Landmarks", "Faces", "iNat", "INSTRE"]


def test_gpr1200_bad_file_name_is_named(tmp_path):
    _image(tmp_path / "cat.jpg")
    with pytest.raises(StageConfigError, match="cat.jpg: not a GPR1200 file name"):
        datasets.gpr1200_folder(tmp_path)
    with pytest.raises(StageConfigError, match="GPR1200 folder not found"):
        datasets.gpr1200_folder(tmp_path / "missing")


def test_image_folder_tree_in_natural_order(tmp_path):
    for cls, n in (("dog", 10), ("dog", 2), ("cat", 1)):
        _image(tmp_path / cls / f"{n}.jpg")
    images = datasets.image_folder(tmp_path)
    assert [(label, ref.path.name) for label, ref in zip(images.labels, images.refs)] == [
        ("cat", "1.jpg"),
        ("dog", "2.jpg"),
        ("dog", "10.jpg"),
    ]
    assert images.refs[0].read()[:2] == b"\xff\xd8"  # the file's bytes


def test_identity_changes_when_an_image_changes(tmp_path):
    _image(tmp_path / "a" / "0.jpg")
    before = datasets.image_folder(tmp_path).identity()
    assert datasets.image_folder(tmp_path).identity() == before
    _image(tmp_path / "a" / "1.jpg")
    assert datasets.image_folder(tmp_path).identity() != before


def test_karpathy_captions_merge_identical_texts(tmp_path):
    for name in ("x.jpg", "y.jpg", "z.jpg"):
        _image(tmp_path / "imgs" / name)
    entries = [
        {"filepath": "imgs", "filename": "x.jpg", "split": "test", "sentences": [{"raw": "A red  Circle"}]},
        {
            "filepath": "imgs",
            "filename": "y.jpg",
            "split": "test",
            "sentences": [{"raw": "a red circle"}, {"raw": "a blue square"}],
        },
        {"filepath": "imgs", "filename": "z.jpg", "split": "train", "sentences": [{"raw": "other"}]},
    ]
    (tmp_path / "captions.json").write_text(json.dumps({"images": entries}))
    captions = datasets.karpathy_captions(tmp_path / "captions.json")
    assert [r.path.name for r in captions.images.refs] == ["x.jpg", "y.jpg"]
    assert captions.texts == ["A red  Circle", "a blue square"]
    assert [o.tolist() for o in captions.owners] == [[0, 1], [1]]


def test_karpathy_errors_name_the_file(tmp_path):
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(StageConfigError, match="bad.json: not a Karpathy-split json"):
        datasets.karpathy_captions(tmp_path / "bad.json")
    (tmp_path / "gone.json").write_text(json.dumps({"images": [{"filename": "nope.jpg", "sentences": []}]}))
    with pytest.raises(StageConfigError, match="nope.jpg listed in the caption file does not exist"):
        datasets.karpathy_captions(tmp_path / "gone.json")
    _image(tmp_path / "x.jpg")
    (tmp_path / "short.json").write_text(json.dumps({"images": [{"filename": "x.jpg"}, {"sentences": []}]}))
    with pytest.raises(StageConfigError, match=r"short.json: image entry 1 has no 'filename'"):
        datasets.karpathy_captions(tmp_path / "short.json")
    (tmp_path / "raw.json").write_text(
        json.dumps({"images": [{"filename": "x.jpg", "sentences": [{"t": 1}]}]})
    )
    with pytest.raises(StageConfigError, match=r"raw.json: image entry 0 has no 'raw'"):
        datasets.karpathy_captions(tmp_path / "raw.json")


def test_class_names_from_json_or_tab_text(tmp_path):
    (tmp_path / "names.json").write_text(json.dumps({"n01": "goldfish", "n02": "shark"}))
    (tmp_path / "names.txt").write_text("n01\tgoldfish\nplain name\n")
    assert datasets.class_names(tmp_path / "names.json") == {"n01": "goldfish", "n02": "shark"}
    assert datasets.class_names(tmp_path / "names.txt") == {"n01": "goldfish", "plain name": "plain name"}
    (tmp_path / "cut.json").write_text('{"n01": "gold')
    with pytest.raises(StageConfigError, match="cut.json: class names are not valid JSON"):
        datasets.class_names(tmp_path / "cut.json")


def test_alternate_split_within_each_class():
    gallery, queries = alternate_split(np.array(["a", "b", "a", "a", "b"]))
    assert gallery.tolist() == [True, True, False, True, False]
    assert (queries == ~gallery).all()


def test_default_prompts_are_the_80_openai_templates():
    prompts = class_prompts(["goldfish"], None)
    assert len(prompts[0]) == 80 and "a photo of a goldfish." in prompts[0]
    assert class_prompts(["x"], ["a {} here"]) == [["a x here"]]


def test_edited_class_names_change_the_evaluate_fingerprint(tmp_path):
    """Metrics are recomputed when the class names change, not reused because the path is the same."""
    from stages.base import fingerprint_of
    from stages.evaluate import EvaluateConfig, describe

    _image(tmp_path / "eval" / "a" / "0.jpg")
    names = tmp_path / "names.json"
    names.write_text(json.dumps({"a": "goldfish"}))
    cfg = EvaluateConfig(
        model="ViT-B-32",
        models=[{"name": "random"}],
        zero_shot={"data": {"layout": "folder", "path": tmp_path / "eval"}, "class_names": names},
    )
    before = fingerprint_of(describe(cfg, tmp_path / "run")[2])
    assert fingerprint_of(describe(cfg, tmp_path / "run")[2]) == before
    names.write_text(json.dumps({"a": "tiger shark"}))
    assert fingerprint_of(describe(cfg, tmp_path / "run")[2]) != before
