"""The teachers that make UniMRG / SGT targets from real images, and how their outputs are
drawn (DESIGN.md 6). Used by `python -m trainer.prepare`.

- Depth: Depth Anything V2 through transformers (AutoModelForDepthEstimation; the
  checkpoint's image processor gives the input size, multiple and normalisation), run as
  the model's own inference script (Depth-Anything-V2's run.py / infer_image) runs it, which
  made UniMRG's depth maps: the input scaled so that its SHORTER side is the model's size
  (518; transformers' processor scales as little as possible, often to a long side of
  518), bicubic on the [0, 1] image without antialiasing, fp32; the prediction (relative
  inverse depth: near is bright) resized back bilinearly with aligned corners, min-max
  normalised per image to [0, 1], written x 255 truncated to 8 bits.
- Segmentation: SAM automatic masks through transformers (SamModel + SamProcessor) with the
  UniMRG settings: a 32 x 32 point grid, predicted-IoU > 0.88, stability score >= 0.95
  (segment-anything's rule; transformers' own filter keeps > only), box NMS at IoU 0.7, no
  crop layers; an image whose longer side exceeds 2,048 px is shrunk to it first and the
  target scaled back with nearest neighbour (UniMRG's run_mask.py; `shrink` / `enlarge`). The steps are those of transformers'
  MaskGenerationPipeline (same image-processor calls, same order), run here directly
  because (a) the pipeline's NMS needs torchvision, which this project does not depend on,
  and (b) this way the image encoder runs on a batch of images.
- Rendering: UniMRG's boundary maps (white mask edges on black) or SGT's coloured
  instances (a distinct colour per mask, larger masks painted first).

Images go in as RGB PIL images; depth comes out as float32 [H, W] in [0, 1], masks as
bool [H, W] arrays, both at the image's own size.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import numpy as np
import torch

from trainer import scenes


class TeacherError(RuntimeError):
    """A teacher model folder that is missing or cannot be loaded."""


def _check_model_dir(path, what: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise TeacherError(f"{what} model folder {str(path)!r} does not exist")
    if not (path / "config.json").is_file():
        raise TeacherError(f"{what} model folder {str(path)!r} has no config.json: not a "
                           f"transformers checkpoint (save_pretrained output)")
    return path


def _load(what: str, path: Path, loader, *args, **kwargs):
    try:
        return loader(str(path), *args, local_files_only=True, **kwargs)
    except Exception as exc:  # noqa: BLE001 - any load failure becomes one clear message
        raise TeacherError(f"cannot load the {what} model from {str(path)!r}: "
                           f"{type(exc).__name__}: {exc}") from exc


def _image_processor_from_pretrained(path: str, **kwargs):
    """AutoImageProcessor.from_pretrained, or, where this transformers cannot give
    AutoImageProcessor (some 5.x releases make it require torchvision, which has no CPU
    build on PyPI and is not a dependency here), the class the checkpoint's
    preprocessor_config.json names, which those releases fall back to its PIL twin."""
    import transformers

    try:
        return transformers.AutoImageProcessor.from_pretrained(path, **kwargs)
    except ImportError:
        config = json.loads((Path(path) / "preprocessor_config.json").read_text())
        name = config.get("image_processor_type")
        if not isinstance(name, str) or not hasattr(transformers, name):
            raise
        return getattr(transformers, name).from_pretrained(path, **kwargs)


# -------------------------------------------------------------------------------- depth
class DepthTeacher:
    """Depth Anything (V2) through transformers. `predict` takes any number of images of any
    sizes and batches those whose preprocessed shapes agree (the processor keeps the aspect
    ratio, so images of one aspect ratio share a shape; prepare sorts its work by it)."""

    def __init__(self, model, processor, device: torch.device | str = "cpu",
                 batch_size: int = 8):
        self.model = model.eval()
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def load(cls, path, device="cpu", batch_size: int = 8) -> "DepthTeacher":
        from transformers import AutoModelForDepthEstimation

        path = _check_model_dir(path, "depth")
        processor = _load("depth", path, _image_processor_from_pretrained)
        model = _load("depth", path, AutoModelForDepthEstimation.from_pretrained)
        # input_size follows Depth Anything's own inference; other depth models (DPT,
        # GLPN, ZoeDepth) size their inputs otherwise
        kind = getattr(model.config, "model_type", None)
        size = getattr(processor, "size", None)
        try:   # a dict, or transformers 5's SizeDict (every key present, None if unset)
            sized = size["height"] is not None and size["width"] is not None
        except (KeyError, TypeError):
            sized = False
        if kind != "depth_anything" or not sized:
            raise TeacherError(f"depth model folder {str(path)!r} holds a {kind!r} model "
                               f"with image size {size!r}; prepare runs Depth Anything "
                               f"(V2): model_type 'depth_anything', a height / width size")
        return cls(model, processor, device, batch_size)

    def to(self, device) -> "DepthTeacher":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    def input_size(self, height: int, width: int) -> Tuple[int, int]:
        """The model input (height, width) for an image, as Depth-Anything-V2's inference
        sizes it ("lower_bound"): the larger of the two scales that bring a side to the
        model's size, so the shorter side reaches it; each side then rounded to a
        multiple of ensure_multiple_of (half to even), or up to one where rounding went
        below the model's size. Raises ValueError past MAX_INPUT_AREA times the model's
        own area (a 1 x 1000 strip would ask for 518 x 518,000)."""
        size, multiple = self.processor.size, int(getattr(self.processor, "ensure_multiple_of", 1) or 1)
        target_h, target_w = int(size["height"]), int(size["width"])
        scale = max(target_h / height, target_w / width)

        def side(length: float, minimum: int) -> int:
            rounded = int(np.round(length / multiple) * multiple)
            return rounded if rounded >= minimum else int(np.ceil(length / multiple) * multiple)

        new_h, new_w = side(scale * height, target_h), side(scale * width, target_w)
        if new_h * new_w > self.MAX_INPUT_AREA * target_h * target_w:
            raise ValueError(f"a {width} x {height} image would be a {new_w} x {new_h} depth "
                             f"input, more than {self.MAX_INPUT_AREA} times the model's "
                             f"{target_w} x {target_h}: aspect ratio too extreme")
        return new_h, new_w

    MAX_INPUT_AREA = 16

    def pixels(self, image) -> torch.Tensor:
        """float32 [1, 3, h, w]: the image in [0, 1], resized bicubically (Keys' a = -0.75,
        OpenCV's INTER_CUBIC, no antialiasing) to input_size, then normalised."""
        import torch.nn.functional as F

        new_h, new_w = self.input_size(image.height, image.width)
        x = torch.from_numpy(np.asarray(image.convert("RGB"), np.float64) / 255.0)
        x = F.interpolate(x.permute(2, 0, 1)[None], (new_h, new_w), mode="bicubic",
                          align_corners=False)
        mean = torch.tensor(self.processor.image_mean, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(self.processor.image_std, dtype=torch.float64).view(1, 3, 1, 1)
        return ((x - mean) / std).float()

    @torch.inference_mode()
    def predict(self, images: Sequence) -> List[np.ndarray]:
        """RGB PIL images -> float32 [H, W] per image, min-max normalised to [0, 1] (a
        constant prediction gives zeros). An image whose input would be too large
        (input_size) raises, failing the call: trainer.prepare then retries its batch
        image by image."""
        import torch.nn.functional as F

        pixels = [self.pixels(image) for image in images]
        groups: Dict[Tuple[int, ...], List[int]] = {}
        for i, p in enumerate(pixels):
            groups.setdefault(tuple(p.shape), []).append(i)
        out: List[np.ndarray] = [None] * len(images)  # type: ignore[list-item]
        dtype = next(self.model.parameters()).dtype
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start:start + self.batch_size]
                batch = torch.cat([pixels[i] for i in chunk]).to(self.device, dtype)
                # fp32 as the released inference runs (no autocast)
                predicted = self.model(pixel_values=batch).predicted_depth.float()
                for i, depth in zip(chunk, predicted):
                    depth = F.interpolate(depth[None, None], (images[i].height, images[i].width),
                                          mode="bilinear", align_corners=True)[0, 0]
                    out[i] = normalise_depth(depth).cpu().numpy()
        return out


def normalise_depth(depth: torch.Tensor) -> torch.Tensor:
    """Per-image min-max to [0, 1]; a constant map becomes zeros (no division by zero)."""
    depth = depth.float()
    low, high = depth.min(), depth.max()
    span = high - low
    if span <= 0 or not torch.isfinite(span):
        return torch.zeros_like(depth)
    return ((depth - low) / span).clamp_(0.0, 1.0)


def depth_to_png_array(depth: np.ndarray) -> np.ndarray:
    """float [H, W] in [0, 1] -> uint8 [H, W] (8-bit grayscale, 0 = far, 255 = near):
    x 255 and truncated, as Depth-Anything-V2's run.py writes the maps UniMRG trained on
    (so 255 is the nearest pixel only; rounding would lift half the pixels one level)."""
    return np.floor(np.clip(depth, 0.0, 1.0).astype(np.float32) * np.float32(255.0)
                    ).astype(np.uint8)


# -------------------------------------------------------------------------- segmentation
@dataclasses.dataclass(frozen=True)
class MaskSettings:
    """SAM automatic-mask settings (UniMRG's release; also segment-anything's defaults)."""

    points_per_side: int = 32
    """The prompt grid is points_per_side x points_per_side points over the image."""
    pred_iou_thresh: float = 0.88
    """Keep a mask only if SAM's predicted IoU is above this."""
    stability_score_thresh: float = 0.95
    """Keep a mask only if its stability score (IoU of the masks binarised at logit
    threshold +- offset) is above this."""
    box_nms_thresh: float = 0.7
    """Drop a mask whose box overlaps a higher-scoring mask's box with IoU above this."""
    points_per_batch: int = 64
    """Prompts decoded per mask-decoder call (memory vs speed; no effect on the result)."""
    mask_threshold: float = 0.0
    stability_score_offset: float = 1.0
    max_size: int = 2048
    """trainer.prepare shrinks an image whose longer side exceeds this to it (`shrink`)
    before SAM and scales its target back (`enlarge`), as UniMRG's run_mask.py does (the
    boundaries are drawn at the small size); 0: never. MaskGenerator.masks itself takes
    the images as given."""

    def __post_init__(self):
        if self.points_per_side < 1 or self.points_per_batch < 1:
            raise ValueError("points_per_side and points_per_batch must be >= 1")
        if self.max_size < 0:
            raise ValueError("max_size must be >= 0 (0: never shrink)")


def _below(threshold: float) -> float:
    """The float32 just below `threshold`: transformers' filter_masks keeps a stability
    score > its threshold, segment-anything one >= it (the score is a float32 ratio of
    pixel counts, so 19 / 20 equals float32(0.95) exactly)."""
    return float(np.nextafter(np.float32(threshold), np.float32(-np.inf)))


def box_nms(boxes: torch.Tensor, scores: torch.Tensor, iou_threshold: float) -> List[int]:
    """Greedy NMS over xyxy boxes, as torchvision.ops.nms: visit boxes by decreasing score,
    keep one unless its IoU with an already kept box is > iou_threshold. Box areas are
    (x2 - x1) * (y2 - y1), torchvision's convention. Returns kept indices, best first."""
    if boxes.numel() == 0:
        return []
    boxes = boxes.detach().double().cpu().numpy().reshape(-1, 4)
    scores = scores.detach().double().cpu().numpy().reshape(-1)
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(boxes), bool)
    keep: List[int] = []
    for i in order:
        if suppressed[i]:
            continue
        keep.append(int(i))
        w = np.clip(np.minimum(x2[i], x2) - np.maximum(x1[i], x1), 0, None)
        h = np.clip(np.minimum(y2[i], y2) - np.maximum(y1[i], y1), 0, None)
        inter = w * h
        union = areas[i] + areas - inter
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, inter / union, 0.0)
        suppressed |= iou > iou_threshold
    return keep


