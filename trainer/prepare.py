"""`python -m trainer.prepare`: depth and segmentation targets for a folder of images, made
by the teachers the papers use (DESIGN.md 6), laid out as in the UniMRG release:

    tuning_data/coco/0001.jpg  ->  tuning_data_depth/coco/0001.png   8-bit grey, Depth Anything V2
                                   tuning_data_mask/coco/0001.png    RGB, SAM automatic masks

Any nesting under the image folder is mirrored; every output is a .png of the image's own
size. --seg-style unimrg draws each mask's boundary, white on black (UniMRG); sgt fills
each mask with its own colour (SGT). Teachers load from local folders only
(save_pretrained output); nothing is downloaded.

The run can be stopped and started again: an image whose output exists is skipped, and
every output is written to a temporary file that then replaces the target, so a stopped
run never leaves a truncated PNG behind (the files get the mode a plain save would, 0o666
less the umask). An image that cannot be decoded is skipped, counted and named at the end;
so is one that a teacher cannot take (a 1-pixel-wide strip, or an aspect ratio so extreme
that the processor's resize gives a side of 0): a batch that fails is retried image by
image, and only the images that fail alone are left out, and tried again by a rerun.
Symlinked sub-folders are followed (a link back to a folder above is not: a loop).
The mask folder records its style (datapaths.SEG_STYLE_FILE), which the trainer checks
against its --seg-style; a run into a folder of the other style is refused. Bad arguments,
missing folders and models that do not load are reported before any work starts (exit
code 2).
"""
from __future__ import annotations

import argparse
import collections
import concurrent.futures as cf
import dataclasses
import errno
import json
import os
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

# the image extensions and which image owns a shared stem's output: the trainer's target
# lookup shares them
from trainer.datapaths import IMAGE_EXTENSIONS, target_owner
TASKS = ("depth", "seg")
SEG_STYLES = ("unimrg", "sgt")
DEVICES = ("cuda", "cpu")
# Batches decoded ahead of the model, and threads that decode images and encode PNGs.
PREFETCH_BATCHES = 2
IO_THREADS = max(1, min(4, os.cpu_count() or 1))


class PrepareError(ValueError):
    """A bad argument, a missing folder or a model that cannot be loaded (exit code 2)."""


@dataclasses.dataclass
class Summary:
    """What a run did. `skipped` maps an image's relative path to why it was not read;
    `failed[task]` the images that task's teacher could not take (alone) to why."""

    images: int
    written: Dict[str, int]
    existing: Dict[str, int]
    skipped: Dict[str, str]
    out_dirs: Dict[str, Path]
    failed: Dict[str, Dict[str, str]] = dataclasses.field(default_factory=dict)


# ------------------------------------------------------------------------------ files
def list_images(root: Path, exclude: Sequence[Path] = ()) -> List[Path]:
    """Relative paths of the images under root, sorted. Hidden files and folders (e.g.
    macOS' ._name.jpg resource forks, .ipynb_checkpoints) and the `exclude` folders (output
    folders placed inside the image folder) are left out.

    Symlinked folders are followed (LLaVA image folders are often assembled from links,
    tuning_data/coco -> /datasets/coco, and the trainer reads through them). A folder whose
    real path is one of its own ancestors' is a loop and is not entered; a real folder
    reached by two different paths is listed under both, as the records may name either."""
    excluded = {os.path.realpath(p) for p in exclude}
    found = []
    ancestors = {os.path.normpath(root): {os.path.realpath(root)}}  # real paths down to it
    for folder, dirs, files in os.walk(root, followlinks=True):
        above = ancestors.pop(os.path.normpath(folder), set())
        kept = []
        for d in sorted(dirs):
            real = os.path.realpath(os.path.join(folder, d))
            if d.startswith(".") or real in excluded or real in above:
                continue
            ancestors[os.path.normpath(os.path.join(folder, d))] = above | {real}
            kept.append(d)
        dirs[:] = kept
        for name in files:
            # isfile follows links and leaves out FIFOs and devices: os.walk lists them as
            # files, and opening a FIFO named x.png would block forever
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS) \
                    and os.path.isfile(os.path.join(folder, name)):
                found.append(Path(os.path.relpath(os.path.join(folder, name), root)))
    return sorted(found, key=lambda p: p.as_posix())


def output_path(out_root: Path, rel: Path) -> Path:
    return out_root / rel.with_suffix(".png")


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"   # the IEND chunk: length, type, CRC


