"""Tests for unclip_mini.real_data: the image-folder and COCO loaders, and pointing a run's data at them."""
import json

import pytest
import torch

from unclip_mini import data as D
from unclip_mini import real_data as RD
from unclip_mini.errors import ConfigError, DataError


# ---------------------------------------------------------------------------------------------
# real data
# ---------------------------------------------------------------------------------------------

def _image(path, size=(40, 30), colour=(200, 10, 10)):
    from PIL import Image
    Image.new("RGB", size, colour).save(path)


def test_folder_jsonl_and_csv(tmp_path):
    _image(tmp_path / "a.png", (40, 30))
    _image(tmp_path / "b.png", (20, 50), (0, 0, 255))
    lines = [{"file": "a.png", "caption": "a red thing"}, {"file": "b.png", "caption": " a blue thing "}]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    ds = RD.ImageCaptionFolder(tmp_path, resolution=16)
    assert len(ds) == 2 and ds.captions() == ["a red thing", "a blue thing"]
    item = ds[1]
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.uint8 and item["scene"] is None
    assert item["image"][2].float().mean() > 250 and item["image"][0].float().mean() < 5
    assert ds.images().shape == (2, 3, 16, 16)
    (tmp_path / "c.csv").write_text('file,caption\na.png,"a red, wide thing"\n')
    assert RD.ImageCaptionFolder(tmp_path, "c.csv", 8).captions() == ["a red, wide thing"]


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="no captions file.*captions.jsonl"):
        RD.ImageCaptionFolder(tmp_path)
    with pytest.raises(DataError, match="nope.jsonl does not exist"):
        RD.ImageCaptionFolder(tmp_path, "nope.jsonl")
    _image(tmp_path / "a.png")
    cap = tmp_path / "captions.jsonl"
    cap.write_text('{"file": "a.png", "caption": "ok"}\n{"file": "missing.png", "caption": "x"}\n')
    with pytest.raises(DataError, match="line 2 names 'missing.png'.*does not exist"):
        RD.ImageCaptionFolder(tmp_path)
    cap.write_text('{"file": "a.png", "caption": "ok"}\n{"file": "a.png", "caption": "  "}\n')
    with pytest.raises(DataError, match="empty caption at .*line 2"):
        RD.ImageCaptionFolder(tmp_path)
    cap.write_text('{"file": "a.png", "caption": "ok"}\n{"file": "a.png", caption: x}\n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        RD.ImageCaptionFolder(tmp_path)
    cap.write_text('{"file": "a.png"}\n')
    with pytest.raises(DataError, match='line 1 needs the keys "file" and "caption"'):
        RD.ImageCaptionFolder(tmp_path)
    (tmp_path / "bad.png").write_text("not an image")
    cap.write_text('{"file": "bad.png", "caption": "x"}\n')
    ds = RD.ImageCaptionFolder(tmp_path)
    with pytest.raises(DataError, match="cannot read image .*bad.png"):
        ds[0]
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("file,caption\na.png,ok,extra\n")
    with pytest.raises(DataError, match="line 2 does not have exactly the columns file,caption"):
        RD.ImageCaptionFolder(tmp_path, "c.csv")
    csv_path.write_text("name,text\na.png,ok\n")
    with pytest.raises(DataError, match="header line with the columns file,caption"):
        RD.ImageCaptionFolder(tmp_path, "c.csv")
    csv_path.write_text("file,caption\na.png,\n")
    with pytest.raises(DataError, match="empty caption at .*c.csv line 2"):
        RD.ImageCaptionFolder(tmp_path, "c.csv")


def test_coco(tmp_path):
    _image(tmp_path / "1.jpg", (64, 48))
    _image(tmp_path / "2.jpg", (48, 64), (0, 200, 0))
    ann = {"images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}],
           "annotations": [{"image_id": 1, "caption": "red"}, {"image_id": 2, "caption": "green"},
                           {"image_id": 1, "caption": "also red"}]}
    path = tmp_path / "captions.json"
    path.write_text(json.dumps(ann))
    ds = RD.CocoCaptions(tmp_path, path, resolution=8)
    assert len(ds) == 3 and ds.captions() == ["red", "green", "also red"]
    assert ds[1]["image"].shape == (3, 8, 8) and ds[1]["image"][1].float().mean() > 190

    with pytest.raises(DataError, match="missing.json does not exist"):
        RD.CocoCaptions(tmp_path, tmp_path / "missing.json")
    path.write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        RD.CocoCaptions(tmp_path, path)
    path.write_text(json.dumps({**ann, "annotations": [{"image_id": 7, "caption": "x"}]}))
    with pytest.raises(DataError, match="image_id 7, which is not in"):
        RD.CocoCaptions(tmp_path, path)
    path.write_text(json.dumps({**ann, "annotations": [{"image_id": 1, "caption": ""}]}))
    with pytest.raises(DataError, match="empty caption at .*annotation 0"):
        RD.CocoCaptions(tmp_path, path)
    path.write_text(json.dumps({**ann, "images": [{"id": 1, "file_name": "gone.jpg"}],
                                "annotations": [{"image_id": 1, "caption": "x"}]}))
    with pytest.raises(DataError, match="gone.jpg does not exist"):
        RD.CocoCaptions(tmp_path, path)
    path.write_text(json.dumps({"images": []}))
    with pytest.raises(DataError, match="COCO captions layout"):
        RD.CocoCaptions(tmp_path, path)




def test_a_run_reads_a_real_folder_through_the_data_config(tmp_path):
    for i in range(40):
        _image(tmp_path / f"{i}.png", colour=(i * 5, 10, 10))
    (tmp_path / "captions.jsonl").write_text("".join(json.dumps({"file": f"{i}.png", "caption": f"image {i}"}) + "\n"
                                                     for i in range(40)))
    cfg = D.DataConfig.smoke().replace(source="folder", root=str(tmp_path))
    train, val = D.open_dataset(cfg, "train"), D.open_dataset(cfg, "val")
    assert len(train) == 38 and len(val) == 2 and val.captions() == ["image 0", "image 20"]
    assert train.images().shape == (38, 3, 16, 16)
    with pytest.raises(DataError, match="no 'heldout' split"):
        D.open_dataset(cfg, "heldout")
    with pytest.raises(ConfigError, match="set root="):
        D.DataConfig.smoke().replace(source="folder")
    with pytest.raises(ConfigError, match="captions="):
        D.DataConfig.smoke().replace(source="coco", root=str(tmp_path))