def rle_to_mask(rle: dict) -> np.ndarray:
    """Uncompressed column-major RLE (transformers' _mask_to_rle format) -> bool [H, W]."""
    height, width = rle["size"]
    counts = np.asarray(rle["counts"], np.int64)
    values = np.arange(len(counts)) % 2 == 1  # runs alternate 0, 1, 0, ... from a 0-run
    flat = np.repeat(values, counts)
    return flat.reshape(width, height).T.copy()


class MaskGenerator:
    """SAM automatic mask generation: MaskGenerationPipeline's steps for one crop layer.

    For each image: embed it (batched over images), prompt the mask decoder with every grid
    point (points_per_batch at a time, 3 masks per point), upscale the mask logits to the
    image size, keep masks by predicted IoU and stability, then box NMS over all of them.
    """

    def __init__(self, model, processor, settings: MaskSettings = MaskSettings(),
                 device: torch.device | str = "cpu", batch_size: int = 8):
        self.model = model.eval()
        self.processor = processor
        self.image_processor = getattr(processor, "image_processor", processor)
        self.settings = settings
        self.device = torch.device(device)
        self.batch_size = batch_size

    @classmethod
    def load(cls, path, settings: MaskSettings = MaskSettings(), device="cpu",
             batch_size: int = 8) -> "MaskGenerator":
        from transformers import SamModel, SamProcessor

        path = _check_model_dir(path, "SAM")
        processor = _load("SAM", path, SamProcessor.from_pretrained)
        model = _load("SAM", path, SamModel.from_pretrained)
        return cls(model, processor, settings, device, batch_size)

    def to(self, device) -> "MaskGenerator":
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.inference_mode()
    def masks(self, images: Sequence) -> List[List[np.ndarray]]:
        """RGB PIL images -> per image, its masks (bool [H, W]), best-scoring first."""
        out: List[List[np.ndarray]] = []
        dtype = next(self.model.parameters()).dtype
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start:start + self.batch_size])
            inputs = self.image_processor(images=chunk, return_tensors="pt")
            # SAM pads every image to one square, so the encoder (most of SAM's cost) batches.
            embeddings = self.model.get_image_embeddings(
                inputs["pixel_values"].to(self.device, dtype))
            for i, image in enumerate(chunk):
                out.append(self._image_masks(image, embeddings[i:i + 1],
                                             inputs["original_sizes"][i].tolist(),
                                             inputs["reshaped_input_sizes"][i].tolist()))
        return out

    def _image_masks(self, image, embedding, original_size, reshaped_size) -> List[np.ndarray]:
        s, ip = self.settings, self.image_processor
        size = ip.size
        target_size = size.get("longest_edge") or size.get("height")
        crop_boxes, points, _, labels = ip.generate_crop_boxes(
            image, target_size, crop_n_layers=0, points_per_crop=s.points_per_side)
        crop_box = crop_boxes[0]
        points = points.to(self.device, torch.float32)  # [1, n_points, 1 crop, 2]
        labels = labels.to(self.device)
        rles: List[dict] = []
        scores, boxes = [], []
        for p in range(0, points.shape[1], s.points_per_batch):
            outputs = self.model(image_embeddings=embedding,
                                 input_points=points[:, p:p + s.points_per_batch],
                                 input_labels=labels[:, p:p + s.points_per_batch],
                                 multimask_output=True)
            logits = ip.post_process_masks(outputs.pred_masks, [original_size], [reshaped_size],
                                           mask_threshold=s.mask_threshold, binarize=False)
            kept, kept_scores, kept_boxes = ip.filter_masks(
                logits[0], outputs.iou_scores[0], original_size, crop_box,
                pred_iou_thresh=s.pred_iou_thresh,
                stability_score_thresh=_below(s.stability_score_thresh),
                mask_threshold=s.mask_threshold,
                stability_score_offset=s.stability_score_offset)
            rles += kept
            scores.append(kept_scores.float().cpu())
            boxes.append(kept_boxes.float().cpu().reshape(-1, 4))
        if not rles:
            return []
        # One crop layer: the pipeline's crops_nms_thresh NMS is segment-anything's box NMS.
        keep = box_nms(torch.cat(boxes), torch.cat(scores), s.box_nms_thresh)
        return [rle_to_mask(rles[k]) for k in keep]