def is_done(path: Path) -> bool:
    """Only the final name counts (never a leftover temporary file), and only a whole PNG:
    it starts with the signature and ends with the IEND chunk. An empty or cut-off file
    (a power cut before the data reached the disk, a partial copy of the folder) is redone
    instead of being skipped as finished and then skipped by the trainer as bad_depth on
    every epoch. Reads 20 bytes; nothing is decoded."""
    try:
        if not path.is_file() or path.stat().st_size < len(PNG_SIGNATURE) + len(PNG_END):
            return False
        with open(path, "rb") as fh:
            head = fh.read(len(PNG_SIGNATURE))
            fh.seek(-len(PNG_END), os.SEEK_END)
            return head == PNG_SIGNATURE and fh.read() == PNG_END
    except OSError:
        return False


def write_png(path: Path, array: np.ndarray) -> None:
    """Writes the PNG atomically (report.atomic_write; no fsync: a lost file after a power
    cut is only redone by the next run, which skips finished files)."""
    from PIL import Image

    from trainer.report import atomic_write

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda fh: Image.fromarray(array).save(fh, format="PNG"), fsync=False)


def write_seg_style(folder: Path, style: str) -> None:
    """Records the mask folder's style (datapaths.SEG_STYLE_FILE) for the trainer's
    --seg-style check."""
    from trainer.datapaths import SEG_STYLE_FILE

    text = json.dumps({"seg_style": style}) + "\n"
    from trainer.report import atomic_write

    Path(folder).mkdir(parents=True, exist_ok=True)
    atomic_write(Path(folder) / SEG_STYLE_FILE, lambda fh: fh.write(text.encode()))


def load_image(path: Path):
    """Decodes the whole file now (so a truncated or corrupt one fails here) into RGB,
    16-bit grey scaled to 8 bits by the trainer's own realdata.to_rgb. No EXIF rotation:
    the targets share the pixel grid that Image.open(...) gives, the way the trainer reads
    the image."""
    from trainer.realdata import load_image as decode, to_rgb

    return to_rgb(decode(str(path)))


