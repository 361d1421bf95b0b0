"""A synthetic instance-retrieval world: the demo's and the fidelity benchmark's data.

Every picture shows one object (shape, colour) on a background colour: that is all its caption says.
Each class is an *instance*: a meaning plus a fine detail no caption mentions (stripes printed on the
object: their direction, count and thickness), so several visually distinct instances share one
caption; the semantic-visual gap of the MCIP paper. Pictures of an instance differ in position, size
and noise.

    python -m examples.world OUT [--seed 0] [--port 8000]   # writes the world into OUT

Writes (deterministic for a seed):
  OUT/pretrain.parquet      jpeg bytes + caption: a CLIP pre-training split over all meanings
  OUT/finetune/<n>.jpg      the labelled fine-tuning split (served over HTTP by the demo) and
  OUT/urls.parquet          its URL table: url, caption (alt text, one phrasing), label (instance)
  OUT/caption_bank.txt      every meaning in every phrasing (the retrieval captioner's bank)
  OUT/eval/<class>/<n>.jpg  unseen instances grouped so a group differs only in the object's shape,
  OUT/eval/class_names.json instance -> its meaning; OUT/eval/captions.json Karpathy-style captions
"""

from __future__ import annotations

import argparse
import io
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {
    "red": (205, 40, 40),
    "green": (40, 150, 60),
    "blue": (45, 80, 215),
    "yellow": (230, 200, 40),
    "purple": (140, 60, 190),
    "orange": (235, 130, 30),
}
BACKGROUNDS = {
    "white": (235, 235, 235),
    "black": (25, 25, 25),
    "grey": (128, 128, 128),
    "pink": (240, 170, 190),
}
PHRASINGS = (
    "a {c} {s} on a {b} background",
    "a photo of a {c} {s} on {b}",
    "{c} {s}, {b} background",
    "a {s} in {c} against a {b} backdrop",
    "an image of a {c} {s} on a {b} surface",
    "a {c} {s}",
    "a picture showing a {c} {s} with a {b} background",
    "a simple {c} {s} drawn on {b}",
    "{b} background with a {c} {s}",
    "a {c} coloured {s} on {b}",
    "the {s} is {c}, the background {b}",
    "a close-up of a {c} {s} on {b}",
    "a flat {c} {s} in front of {b}",
    "a {c} {s} over a plain {b} field",
    "one {c} {s} on a {b} backdrop",
    "a {s}, {c}, on {b}",
    "a graphic of a {c} {s} on {b}",
    "a {c} {s} centred on a {b} background",
    "a small {c} {s} on {b}",
    "an illustration of a {c} {s} on {b}",
    "a {c} {s} shape on a {b} canvas",
    "{c} {s} on {b}",
    "a {s} painted {c} on a {b} wall",
    "a clean {c} {s} on a {b} background",
)
CANONICAL = "a {c} {s} on a {b} background"
SIZE = 64
SUPERSAMPLE = 4


@dataclass(frozen=True)
class Instance:
    """One class: a meaning (shape, colour, background) and its fine detail (dot pattern)."""

    shape: str
    colour: str
    background: str
    detail: tuple[str, int, int]  # stripes: direction ("h" or "v"), count (1-4), thick (0 or 1)

    @property
    def label(self) -> str:
        direction, count, thick = self.detail
        return f"{self.shape}-{self.colour}-{self.background}-{direction}{count}{'T' if thick else 't'}"

    @property
    def meaning(self) -> str:
        return CANONICAL.format(c=self.colour, s=self.shape, b=self.background)

    def caption(self, rng: np.random.Generator) -> str:
        return PHRASINGS[rng.integers(len(PHRASINGS))].format(c=self.colour, s=self.shape, b=self.background)


def all_meanings() -> list[tuple[str, str, str]]:
    return [(s, c, b) for s in SHAPES for c in COLOURS for b in BACKGROUNDS]


DETAILS = [(d, n, t) for d in ("h", "v") for n in (1, 2, 3, 4) for t in (0, 1)]


def random_detail(rng: np.random.Generator, taken: set) -> tuple[str, int, int]:
    """Stripes not in `taken`; centred and evenly spaced, so a horizontal flip shows the same instance."""
    free = [d for d in DETAILS if d not in taken]
    detail = free[rng.integers(len(free))]
    taken.add(detail)
    return detail


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | tuple:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    return (cx - r, cy - r, cx + r, cy + r)


