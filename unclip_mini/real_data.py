"""Real image-caption data for the GPU presets: a folder with a captions file, or COCO captions.

Both loaders return the same items as the toy world's `data.ToyDataset` (dict(image=uint8 [3, R, R],
caption, scene=None)) and the same `images()` / `captions()` methods, so a stage trains on either. Point a
run at one with `DataConfig.source` ('folder' or 'coco') and `DataConfig.root` / `DataConfig.captions`
(see data/README.md for the file formats). Every image is centre-cropped to a square and resized.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch

from .errors import DataError
from .progress import tqdm


def load_image(path, resolution: int) -> torch.Tensor:
    """An image file -> RGB, centre-cropped to a square, resized: uint8 [3, R, R]."""
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if not path.is_file():
        raise DataError(f"image file {path} does not exist: fix the file name in the captions file or add "
                        f"the image")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({type(e).__name__}: {e}): replace it with a valid "
                        f"PNG/JPEG or remove its line from the captions file") from e
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    im = im.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()


class _ImageCaptions:
    """Shared by the real-data loaders: a list of (image path, caption) read lazily."""

    def __init__(self, items, resolution: int):
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise DataError(f"resolution {resolution!r} must be a positive int (e.g. 64)")
        self.items, self.resolution = items, resolution

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        path, caption = self.items[i]
        return {"image": load_image(path, self.resolution), "caption": caption, "scene": None}

    def captions(self) -> list[str]:
        return [c for _, c in self.items]

    def subset(self, indices) -> "_ImageCaptions":
        """The items at `indices`, as a loader of the same kind."""
        out = object.__new__(type(self))
        _ImageCaptions.__init__(out, [self.items[i] for i in indices], self.resolution)
        return out

    def scenes(self) -> list:
        return [None] * len(self.items)

    def images(self, resolution: int | None = None, batch_size: int = 1024, progress: bool = False) -> torch.Tensor:
        """Every image loaded: uint8 `[N, 3, R, R]` (`batch_size` is accepted for ToyDataset's signature)."""
        res = resolution or self.resolution
        out = torch.empty(len(self.items), 3, res, res, dtype=torch.uint8)
        for i, (path, _) in enumerate(tqdm(self.items, disable=not progress, desc="load images")):
            out[i] = load_image(path, res)
        return out


def _check_caption(caption, where: str) -> str:
    if not isinstance(caption, str) or not caption.strip():
        raise DataError(f"empty caption at {where}: write a caption or remove the line")
    return caption.strip()


class ImageCaptionFolder(_ImageCaptions):
    """A folder of images with `captions.jsonl` ({"file": "a.png", "caption": "..."} per line) or
    `captions.csv` (header `file,caption`). Items: dict(image=uint8 [3, R, R], caption, scene=None)."""

    def __init__(self, root, captions_file: str | None = None, resolution: int = 64):
        root = Path(root)
        if captions_file is None:
            found = [root / n for n in ("captions.jsonl", "captions.csv") if (root / n).is_file()]
            if not found:
                raise DataError(f"no captions file in {root}: create captions.jsonl with lines like "
                                f'{{"file": "a.png", "caption": "a red circle"}} (or captions.csv with '
                                f"columns file,caption)")
            path = found[0]
        else:
            path = Path(captions_file) if Path(captions_file).is_absolute() else root / captions_file
            if not path.is_file():
                raise DataError(f"captions file {path} does not exist: check the path, or create it "
                                f"(captions.jsonl or captions.csv)")
        rows = self._read_csv(path) if path.suffix.lower() == ".csv" else self._read_jsonl(path)
        if not rows:
            raise DataError(f"{path} lists no images: add one line per (image, caption)")
        items = []
        for where, file, caption in rows:
            image = root / file
            if not image.is_file():
                raise DataError(f"{where} names {file!r}, but {image} does not exist: fix the name or add "
                                f"the image")
            items.append((image, _check_caption(caption, where)))
        super().__init__(items, resolution)

    @staticmethod
    def _read_jsonl(path):
        rows = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            where = f"{path} line {n}"
            try:
                d = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where} is not valid JSON ({e.msg}): write one object per line, "
                                f'{{"file": "a.png", "caption": "..."}}') from e
            if not isinstance(d, dict) or "file" not in d or "caption" not in d:
                raise DataError(f'{where} needs the keys "file" and "caption", e.g. '
                                f'{{"file": "a.png", "caption": "a red circle"}}')
            rows.append((where, str(d["file"]), d["caption"]))
        return rows

    @staticmethod
    def _read_csv(path):
        rows = []
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or not {"file", "caption"} <= set(reader.fieldnames):
                raise DataError(f"{path} needs a header line with the columns file,caption (found "
                                f"{reader.fieldnames}): add 'file,caption' as the first line")
            for d in reader:
                where = f"{path} line {reader.line_num}"
                if None in d or d["file"] is None or d["caption"] is None:
                    raise DataError(f"{where} does not have exactly the columns file,caption: quote a "
                                    f'caption that holds commas ("a red, round circle")')
                rows.append((where, d["file"], d["caption"]))
        return rows


class CocoCaptions(_ImageCaptions):
    """COCO-style captions: `images[{id, file_name}]`, `annotations[{image_id, caption}]`; one item per
    annotation. Items: dict(image=uint8 [3, R, R], caption, scene=None)."""

    def __init__(self, images_dir, annotations_json, resolution: int = 64):
        images_dir, path = Path(images_dir), Path(annotations_json)
        if not path.is_file():
            raise DataError(f"annotations file {path} does not exist: download or point to COCO's "
                            f"captions_train2017.json (or a file of the same layout)")
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path} is not valid JSON (line {e.lineno}: {e.msg}): re-download or fix it") from e
        if not isinstance(d, dict) or not isinstance(d.get("images"), list) \
                or not isinstance(d.get("annotations"), list):
            raise DataError(f'{path} needs the lists "images" [{{id, file_name}}] and "annotations" '
                            f"[{{image_id, caption}}] (the COCO captions layout)")
        try:
            files = {im["id"]: im["file_name"] for im in d["images"]}
        except (KeyError, TypeError) as e:
            raise DataError(f'{path}: every entry of "images" needs "id" and "file_name"') from e
        items, checked = [], {}
        for n, a in enumerate(d["annotations"]):
            where = f"{path} annotation {n}"
            if not isinstance(a, dict) or "image_id" not in a or "caption" not in a:
                raise DataError(f'{where} needs "image_id" and "caption"')
            if a["image_id"] not in files:
                raise DataError(f"{where} refers to image_id {a['image_id']!r}, which is not in \"images\": "
                                f"fix the id or add the image entry")
            image = images_dir / files[a["image_id"]]
            if image not in checked:
                checked[image] = image.is_file()
            if not checked[image]:
                raise DataError(f"{where}: image file {image} does not exist: check images_dir "
                                f"({images_dir}) or add the image")
            items.append((image, _check_caption(a["caption"], where)))
        if not items:
            raise DataError(f"{path} has no annotations: nothing to train on")
        super().__init__(items, resolution)