def probe(path: Path) -> Tuple[Optional[tuple], Optional[str]]:
    """Reads the header only: (sort key, None), or (None, why) for a file that is not an
    image at all. The key puts images of one aspect ratio (one Depth Anything input shape)
    next to each other so that they share batches."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            width, height = image.size
    except Exception as exc:  # noqa: BLE001 - any unreadable file is skipped, not fatal
        return None, f"{type(exc).__name__}: {exc}"
    return (round(width / max(height, 1), 3), height, width), None


def _batches(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _try_load(root: Path, rel: Path):
    try:
        return rel, load_image(root / rel), None
    except Exception as exc:  # noqa: BLE001 - any undecodable file is skipped, not fatal
        return rel, None, f"{type(exc).__name__}: {exc}"


def _decoded_batches(pool: cf.Executor, root: Path, rels: Sequence[Path],
                     batch_size: int) -> Iterator[list]:
    """Batches of (rel, image or None, error or None), decoded by the pool while the model
    runs on earlier batches (at most PREFETCH_BATCHES ahead, so memory stays bounded)."""
    queue: collections.deque = collections.deque()
    for batch in _batches(rels, batch_size):
        queue.append([pool.submit(_try_load, root, rel) for rel in batch])
        if len(queue) > PREFETCH_BATCHES:
            yield [f.result() for f in queue.popleft()]
    while queue:
        yield [f.result() for f in queue.popleft()]


# ------------------------------------------------------------------------------- runs
@dataclasses.dataclass
class _Plan:
    root: Path
    images: List[Path]
    tasks: Tuple[str, ...]
    out_dirs: Dict[str, Path]
    models: Dict[str, Path]
    device: str
    passed_over: Dict[str, str]   # images whose stem's output another image takes: why


def _parse_tasks(tasks) -> Tuple[str, ...]:
    if isinstance(tasks, str):
        tasks = [t.strip() for t in tasks.split(",") if t.strip()]
    tasks = tuple(dict.fromkeys(tasks))
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise PrepareError(f"--tasks must be a comma-separated subset of {','.join(TASKS)}, "
                           f"got {','.join(tasks) or 'nothing'}")
    return tasks


def _resolve_device(device: Optional[str]) -> str:
    import torch

    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise PrepareError(f"--device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise PrepareError("--device cuda was asked for, but torch sees no CUDA device")
    return device


def plan(images, *, depth_out=None, seg_out=None, depth_model=None, sam_model=None,
         tasks=TASKS, batch_size: int = 8, points_per_batch: int = 64,
         device: Optional[str] = None, seg_style: str = "unimrg",
         limit: Optional[int] = None, sam_max_size: int = 2048) -> _Plan:
    """Checks everything that can be checked without loading a model; PrepareError if not."""
    from trainer.teachers import TeacherError, _check_model_dir

    if images is None:
        raise PrepareError("--images is required")
    root = Path(os.path.abspath(images))  # abspath: no symlink resolution, so the
    if not root.is_dir():                 # sibling output folders sit where the user looks
        raise PrepareError(f"image folder {str(images)!r} does not exist or is not a folder")
    tasks = _parse_tasks(tasks)
    if seg_style not in SEG_STYLES:
        raise PrepareError(f"--seg-style must be one of {', '.join(SEG_STYLES)}, "
                           f"got {seg_style!r}")
    for flag, value in (("--batch-size", batch_size), ("--points-per-batch", points_per_batch)):
        if int(value) < 1:
            raise PrepareError(f"{flag} must be >= 1, got {value}")
    if limit is not None and int(limit) < 1:
        raise PrepareError(f"--limit must be >= 1, got {limit}")
    if int(sam_max_size) < 0:
        raise PrepareError(f"--sam-max-size must be >= 0 (0: never shrink), got {sam_max_size}")
    device = _resolve_device(device)

    defaults = {"depth": root.parent / f"{root.name}_depth",
                "seg": root.parent / f"{root.name}_mask"}
    given = {"depth": depth_out, "seg": seg_out}
    out_dirs = {t: Path(os.path.abspath(given[t])) if given[t] else defaults[t] for t in tasks}
    for task, out in out_dirs.items():
        if os.path.realpath(out) == os.path.realpath(root):
            raise PrepareError(f"the {task} output folder must not be the image folder ({out})")
        if out.exists() and not out.is_dir():
            raise PrepareError(f"the {task} output folder {str(out)!r} is a file")
    if len(out_dirs) == 2 and (os.path.realpath(out_dirs["depth"])
                               == os.path.realpath(out_dirs["seg"])):
        raise PrepareError(f"depth and segmentation outputs need different folders, both are "
                           f"{out_dirs['depth']}")
    if "seg" in out_dirs:
        _check_seg_style(out_dirs["seg"], seg_style)

    flags = {"depth": ("--depth-model", depth_model, "depth"),
             "seg": ("--sam-model", sam_model, "SAM")}
    models = {}
    for task in tasks:
        flag, path, what = flags[task]
        if not path:
            raise PrepareError(f"{flag} is required for the {task} task")
        try:
            models[task] = _check_model_dir(path, what)
        except TeacherError as exc:
            raise PrepareError(f"{exc} (given by {flag})") from None

    found = list_images(root, exclude=list(out_dirs.values()))
    if not found:
        raise PrepareError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}")
    clashes = collections.defaultdict(list)   # on the whole folder: a limit must not
    # split x.gif from x.jpg (the .gif would write x.png, which the trainer gives the .jpg)
    for rel in found:
        clashes[rel.with_suffix(".png").as_posix()].append(rel.as_posix())
    passed_over, ambiguous = {}, []
    for names in (v for v in clashes.values() if len(v) > 1):
        owner = target_owner([os.path.basename(n) for n in names])   # one folder: by name
        if owner is None:
            ambiguous.append(names)
            continue
        for name in names:   # a .tif master beside its .jpg: the .jpg's target, the trainer
            if os.path.basename(name) != owner:   # gives the .tif none (datapaths)
                passed_over[name] = f"shares its output name with {owner}, which takes it"
    if ambiguous:
        shown = "; ".join(" and ".join(v) for v in ambiguous[:5])
        raise PrepareError(f"{len(ambiguous)} output name(s) would be shared by several images "
                           f"(the outputs are .png): {shown}. Rename them first.")
    found = [rel for rel in found if rel.as_posix() not in passed_over]
    if limit is not None:
        found = found[:int(limit)]
    return _Plan(root, found, tasks, out_dirs, models, device, passed_over)


def _check_seg_style(folder: Path, seg_style: str) -> None:
    """Resuming into a mask folder of the other style would mix the two in one folder."""
    from trainer.datapaths import SEG_STYLE_FILE, DataPathError, read_seg_style

    try:
        found = read_seg_style(str(folder)) if folder.is_dir() else None
    except DataPathError as exc:
        raise PrepareError(exc.message) from None
    if found is not None and found != seg_style:
        raise PrepareError(f"the segmentation output folder {str(folder)!r} holds "
                           f"--seg-style {found} targets (its {SEG_STYLE_FILE}); pass "
                           f"--seg-style {found} to complete it, or another --seg-out")


def _why(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 200 else text[:197] + "..."


def _collect(writes: List[Tuple[Path, cf.Future]], summary, task: str) -> None:
    """Waits for PNG writes. One that fails (a name the file system cannot hold, a
    permission) counts as that image's failure, as a failed inference does; a full disk
    or quota stops the run (every later write would fail too)."""
    for rel, future in writes:
        try:
            future.result()
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            summary.failed[task][rel.as_posix()] = _why(exc)
            continue
        summary.written[task] += 1


def _printable(text: str) -> str:
    """A file name as the terminal can print it: bytes that are not UTF-8 (they reach
    Python as surrogates, e.g. a Latin-1 'café.jpg') as \\x escapes, not an
    UnicodeEncodeError."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _infer_each(infer: Callable, good: List[tuple]) -> Tuple[List[tuple], Dict[str, str]]:
    """[(rel, image)] -> ([(rel, image, result)], {rel: why}). A batch the teacher fails on
    is retried image by image: one image it cannot take (a 1-pixel-wide strip, an extreme
    aspect ratio) then costs only itself, never the run, nor a rerun."""
    try:
        results = infer([image for _, image in good])
        return [(rel, image, r) for (rel, image), r in zip(good, results)], {}
    except Exception as exc:  # noqa: BLE001 - retried below, one image at a time
        if len(good) == 1:
            return [], {good[0][0].as_posix(): _why(exc)}
    done, failed = [], {}
    for rel, image in good:
        try:
            done.append((rel, image, infer([image])[0]))
        except Exception as exc:  # noqa: BLE001 - this image is left out, counted, named
            failed[rel.as_posix()] = _why(exc)
    return done, failed