# ------------------------------------------------------ UniMRG's size cap for SAM
def work_size(height: int, width: int, max_size: int) -> Tuple[int, int]:
    """(height, width) SAM works at: the image's own, or, past max_size, shrunk so its
    longer side is max_size, each side truncated as UniMRG's run_mask.py does."""
    if not max_size or max(height, width) <= max_size:
        return height, width
    scale = max_size / max(height, width)
    return max(1, int(height * scale)), max(1, int(width * scale))


def _area_mean(x: np.ndarray, new: int, axis: int) -> np.ndarray:
    """x averaged down to `new` along `axis`: output i is the mean of the input over its
    share [i, i + 1) x size / new of the axis, partly covered pixels weighted by how much
    of them lies there. From the running sum, exact for pixels constant over their extent."""
    x = np.moveaxis(x, axis, 0)
    size = x.shape[0]
    running = np.concatenate([np.zeros_like(x[:1]), np.cumsum(x, axis=0)])
    edges = np.arange(new + 1) * (size / new)
    whole = np.minimum(np.floor(edges).astype(np.int64), size)
    part = (edges - whole)[(slice(None),) + (None,) * (x.ndim - 1)]
    covered = running[whole] + part * x[np.minimum(whole, size - 1)]
    return np.moveaxis((covered[1:] - covered[:-1]) / (size / new), 0, axis)


