"""Where a real data set lives: --data, --images, --depth-dir, --mask-dir (no torch here:
the configuration checks the folders before any work starts).

The UniMRG release's layout, which the defaults follow:

    data/llava_v1_5_mix665k.json     LLaVA-format records (a JSON list or JSON Lines)
    data/tuning_data/coco/0001.jpg   images, at the records' relative "image" paths
    data/tuning_data_depth/coco/0001.png   depth targets (python -m trainer.prepare)
    data/tuning_data_mask/coco/0001.png    segmentation targets (python -m trainer.prepare)
    data/tuning_data_mask/seg_style.json   {"seg_style": "unimrg" | "sgt"}, written by prepare

A target is looked up as the release's loaders do: at the image's own relative path, then
with .png, then with .jpg (target_path).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shlex
from typing import Dict, List, Optional, Sequence, Tuple

JSON_SUFFIXES = (".json", ".jsonl")
# The images prepare makes targets for (any case). The first four come first: with a
# .gif / .bmp / .tif beside a .jpg of the same stem, the .jpg owns the stem's target.
PRIMARY_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
IMAGE_EXTENSIONS = PRIMARY_EXTENSIONS + (".gif", ".bmp", ".tif", ".tiff")
RELEASE_IMAGES = "tuning_data"
TARGET_SUFFIXES = (".png", ".jpg")   # after the image's own name, as the release's loaders
# prepare's record of a mask folder's style; the trainer compares it with --seg-style
SEG_STYLE_FILE = "seg_style.json"
STYLE_NAMES = {"unimrg": "UniMRG boundaries (white on black)",
               "sgt": "SGT coloured instances"}
PREPARE_STYLES = {False: "unimrg", True: "sgt"}   # by the trainer's seg_colour


class DataPathError(ValueError):
    """A missing or ambiguous data path; `flag` is the command-line flag that sets it."""

    def __init__(self, flag: str, message: str):
        super().__init__(f"{flag}: {message}")
        self.flag, self.message = flag, message


@dataclasses.dataclass(frozen=True)
class DataPaths:
    records: str                  # the JSON / JSONL file
    images: str                   # root of the records' relative image paths
    depth: Optional[str]          # root of the depth targets (None: depth not trained)
    mask: Optional[str]           # root of the segmentation targets (None: seg not trained)


def target_names(rel: str) -> List[str]:
    """Where the target of the image at relative path `rel` may be, in the order looked."""
    stem = os.path.splitext(rel)[0]
    return list(dict.fromkeys([rel] + [stem + suffix for suffix in TARGET_SUFFIXES]))


def target_owner(names: Sequence[str]) -> Optional[str]:
    """Which of the images sharing a stem owns the stem's renamed target (stem.png, all
    that prepare can write for them): the only one, else the only one of a primary
    extension; None when that is ambiguous (prepare refuses such a folder)."""
    if len(names) == 1:
        return names[0]
    primary = [n for n in names if n.lower().endswith(PRIMARY_EXTENSIONS)]
    return primary[0] if len(primary) == 1 else None


@functools.lru_cache(maxsize=256)
def _images_by_stem(folder: str, mtime_ns: int) -> Dict[str, Tuple[str, ...]]:
    """stem -> the image names in `folder` with that stem (prepare's extensions, any case),
    as spelled there. One listing per folder (and version of it: its mtime) and process:
    a target lookup per record and task then costs one stat, not one per extension (a
    data set on a network file system would feel them)."""
    try:
        names = os.listdir(folder)
    except OSError:
        return {}
    by_stem: Dict[str, List[str]] = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS:
            by_stem.setdefault(stem, []).append(name)
    return {stem: tuple(sorted(found)) for stem, found in by_stem.items()}


def same_stem_images(images: str, rel: str) -> List[str]:
    """The names of the images in rel's folder with rel's stem, rel's own name included
    (also when its extension is none prepare takes)."""
    folder, name = os.path.split(rel)
    folder = os.path.join(images, folder)
    try:
        version = os.stat(folder).st_mtime_ns
    except OSError:
        return [name]
    found = list(_images_by_stem(folder, version).get(os.path.splitext(name)[0], ()))
    return found if name in found else found + [name]


def target_path(root: str, rel: str, images: Optional[str] = None) -> Optional[str]:
    """The target of the image at relative path `rel` under `root`: the image's own name
    first, then .png (what prepare writes), then .jpg; None if there is none. An image
    path that is absolute or leaves its folder ("../x.png") has none: joined to the target
    root it would name the image itself (os.path.join drops the root for an absolute
    path, and tuning_data/../x.png is tuning_data_depth/../x.png), a photo as its own
    depth map; prepare makes targets only for images inside the folder.

    With `images` (the image folder), a renamed target (stem.png, stem.jpg) is taken only
    by the image that owns its stem (target_owner): for x.gif beside x.png or x.jpg,
    depth/x.png is the other image's depth map, never x.gif's."""
    norm = os.path.normpath(rel)
    if os.path.isabs(norm) or norm == os.pardir or norm.startswith(os.pardir + os.sep):
        return None
    owns_stem = None
    for name in target_names(rel):
        if name != rel and images is not None:
            if owns_stem is None:   # looked up once, and only when a renamed name is tried
                owns_stem = (target_owner(same_stem_images(images, rel))
                             == os.path.basename(rel))
            if not owns_stem:
                continue
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    return None


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


def prepare_command(images: str, task: str, out: Optional[str] = None,
                    seg_colour: bool = False) -> str:
    """The `python -m trainer.prepare` command that makes `task`'s targets for `images` (in
    `out`, when that is not prepare's default folder), in the style this run trains."""
    images = os.path.abspath(images)
    if task == "depth":
        flags = ["--depth-model", "DEPTH_ANYTHING_V2_DIR"]
        out_flag, default = "--depth-out", "_depth"
    else:
        flags = ["--sam-model", "SAM_DIR", "--seg-style", PREPARE_STYLES[bool(seg_colour)]]
        out_flag, default = "--seg-out", "_mask"
    if out is not None and os.path.abspath(out) != images + default:
        flags += [out_flag, os.path.abspath(out)]
    words = ["python", "-m", "trainer.prepare", "--images", images, "--tasks", task, *flags]
    return " ".join(shlex.quote(w) for w in words)


def read_seg_style(folder: str) -> Optional[str]:
    """The style prepare recorded in a mask folder (SEG_STYLE_FILE), or None where there is
    no record (the release's own folders, or targets made by other tools)."""
    path = os.path.join(folder, SEG_STYLE_FILE)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as fh:
            style = json.load(fh).get("seg_style")
    except (OSError, ValueError, AttributeError) as exc:
        raise DataPathError("--mask-dir", f"cannot read {path!r} ({exc}); remove it or make "
                                          f"the folder again with trainer.prepare") from None
    if style not in STYLE_NAMES:
        raise DataPathError("--mask-dir", f"{path!r} names an unknown style {style!r}; "
                                          f"allowed values: {', '.join(STYLE_NAMES)}")
    return style


def _check_seg_style(images: str, mask: str, seg_colour: bool) -> None:
    """A mask folder made in the other style would train the wrong target without a word:
    the seg sample is whatever image is in the folder."""
    found, wanted = read_seg_style(mask), PREPARE_STYLES[bool(seg_colour)]
    if found is None or found == wanted:
        return
    other = "colour" if found == "sgt" else "edges"
    command = prepare_command(images, "seg", f"{mask}_{wanted}", seg_colour)
    raise DataPathError("--seg-style", f"this run trains {STYLE_NAMES[wanted]} but the mask "
                                       f"folder {mask!r} holds {STYLE_NAMES[found]} (its "
                                       f"{SEG_STYLE_FILE}); pass --seg-style {other}, or "
                                       f"--mask-dir a folder made with `{command}`")


def resolve(data: str, images: Optional[str] = None, depth_dir: Optional[str] = None,
            mask_dir: Optional[str] = None, tasks: Sequence[str] = (),
            seg_colour: Optional[bool] = None) -> DataPaths:
    """The data set's paths with the defaults filled in; a missing folder is a
    DataPathError naming its flag. Target folders are needed only for the tasks trained.
    With `seg_colour` (the run's segmentation style) a mask folder that prepare marked with
    the other style is a DataPathError naming --seg-style."""
    records = _records_file(data)
    if images is None:
        images = os.path.join(os.path.dirname(os.path.abspath(records)), RELEASE_IMAGES)
        if not os.path.isdir(images):
            raise DataPathError("--images", f"no image folder given and the release layout's "
                                            f"{images!r} next to the records does not exist; "
                                            f"pass --images DIR")
    elif not os.path.isdir(images):
        raise DataPathError("--images", f"no such folder {images!r}")
    # abspath as prepare.plan takes it, so that `--images .` gives <parent>/<name>_depth
    root = os.path.abspath(images)
    folders = {}
    for task, flag, given, suffix in (("depth", "--depth-dir", depth_dir, "_depth"),
                                      ("seg", "--mask-dir", mask_dir, "_mask")):
        if task not in tasks:
            folders[task] = given
            continue
        path = given if given is not None else root + suffix
        if not os.path.isdir(path):
            command = prepare_command(images, task, path, bool(seg_colour))
            raise DataPathError(flag, f"no such folder {path!r} for the {task} targets; make "
                                      f"it with `{command}` or pass {flag} DIR (or leave "
                                      f"{task} out with --tasks)")
        if os.path.realpath(path) == os.path.realpath(root):   # every photo its own target
            raise DataPathError(flag, f"{path!r} is the image folder itself; the {task} "
                                      f"targets live in a folder of their own")
        folders[task] = path
    if "seg" in tasks and seg_colour is not None:
        _check_seg_style(images, folders["seg"], seg_colour)
    return DataPaths(records, images, folders["depth"], folders["seg"])