def _load_teachers(p: _Plan, pending: Dict[str, List[Path]], batch_size: int,
                   points_per_batch: int, sam_max_size: int) -> dict:
    """Loads (on the CPU) every teacher that has work, so a model that does not load stops
    the run before any output is written."""
    from trainer.teachers import DepthTeacher, MaskGenerator, MaskSettings, TeacherError

    teachers = {}
    try:
        if pending.get("depth"):
            teachers["depth"] = DepthTeacher.load(p.models["depth"], batch_size=batch_size)
        if pending.get("seg"):
            settings = MaskSettings(points_per_batch=points_per_batch,
                                    max_size=int(sam_max_size))
            teachers["seg"] = MaskGenerator.load(p.models["seg"], settings, batch_size=batch_size)
    except TeacherError as exc:
        raise PrepareError(str(exc)) from None
    return teachers


def _run_task(task: str, infer: Callable, render: Callable, p: _Plan,
              rels: List[Path], batch_size: int, summary: Summary, progress: bool) -> None:
    from tqdm.auto import tqdm

    out_root = p.out_dirs[task]
    bar = tqdm(total=len(rels), desc=task, unit="img", disable=not progress, dynamic_ncols=True)
    writes: List[Tuple[Path, cf.Future]] = []
    with cf.ThreadPoolExecutor(IO_THREADS, thread_name_prefix="prepare-io") as pool:
        for batch in _decoded_batches(pool, p.root, rels, batch_size):
            good = [(rel, image) for rel, image, _ in batch if image is not None]
            for rel, _, error in batch:
                if error is not None:
                    summary.skipped[rel.as_posix()] = error
            done, failed = _infer_each(infer, good) if good else ([], {})
            summary.failed[task].update(failed)
            _collect(writes, summary, task)   # the previous batch's PNGs
            writes = []
            for rel, image, result in done:
                try:
                    array = render(result, (image.height, image.width))
                except Exception as exc:  # noqa: BLE001 - as a failed inference
                    summary.failed[task][rel.as_posix()] = _why(exc)
                    continue
                writes.append((rel, pool.submit(write_png, output_path(out_root, rel), array)))
            bar.update(len(batch))
            if summary.skipped or summary.failed[task]:
                bar.set_postfix(skipped=len(summary.skipped), failed=len(summary.failed[task]),
                                refresh=False)
        _collect(writes, summary, task)
    bar.close()