def render(instance: Instance, rng: np.random.Generator) -> Image.Image:
    """One picture of the instance: jittered position and size, stripes on the object, pixel noise."""
    big = SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUNDS[instance.background])
    draw = ImageDraw.Draw(image)
    r = big * rng.uniform(0.30, 0.38)
    cx, cy = big / 2 + rng.uniform(-0.1, 0.1) * big, big / 2 + rng.uniform(-0.1, 0.1) * big
    outline, fill = _outline(instance.shape, cx, cy, r), COLOURS[instance.colour]
    if instance.shape == "circle":
        draw.ellipse(outline, fill=fill)
    elif instance.shape == "square":
        draw.rectangle(outline, fill=fill)
    else:
        draw.polygon(outline, fill=fill)
    draw_stripes(
        draw,
        instance.detail,
        cx,
        cy + (r * 0.25 if instance.shape == "triangle" else 0),
        r * (0.5 if instance.shape in ("triangle", "diamond") else 0.6),
        (10, 10, 10) if sum(fill) > 300 else (245, 245, 245),
    )
    small = np.asarray(image.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32)
    noisy = np.clip(small + rng.normal(0, 6, small.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(noisy)


def draw_stripes(draw, detail: tuple[str, int, int], cx: float, cy: float, half: float, ink) -> None:
    """`count` stripes across a square of side 2*half around (cx, cy), thin or thick."""
    direction, count, thick = detail
    width = half * (0.3 if thick else 0.12)
    for k in range(count):
        at = -half + 2 * half * (k + 1) / (count + 1)
        if direction == "h":
            draw.rectangle((cx - half, cy + at - width / 2, cx + half, cy + at + width / 2), fill=ink)
        else:
            draw.rectangle((cx + at - width / 2, cy - half, cx + at + width / 2, cy + half), fill=ink)


def jpeg(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=92)
    return out.getvalue()


@dataclass(frozen=True)
class WorldSize:
    """How big each split is; the defaults make a world the demo handles in minutes."""

    pretrain_images: int = 6000
    finetune_meanings: int | None = None  # default: every meaning
    instances_per_meaning: int = 4  # fine-tuning instances sharing one caption meaning
    finetune_images_per_instance: int = 6
    eval_groups: int = 12  # (colour, background) pairs; each group holds every shape
    eval_instances_per_meaning: int = 2
    eval_images_per_instance: int = 8

    @classmethod
    def tiny(cls) -> "WorldSize":
        """A few hundred pictures: for the test suite's end-to-end run of the demo."""
        return cls(
            pretrain_images=256,
            finetune_meanings=8,
            instances_per_meaning=2,
            finetune_images_per_instance=4,
            eval_groups=2,
            eval_instances_per_meaning=2,
            eval_images_per_instance=4,
        )


def generate(out: Path, seed: int = 0, size: WorldSize = WorldSize(), port: int = 8000) -> None:
    """Write every split into `out` (see the module docstring); the URL table points at 127.0.0.1:port."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    taken: dict[tuple[str, str, str], set] = {}  # details used per meaning: instances must differ
    write_bank(out / "caption_bank.txt")
    write_pretrain(out / "pretrain.parquet", rng, size.pretrain_images)
    write_finetune(out, rng, taken, size, port)
    write_eval(out / "eval", rng, taken, size)


def write_bank(path: Path) -> None:
    lines = [p.format(c=c, s=s, b=b) for s, c, b in all_meanings() for p in PHRASINGS]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(dict.fromkeys(lines)) + "\n")


def write_pretrain(path: Path, rng: np.random.Generator, count: int) -> None:
    """Random meanings with random (possibly repeated) dot patterns: the model learns the semantics."""
    meanings = all_meanings()
    images, captions = [], []
    for _ in range(count):
        s, c, b = meanings[rng.integers(len(meanings))]
        instance = Instance(s, c, b, DETAILS[rng.integers(len(DETAILS))])
        images.append(jpeg(render(instance, rng)))
        captions.append(instance.caption(rng))
    pq.write_table(pa.table({"jpg": pa.array(images, pa.binary()), "caption": captions}), path)


def write_finetune(out: Path, rng: np.random.Generator, taken: dict, size: WorldSize, port: int) -> None:
    meanings = all_meanings()
    chosen = rng.choice(len(meanings), size=size.finetune_meanings or len(meanings), replace=False)
    folder = out / "finetune"
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"url": [], "caption": [], "label": []}
    n = 0
    for index in sorted(chosen):
        s, c, b = meanings[index]
        for _ in range(size.instances_per_meaning):
            instance = Instance(s, c, b, random_detail(rng, taken.setdefault((s, c, b), set())))
            label = instance.label
            for _ in range(size.finetune_images_per_instance):
                (folder / f"{n}.jpg").write_bytes(jpeg(render(instance, rng)))
                rows["url"].append(f"http://127.0.0.1:{port}/finetune/{n}.jpg")
                rows["caption"].append(instance.caption(rng))
                rows["label"].append(label)
                n += 1
    order = rng.permutation(n)  # a web crawl is not sorted by class
    pq.write_table(pa.table({k: [v[i] for i in order] for k, v in rows.items()}), out / "urls.parquet")


def write_eval(folder: Path, rng: np.random.Generator, taken: dict, size: WorldSize) -> None:
    """Unseen instances; each (colour, background) group has every shape, so text must tell shapes apart."""
    pairs = [(c, b) for c in COLOURS for b in BACKGROUNDS]
    groups = rng.choice(len(pairs), size=size.eval_groups, replace=False)
    names, entries = {}, []
    for g in sorted(groups):
        c, b = pairs[g]
        for s in SHAPES:
            for _ in range(size.eval_instances_per_meaning):
                instance = Instance(s, c, b, random_detail(rng, taken.setdefault((s, c, b), set())))
                label = instance.label
                names[label] = instance.meaning.removeprefix("a ")
                (folder / label).mkdir(parents=True, exist_ok=True)
                for k in range(size.eval_images_per_instance):
                    (folder / label / f"{k}.jpg").write_bytes(jpeg(render(instance, rng)))
                    entries.append(
                        {
                            "filepath": label,
                            "filename": f"{k}.jpg",
                            "split": "test",
                            "sentences": [{"raw": instance.meaning}],
                        }
                    )
    (folder / "class_names.json").write_text(json.dumps(names, indent=1))
    (folder / "captions.json").write_text(json.dumps({"dataset": "world", "images": entries}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8000)
    args = parser.parse_args()
    generate(args.out, args.seed, port=args.port)


if __name__ == "__main__":
    main()
