"""Where a real data set lives: --data, --images, --depth-dir, --mask-dir (no torch here:
the configuration checks the folders before any work starts).

The UniMRG release's layout, which the defaults follow:

    data/llava_v1_5_mix665k.json     LLaVA-format records (a JSON list or JSON Lines)
    data/tuning_data/coco/0001.jpg   images, at the records' relative "image" paths
    data/tuning_data_depth/coco/0001.png   depth targets (python -m trainer.prepare)
    data/tuning_data_mask/coco/0001.png    segmentation targets (python -m trainer.prepare)
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

JSON_SUFFIXES = (".json", ".jsonl")
RELEASE_IMAGES = "tuning_data"


class DataPathError(ValueError):
    """A missing or ambiguous data path; `flag` is the command-line flag that sets it."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag = flag


@dataclasses.dataclass(frozen=True)
class DataPaths:
    records: str                  # the JSON / JSONL file
    images: str                   # root of the records' relative image paths
    depth: Optional[str]          # root of the depth targets (None: depth not trained)
    mask: Optional[str]           # root of the segmentation targets (None: seg not trained)


def _records_file(data: str) -> str:
    if os.path.isfile(data):
        return data
    if not os.path.isdir(data):
        raise DataPathError("--data", f"no such file or folder {data!r} (a LLaVA-format "
                                      f".json / .jsonl file, or the folder that holds one)")
    found = sorted(n for n in os.listdir(data)
                   if n.lower().endswith(JSON_SUFFIXES) and not n.startswith("."))
    if len(found) != 1:
        what = f"{len(found)} of them ({', '.join(found)})" if found else "none"
        raise DataPathError("--data", f"the folder {data!r} must hold exactly one .json / "
                                      f".jsonl file of records, found {what}; pass the file")
    return os.path.join(data, found[0])


def resolve(data: str, images: Optional[str] = None, depth_dir: Optional[str] = None,
            mask_dir: Optional[str] = None, tasks: Sequence[str] = ()) -> DataPaths:
    """The data set's paths with the defaults filled in; a missing folder is a
    DataPathError naming its flag. Target folders are needed only for the tasks trained."""
    records = _records_file(data)
    if images is None:
        images = os.path.join(os.path.dirname(os.path.abspath(records)), RELEASE_IMAGES)
        if not os.path.isdir(images):
            raise DataPathError("--images", f"no image folder given and the release layout's "
                                            f"{images!r} next to the records does not exist; "
                                            f"pass --images DIR")
    elif not os.path.isdir(images):
        raise DataPathError("--images", f"no such folder {images!r}")
    root = os.path.normpath(images)
    folders = {}
    for task, flag, given, suffix in (("depth", "--depth-dir", depth_dir, "_depth"),
                                      ("seg", "--mask-dir", mask_dir, "_mask")):
        if task not in tasks:
            folders[task] = given
            continue
        path = given if given is not None else root + suffix
        if not os.path.isdir(path):
            raise DataPathError(flag, f"no such folder {path!r} for the {task} targets; make "
                                      f"it with `python -m trainer.prepare {images}` or pass "
                                      f"{flag} DIR (or leave {task} out with --tasks)")
        folders[task] = path
    return DataPaths(records, images, folders["depth"], folders["seg"])