def prepare(images, *, depth_out=None, seg_out=None, depth_model=None, sam_model=None,
            tasks=TASKS, batch_size: int = 8, points_per_batch: int = 64,
            device: Optional[str] = None, seg_style: str = "unimrg",
            limit: Optional[int] = None, progress: bool = True,
            sam_max_size: int = 2048) -> Summary:
    """Writes the missing depth / segmentation targets of the images under `images`.

    images       the image folder (.jpg .jpeg .png .webp .gif .bmp .tif .tiff, any nesting)
    depth_out    default <images>_depth; 8-bit grey PNGs, min-max normalised per image
    seg_out      default <images>_mask; RGB PNGs in `seg_style` (unimrg: white mask
                 boundaries on black; sgt: masks filled with distinct colours)
    depth_model  local Depth Anything (V2) checkpoint folder (needed for the depth task)
    sam_model    local SAM checkpoint folder (needed for the seg task)
    tasks        "depth,seg" or a subset, as a string or a sequence
    batch_size   images per depth forward and per SAM image-encoder forward
    points_per_batch  SAM prompts per mask-decoder call (memory only; same masks)
    device       "cuda" / "cpu"; default cuda when torch sees one. Both teachers run in
                 fp32, as the released inference does (SAM's thresholds act on logits)
    limit        only the first `limit` images (sorted relative paths)
    sam_max_size SAM works on an image shrunk so its longer side is at most this (area
                 interpolation), the target scaled back by nearest neighbour (UniMRG's
                 run_mask.py, default 2048); 0: full size

    Raises PrepareError (before any output is written) on a bad argument, a missing folder,
    a seg_out folder of the other seg_style or a teacher that cannot be loaded. Undecodable
    images are skipped and listed in the returned Summary (`skipped`), and so are images a
    teacher cannot take (`failed`, by task).
    """
    from trainer.datapaths import SEG_STYLE_FILE
    from trainer.teachers import SEG_RENDERERS, depth_to_png_array, enlarge, shrink, work_size

    p = plan(images, depth_out=depth_out, seg_out=seg_out, depth_model=depth_model,
             sam_model=sam_model, tasks=tasks, batch_size=batch_size,
             points_per_batch=points_per_batch, device=device, seg_style=seg_style,
             limit=limit, sam_max_size=sam_max_size)
    summary = Summary(images=len(p.images), written={t: 0 for t in p.tasks},
                      existing={t: 0 for t in p.tasks}, skipped=dict(p.passed_over),
                      out_dirs=dict(p.out_dirs),
                      failed={t: {} for t in p.tasks})
    pending = {}
    for task in p.tasks:
        pending[task] = [rel for rel in p.images
                         if not is_done(output_path(p.out_dirs[task], rel))]
        summary.existing[task] = len(p.images) - len(pending[task])
    # Headers first: a file that is no image at all is skipped here, so a resumed run whose
    # only pending files are such never loads a teacher. Truncated data shows when decoded.
    keys = {}
    for rel in sorted(set().union(*pending.values()), key=lambda r: r.as_posix()):
        keys[rel], error = probe(p.root / rel)
        if error is not None:
            summary.skipped[rel.as_posix()] = error
    for task in p.tasks:
        pending[task] = [rel for rel in pending[task] if keys[rel] is not None]
    if pending.get("depth"):
        pending["depth"].sort(key=lambda rel: (keys[rel], rel.as_posix()))
    teachers = _load_teachers(p, pending, batch_size, points_per_batch, sam_max_size)

    def render_depth(depth, shape):
        assert depth.shape == shape, (depth.shape, shape)
        return depth_to_png_array(depth)

    seg_renderer = SEG_RENDERERS[seg_style]

    def seg_tasks(generator):
        """(infer, render) of the seg task: SAM on each image at its work size, the target
        drawn there and scaled back to the image (UniMRG's order: Canny, then resize)."""
        max_size = generator.settings.max_size

        def infer(images):
            return generator.masks([shrink(im, *work_size(im.height, im.width, max_size))
                                    for im in images])

        def render(masks, shape):
            return enlarge(seg_renderer(masks, work_size(*shape, max_size)), *shape)
        return infer, render
    for task in p.tasks:
        if not pending[task]:
            continue
        # before the first mask, so that a stopped run has it too (plan refused another one)
        if task == "seg" and not (p.out_dirs["seg"] / SEG_STYLE_FILE).is_file():
            write_seg_style(p.out_dirs["seg"], seg_style)
        # One teacher on the device at a time.
        teacher = teachers.pop(task).to(p.device)
        infer, render = (teacher.predict, render_depth) if task == "depth" else \
            seg_tasks(teacher)
        try:
            _run_task(task, infer, render, p, pending[task], batch_size, summary,
                      progress)
        finally:
            del teacher, infer
            if p.device == "cuda":
                import torch

                torch.cuda.empty_cache()
    return summary


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.prepare",
        description="Depth (Depth Anything V2) and segmentation (SAM automatic masks) targets "
                    "for a folder of images, in the UniMRG release's layout: <images>_depth/ "
                    "and <images>_mask/ mirror the image folder, one .png per image. Resumable: "
                    "images whose outputs exist are skipped.")
    parser.add_argument("--images", required=True, metavar="DIR",
                        help="image folder (.jpg .jpeg .png .webp .gif .bmp .tif .tiff, any "
                             "nesting)")
    parser.add_argument("--depth-out", metavar="DIR", help="default: <images>_depth")
    parser.add_argument("--seg-out", metavar="DIR", help="default: <images>_mask")
    parser.add_argument("--depth-model", metavar="PATH",
                        help="local Depth Anything V2 checkpoint folder (for the depth task)")
    parser.add_argument("--sam-model", metavar="PATH",
                        help="local SAM checkpoint folder (for the seg task)")
    parser.add_argument("--tasks", default="depth,seg", help="depth,seg or one of them")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N",
                        help="images per depth forward and per SAM image-encoder forward "
                             "(default 8)")
    parser.add_argument("--points-per-batch", type=int, default=64, metavar="N",
                        help="SAM point prompts per mask-decoder call; lower it if the GPU runs "
                             "out of memory on large images (default 64; same masks)")
    parser.add_argument("--device", choices=DEVICES, default=None,
                        help="default: cuda if torch sees one, else cpu")
    parser.add_argument("--seg-style", choices=SEG_STYLES, default="unimrg",
                        help="unimrg: white mask boundaries on black; sgt: masks filled with "
                             "distinct colours (default unimrg). Recorded in the mask folder's "
                             "seg_style.json, which the trainer checks against its --seg-style")
    parser.add_argument("--sam-max-size", type=int, default=2048, metavar="PX",
                        help="SAM works on images shrunk to at most this longer side, the "
                             "target scaled back (UniMRG's setting; default 2048, 0: never)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="only the first N images (sorted paths)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        summary = prepare(args.images, depth_out=args.depth_out, seg_out=args.seg_out,
                          depth_model=args.depth_model, sam_model=args.sam_model,
                          tasks=args.tasks, batch_size=args.batch_size,
                          points_per_batch=args.points_per_batch, device=args.device,
                          seg_style=args.seg_style, limit=args.limit,
                          progress=not args.no_progress, sam_max_size=args.sam_max_size)
    except PrepareError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{summary.images} image(s)")
    for task in summary.written:
        failed = len(summary.failed.get(task, ()))
        print(f"  {task}: {summary.written[task]} written, {summary.existing[task]} already "
              f"present{f', {failed} failed' if failed else ''} -> {summary.out_dirs[task]}")
    if summary.skipped:
        print(f"skipped {len(summary.skipped)} image(s) (unreadable, or another image takes "
              f"their output name):")
        for rel, why in sorted(summary.skipped.items())[:20]:
            print(_printable(f"  {rel}: {why}"))
        if len(summary.skipped) > 20:
            print(f"  ... and {len(summary.skipped) - 20} more")
    failures = sorted((rel, task, why) for task, by_rel in summary.failed.items()
                      for rel, why in by_rel.items())
    if failures:
        print(f"no target could be made for {len(failures)} image(s) (the teacher could not "
              f"take them, or their PNG could not be written; left out, a rerun tries them "
              f"again):")
        for rel, task, why in failures[:20]:
            print(_printable(f"  {rel} ({task}): {why}"))
        if len(failures) > 20:
            print(f"  ... and {len(failures) - 20} more")
    return 0


if __name__ == "__main__":
    sys.exit(main())