def shrink(image, height: int, width: int):
    """An RGB PIL image area-averaged down to (height, width), OpenCV's INTER_AREA (each
    output pixel the mean of the input area it covers, rounded to the nearest level)."""
    from PIL import Image

    if (image.height, image.width) == (height, width):
        return image
    x = np.asarray(image.convert("RGB"), np.float64)
    if (image.height, image.width) == (2 * height, 2 * width):
        # OpenCV's exact-halving path adds in integers, rounding halves up: (sum + 2) >> 2
        blocks = x.reshape(height, 2, width, 2, 3).sum(axis=(1, 3))
        return Image.fromarray(np.floor((blocks + 2) / 4).astype(np.uint8))
    x = _area_mean(_area_mean(x, height, 0), width, 1)
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8))


def enlarge(target: np.ndarray, height: int, width: int) -> np.ndarray:
    """A rendered target [h, w, ...] scaled up to (height, width) by nearest neighbour as
    OpenCV's INTER_NEAREST picks it: source index floor(i x (1 / (height / h))), that
    double rounding included (i x h / height would pick another row now and then)."""
    h, w = target.shape[:2]
    if (h, w) == (height, width):
        return target
    rows = np.minimum(np.floor(np.arange(height) * (1.0 / (height / h))).astype(np.int64), h - 1)
    cols = np.minimum(np.floor(np.arange(width) * (1.0 / (width / w))).astype(np.int64), w - 1)
    return target[rows[:, None], cols[None, :]]


# ----------------------------------------------------------------------------- rendering
def _bbox(mask: np.ndarray, margin: int = 0):
    """Slices of the mask's bounding box grown by `margin` (clipped), or None if empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    h, w = mask.shape
    return (slice(max(rows[0] - margin, 0), min(rows[-1] + 1 + margin, h)),
            slice(max(cols[0] - margin, 0), min(cols[-1] + 1 + margin, w)))


def mask_boundary(mask: np.ndarray) -> np.ndarray:
    """bool [H, W]: the mask's Canny (100, 200) edges, as UniMRG draws each SAM mask
    (scenes.canny_edges: OpenCV's Canny in numpy; the synthetic scenes use it too)."""
    return scenes.canny_edges(mask)


def render_boundaries(masks: Sequence[np.ndarray], shape: Tuple[int, int]) -> np.ndarray:
    """UniMRG segmentation target: every mask's boundary, max-combined, white on black,
    uint8 [H, W, 3] with three equal channels."""
    edges = np.zeros(shape, bool)
    for mask in masks:
        # Canny's line may sit one pixel outside the mask; a 2-pixel margin also keeps the
        # neighbours its Sobel and suppression read there, as in the whole image
        box = _bbox(np.asarray(mask, bool), margin=2)
        if box is not None:
            edges[box] |= mask_boundary(mask[box])
    return np.repeat(np.where(edges, 255, 0).astype(np.uint8)[:, :, None], 3, axis=2)


def _voc_colour(index: int) -> Tuple[int, int, int]:
    """PASCAL VOC's colour map: distinct for every index in [0, 2**24), black only for 0."""
    r = g = b = 0
    for bit in range(8):
        r |= ((index >> 0) & 1) << (7 - bit)
        g |= ((index >> 1) & 1) << (7 - bit)
        b |= ((index >> 2) & 1) << (7 - bit)
        index >>= 3
    return r, g, b


@functools.lru_cache(maxsize=16)
def _palette(n: int) -> np.ndarray:
    colours = list(dict.fromkeys(scenes.PALETTE))[:n]
    seen, index = set(colours), 1
    while len(colours) < n:
        colour = _voc_colour(index)
        index += 1
        if colour not in seen:
            seen.add(colour)
            colours.append(colour)
    return np.array(colours, np.uint8).reshape(n, 3)


def palette(n: int) -> np.ndarray:
    """uint8 [n, 3]: n distinct colours, none black (the background). The first ones are
    the synthetic scenes' SGT colours (trainer.scenes.PALETTE), then VOC's colour map."""
    return _palette(int(n)).copy()


def render_instances(masks: Sequence[np.ndarray], shape: Tuple[int, int]) -> np.ndarray:
    """SGT segmentation target: mask k filled with palette colour k in order of decreasing
    area (ties: generator order), larger masks painted first so smaller ones stay visible,
    black background. uint8 [H, W, 3]."""
    canvas = np.zeros((*shape, 3), np.uint8)
    masks = [np.asarray(m, bool) for m in masks]
    areas = np.array([int(m.sum()) for m in masks], np.int64)
    order = np.argsort(-areas, kind="stable")
    colours = palette(len(masks))
    for rank, k in enumerate(order):
        box = _bbox(masks[k])
        if box is not None:
            canvas[box][masks[k][box]] = colours[rank]
    return canvas


SEG_RENDERERS = {"unimrg": render_boundaries, "sgt": render_instances}


__all__ = ["DepthTeacher", "MaskGenerator", "MaskSettings", "TeacherError", "box_nms",
           "depth_to_png_array", "enlarge", "mask_boundary", "normalise_depth", "palette",
           "render_boundaries", "render_instances", "rle_to_mask", "SEG_RENDERERS", "shrink",
           "work_size"]
