"""`python -m trainer.prepare`: target folders from an image folder with tiny, randomly
initialised teachers (Depth Anything on a tiny DINOv2 backbone, a tiny SAM) saved to a temp
folder, so nothing is downloaded. Random teachers rarely produce a SAM mask that passes the
UniMRG thresholds, so the rendering path is also driven by hand-made masks."""
from __future__ import annotations

import errno
import json
import os
import stat

import numpy as np
import pytest
import torch
from PIL import Image

from trainer import prepare as prep
from trainer import scenes, teachers
from trainer.datapaths import SEG_STYLE_FILE, read_seg_style
from trainer.realdata import to_rgb
from trainer.teachers import (DepthTeacher, MaskGenerator, MaskSettings, box_nms,
                              mask_boundary, palette, render_boundaries, render_instances,
                              rle_to_mask)

SIZES = {"top.png": (30, 45), "sub/deeper/b.jpg": (40, 28), "sub/c.webp": (25, 33)}
CORRUPT = ("sub/bad.jpg", "trunc.png")


# ------------------------------------------------------------------------------ fixtures
def save_tiny_depth(path):
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    # The smallest valid setup: 4 backbone layers (the neck reassembles 4 distinct feature
    # maps), hidden 16, patch 14 as in Depth Anything.
    backbone = Dinov2Config(hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
                            intermediate_size=32, image_size=28, patch_size=14,
                            out_indices=[1, 2, 3, 4], reshape_hidden_states=False)
    config = DepthAnythingConfig(backbone_config=backbone, reassemble_hidden_size=16,
                                 neck_hidden_sizes=[8, 8, 8, 8], fusion_hidden_size=8,
                                 head_hidden_size=4, patch_size=14)
    model = DepthAnythingForDepthEstimation(config)
    # transformers' init (std 0.02) leaves a tiny net's output constant to 7 digits; wider
    # weights and a positive bias before the final ReLU give a depth map that varies.
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
        model.head.conv3.bias.fill_(3.0)
    model.save_pretrained(path)
    # Depth Anything V2's processor settings at a tiny size: keep the aspect ratio, sides
    # multiples of 14, bicubic.
    DPTImageProcessorPil(size={"height": 42, "width": 42}, keep_aspect_ratio=True,
                         ensure_multiple_of=14).save_pretrained(path)


def save_tiny_sam(path):
    from transformers import (SamConfig, SamMaskDecoderConfig, SamModel, SamProcessor,
                              SamPromptEncoderConfig, SamVisionConfig)
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    vision = SamVisionConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                             mlp_dim=32, image_size=64, patch_size=8, output_channels=16,
                             window_size=4, global_attn_indexes=[1], num_pos_feats=8)
    prompt = SamPromptEncoderConfig(hidden_size=16, image_size=64, patch_size=8,
                                    mask_input_channels=4)
    decoder = SamMaskDecoderConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   mlp_dim=32, iou_head_hidden_dim=16)
    SamModel(SamConfig(vision_config=vision, prompt_encoder_config=prompt,
                       mask_decoder_config=decoder)).save_pretrained(path)
    image_processor = SamImageProcessorPil(size={"longest_edge": 64},
                                           pad_size={"height": 64, "width": 64},
                                           mask_size={"longest_edge": 16},
                                           mask_pad_size={"height": 16, "width": 16})
    SamProcessor(image_processor=image_processor).save_pretrained(path)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("teachers")
    save_tiny_depth(root / "depth")
    save_tiny_sam(root / "sam")
    return {"depth": root / "depth", "sam": root / "sam"}


def write_images(root, seed):
    """A nested folder: 3 images of different sizes, 2 corrupt files, and files that are
    not inputs (a text file, a hidden file)."""
    rng = np.random.default_rng(seed)
    for rel, (h, w) in SIZES.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        # a smooth image with an edge, so a depth net sees structure; plus noise
        image = np.zeros((h, w, 3), np.float64)
        image[:, : w // 2] = rng.uniform(0, 255, 3)
        image[:, w // 2:] = rng.uniform(0, 255, 3)
        image += rng.normal(0, 20, image.shape)
        Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(root / rel)
    (root / "sub" / "bad.jpg").write_bytes(b"this is not a jpeg")
    good = root / "top.png"
    (root / "trunc.png").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden.jpg").write_bytes(b"macOS resource fork")


@pytest.fixture
def images(tmp_path, seed):
    root = tmp_path / "tuning_data"
    write_images(root, seed)
    return root


def run(images, models, **kwargs):
    kwargs.setdefault("depth_model", models["depth"])
    kwargs.setdefault("sam_model", models["sam"])
    kwargs.setdefault("device", "cpu")
    kwargs.setdefault("progress", False)
    return prep.prepare(images, **kwargs)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def expected_png(rel):
    return os.path.splitext(rel)[0] + ".png"


# ------------------------------------------------------------------------ end to end
def test_outputs_mirror_inputs_and_resume_does_nothing(images, models, monkeypatch):
    summary = run(images, models)
    depth_dir, seg_dir = images.parent / "tuning_data_depth", images.parent / "tuning_data_mask"
    assert summary.out_dirs == {"depth": depth_dir, "seg": seg_dir}
    assert summary.images == len(SIZES) + len(CORRUPT)
    assert summary.written == {"depth": len(SIZES), "seg": len(SIZES)}
    assert summary.existing == {"depth": 0, "seg": 0}
    assert sorted(summary.skipped) == sorted(CORRUPT), summary.skipped

    for folder, extra in ((depth_dir, []), (seg_dir, [SEG_STYLE_FILE])):  # + the style record
        produced = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                          if p.is_file())
        assert produced == sorted([expected_png(rel) for rel in SIZES] + extra), produced
    for rel, (h, w) in SIZES.items():
        with Image.open(depth_dir / expected_png(rel)) as depth:
            assert depth.mode == "L" and depth.size == (w, h), (rel, depth.mode, depth.size)
            d = np.asarray(depth)
        assert (d.min(), d.max()) == (0, 255), (rel, d.min(), d.max())
        with Image.open(seg_dir / expected_png(rel)) as seg:
            assert seg.mode == "RGB" and seg.size == (w, h), (rel, seg.mode, seg.size)
            s = np.asarray(seg)
        assert (s[..., 0] == s[..., 1]).all() and (s[..., 1] == s[..., 2]).all(), rel
        assert set(np.unique(s)) <= {0, 255}, (rel, np.unique(s))

    before = {"depth": snapshot(depth_dir), "seg": snapshot(seg_dir)}

    def no_call(*args, **kwargs):
        raise AssertionError("a resumed run with every output present must not run a model")

    monkeypatch.setattr(DepthTeacher, "predict", no_call)
    monkeypatch.setattr(MaskGenerator, "masks", no_call)
    again = run(images, models)
    assert again.written == {"depth": 0, "seg": 0}
    assert again.existing == {"depth": len(SIZES), "seg": len(SIZES)}
    # corrupt images are never done: each run tries and reports them again
    assert sorted(again.skipped) == sorted(CORRUPT), again.skipped
    assert {"depth": snapshot(depth_dir), "seg": snapshot(seg_dir)} == before

    # with only header-less files pending, the teachers are not even loaded
    (images / "trunc.png").unlink()
    for cls in (DepthTeacher, MaskGenerator):
        monkeypatch.setattr(cls, "load", no_call)
    third = run(images, models)
    assert third.written == {"depth": 0, "seg": 0} and list(third.skipped) == ["sub/bad.jpg"]
    assert {"depth": snapshot(depth_dir), "seg": snapshot(seg_dir)} == before


def test_leftover_temporary_or_empty_file_is_not_done(images, models):
    out = images.parent / "tuning_data_depth"
    (out / "sub").mkdir(parents=True)
    # an interrupted write leaves only the temporary file; a power cut may leave 0 bytes,
    # a partial copy of the folder a cut-off PNG (signature but no IEND chunk)
    (out / ".top.png.x1y2z3.tmp").write_bytes(b"\x89PNG half")
    (out / "sub" / "c.png").write_bytes(b"")
    prep.write_png(out / "top.png", np.zeros((4, 4), np.uint8))
    whole = (out / "top.png").read_bytes()
    assert prep.is_done(out / "top.png")
    (out / "top.png").write_bytes(whole[: len(whole) // 2])
    summary = run(images, models, tasks="depth")
    assert summary.written == {"depth": len(SIZES)} and summary.existing == {"depth": 0}
    for rel, (h, w) in SIZES.items():
        with Image.open(out / expected_png(rel)) as depth:
            assert depth.size == (w, h)
    # the tmp file is not an output nor an input; no temporary file of ours is left over
    leftovers = sorted(p.name for p in out.rglob("*.tmp"))
    assert leftovers == [".top.png.x1y2z3.tmp"], leftovers


def test_partial_previous_run_only_fills_the_gaps(images, models, monkeypatch):
    # sorted: sub/bad.jpg (corrupt), sub/c.webp, sub/deeper/b.jpg, top.png, trunc.png
    first = run(images, models, tasks="depth", limit=2)
    assert first.images == 2 and list(first.skipped) == ["sub/bad.jpg"]
    out = images.parent / "tuning_data_depth"
    first = "sub/c.webp"
    assert [p.relative_to(out).as_posix() for p in out.rglob("*.png")] == [expected_png(first)]
    seen = []
    original = DepthTeacher.predict
    monkeypatch.setattr(DepthTeacher, "predict",
                        lambda self, ims: seen.extend(im.size for im in ims) or original(self, ims))
    summary = run(images, models, tasks="depth")
    assert summary.existing == {"depth": 1} and summary.written == {"depth": len(SIZES) - 1}
    h, w = SIZES[first]
    assert (w, h) not in seen and len(seen) == len(SIZES) - 1, seen


@pytest.mark.parametrize("style", ["unimrg", "sgt"])
def test_segmentation_rendering_through_the_cli(images, models, monkeypatch, style):
    made = {}

    def fake_masks(self, ims):  # two overlapping rectangles per image, sizes from the image
        out = []
        for im in ims:
            h, w = im.height, im.width
            big = np.zeros((h, w), bool)
            big[2:h - 3, 1:w - 2] = True
            small = np.zeros((h, w), bool)
            small[5:12, 4:10] = True
            made[(h, w)] = [small, big]  # small first: the painter must sort by area
            out.append([small, big])
        return out

    monkeypatch.setattr(MaskGenerator, "masks", fake_masks)
    assert prep.main(["--images", str(images), "--tasks", "seg", "--sam-model",
                      str(models["sam"]), "--seg-style", style, "--device", "cpu",
                      "--no-progress"]) == 0
    out = images.parent / "tuning_data_mask"
    for rel, (h, w) in SIZES.items():
        got = np.asarray(Image.open(out / expected_png(rel)))
        small, big = made[(h, w)]
        if style == "unimrg":
            edges = np.zeros((h, w), bool)
            for m in (small, big):   # each mask's Canny edges (checked against OpenCV below)
                edges |= mask_boundary(m)
            want = np.repeat(np.where(edges, 255, 0).astype(np.uint8)[..., None], 3, axis=2)
        else:
            want = np.zeros((h, w, 3), np.uint8)
            want[big] = palette(2)[0]
            want[small] = palette(2)[1]
            assert len({tuple(c) for c in got.reshape(-1, 3)}) == 3  # black + two colours
        np.testing.assert_array_equal(got, want, err_msg=f"{style} {rel}")


def test_sam_settings_reach_transformers(models, monkeypatch):
    """The UniMRG settings (32 x 32 points, IoU 0.88, stability 0.95, NMS 0.7) arrive at the
    transformers calls that apply them, and points_per_batch splits the decoder calls."""
    calls = {"filter": [], "nms": [], "grid": [], "points": []}
    monkeypatch.setattr(prep, "IO_THREADS", 1)
    original_load = MaskGenerator.load

    def load(*args, **kwargs):
        generator = original_load(*args, **kwargs)
        ip = generator.image_processor
        filter_masks, crop_boxes = ip.filter_masks, ip.generate_crop_boxes

        def recording_filter(*a, **kw):
            calls["filter"].append(dict(kw))
            # let every mask through so NMS and rendering run on real SAM output
            kw.update(pred_iou_thresh=0.0, stability_score_thresh=0.0)
            return filter_masks(*a, **kw)

        def recording_grid(*a, **kw):
            calls["grid"].append(dict(kw))
            return crop_boxes(*a, **kw)

        monkeypatch.setattr(ip, "filter_masks", recording_filter)
        monkeypatch.setattr(ip, "generate_crop_boxes", recording_grid)
        generator.model.register_forward_pre_hook(
            lambda module, args, kwargs: calls["points"].append(kwargs["input_points"].shape[1]),
            with_kwargs=True)
        return generator

    def recording_nms(boxes, scores, iou_threshold):
        calls["nms"].append(iou_threshold)
        return original_nms(boxes, scores, iou_threshold)

    original_nms = teachers.box_nms
    monkeypatch.setattr(MaskGenerator, "load", staticmethod(load))
    monkeypatch.setattr(teachers, "box_nms", recording_nms)
    generator = MaskGenerator.load(models["sam"], MaskSettings(points_per_batch=100))
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (23, 31, 3), np.uint8))
    (masks,) = generator.masks([image])

    assert calls["grid"] == [{"crop_n_layers": 0, "points_per_crop": 32}]
    assert calls["points"] == [100] * 10 + [24]  # 1,024 points, 100 per decoder call
    assert len(calls["filter"]) == 11
    for kw in calls["filter"]:
        # the float32 below 0.95: transformers keeps scores > it, segment-anything >= 0.95
        assert kw == {"pred_iou_thresh": 0.88,
                      "stability_score_thresh": float(np.nextafter(np.float32(0.95), 0)),
                      "mask_threshold": 0.0, "stability_score_offset": 1.0}, kw
    assert calls["nms"] == [0.7]
    assert masks and all(m.shape == (23, 31) and m.dtype == bool for m in masks)


def test_cli_defaults_are_the_unimrg_settings():
    assert MaskSettings() == MaskSettings(points_per_side=32, pred_iou_thresh=0.88,
                                          stability_score_thresh=0.95, box_nms_thresh=0.7,
                                          points_per_batch=64)
    args = prep.build_parser().parse_args(["--images", "x"])
    assert (args.tasks, args.seg_style, args.points_per_batch) == ("depth,seg", "unimrg", 64)


def test_depth_batches_by_shape_and_keeps_order(models, seed):
    rng = np.random.default_rng(seed)
    shapes = [(20, 30), (31, 17), (20, 30), (20, 30), (31, 17)]
    ims = [Image.fromarray(rng.integers(0, 255, (*s, 3), np.uint8)) for s in shapes]
    teacher = DepthTeacher.load(models["depth"], batch_size=2)
    forwards = []
    teacher.model.register_forward_pre_hook(
        lambda module, args, kwargs: forwards.append(kwargs["pixel_values"].shape[0]),
        with_kwargs=True)
    together = teacher.predict(ims)
    assert sorted(forwards) == [1, 2, 2], forwards  # 3 of one shape in 2 + 1, 2 of the other
    for image, depth in zip(ims, together):
        assert depth.shape == (image.height, image.width) and depth.dtype == np.float32
        alone = teacher.predict([image])[0]
        np.testing.assert_allclose(depth, alone, atol=1e-4)
        assert depth.min() == 0.0 and depth.max() == 1.0


class _NeedsTorchvision:
    """transformers 5.17's AutoImageProcessor without torchvision: a dummy whose every
    attribute raises ImportError (torchvision has no CPU build on PyPI)."""

    def __getattr__(self, name):
        raise ImportError("AutoImageProcessor requires the Torchvision library")


def test_depth_loads_without_auto_image_processor(models, monkeypatch, seed):
    import transformers

    image = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (20, 30, 3), np.uint8))
    want = DepthTeacher.load(models["depth"]).predict([image])[0]
    monkeypatch.setattr(transformers, "AutoImageProcessor", _NeedsTorchvision())
    teacher = DepthTeacher.load(models["depth"])
    assert "DPTImageProcessor" in type(teacher.processor).__name__
    np.testing.assert_array_equal(teacher.predict([image])[0], want)
    # a checkpoint that names no processor class: the loader's own error, as a TeacherError
    config = models["depth"] / "preprocessor_config.json"
    named = json.loads(config.read_text())
    try:
        config.write_text(json.dumps({k: v for k, v in named.items()
                                      if k != "image_processor_type"}))
        with pytest.raises(teachers.TeacherError, match="cannot load the depth model.*Torchvision"):
            DepthTeacher.load(models["depth"])
    finally:
        config.write_text(json.dumps(named))


# ------------------------------------------------------------------------- rendering
# cv2.Canny(mask * 255, 100, 200) of the two hand-made masks below (opencv-python-headless
# 5.0): the line sits just outside a mask's left / top sides, on its right / bottom ones,
# corners cut; the image border is no edge
CANNY_SQUARE = """
00000000000000000
00001111000000000
00010000100000000
00100000100000000
00100000100000000
00100000100000000
00011111100000000
"""
CANNY_CORNER = """
00000000000100000
00000000000100000
00000000000100000
00000000000100000
00000000000011000
00000000000000100
00000000000000100
00000000000000100
00000000000000011
"""


def _grid(text, h, w):
    rows = [[int(ch) for ch in line] for line in text.split()]
    out = np.zeros((h, w), bool)
    out[:len(rows)] = np.array(rows, bool)
    return out


def test_mask_boundary_is_opencvs_canny(seed):
    h, w = 13, 17
    square = np.zeros((h, w), bool)
    square[2:7, 3:9] = True
    corner = np.zeros((h, w), bool)  # touches the image border: the border is no edge
    corner[:5, 12:] = True
    corner[4:9, 15:] = True  # an L
    np.testing.assert_array_equal(mask_boundary(square), _grid(CANNY_SQUARE, h, w))
    np.testing.assert_array_equal(mask_boundary(corner), _grid(CANNY_CORNER, h, w))
    for mask in (np.zeros((h, w), bool), np.ones((h, w), bool)):
        assert not mask_boundary(mask).any()
    # the synthetic scenes draw their UniMRG targets by the same rule, mask by mask
    labels = square.astype(np.int64) + 2 * corner
    np.testing.assert_array_equal(scenes.instance_boundaries(labels),
                                  mask_boundary(square) | mask_boundary(corner))
    rng = np.random.default_rng(seed)
    blob = rng.random((h, w)) < 0.5  # ragged, with holes and single pixels
    rendered = render_boundaries([square, corner, blob], (h, w))   # bounding-box crops
    union = mask_boundary(square) | mask_boundary(corner) | mask_boundary(blob)
    assert rendered.shape == (h, w, 3) and rendered.dtype == np.uint8
    for c in range(3):
        np.testing.assert_array_equal(rendered[..., c], np.where(union, 255, 0))
    assert not render_boundaries([], (h, w)).any()


def test_mask_boundary_matches_cv2_when_installed(seed):
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(seed)
    for _ in range(200):
        h, w = rng.integers(1, 24, 2)
        mask = rng.random((h, w)) < rng.random()
        want = cv2.Canny(mask.astype(np.uint8) * 255, 100, 200) > 0
        np.testing.assert_array_equal(mask_boundary(mask), want)


def test_render_instances_paints_large_masks_first(seed):
    rng = np.random.default_rng(seed)
    h, w = 12, 14
    big = np.zeros((h, w), bool)
    big[1:11, 1:13] = True
    medium = np.zeros((h, w), bool)
    medium[2:8, 2:9] = True
    small = np.zeros((h, w), bool)
    small[4:6, 5:7] = True
    scattered = rng.random((h, w)) < 0.05
    scattered[0, 0] = True  # at least one pixel, outside every other mask
    masks = [small, scattered, big, medium]  # not in area order
    got = render_instances(masks, (h, w))

    colours = palette(4)
    by_area = sorted(range(4), key=lambda k: -int(masks[k].sum()))
    want = np.zeros((h, w, 3), np.uint8)
    for rank, k in enumerate(by_area):
        for y in range(h):
            for x in range(w):
                if masks[k][y, x]:
                    want[y, x] = colours[rank]
    np.testing.assert_array_equal(got, want)
    # the smallest mask is visible whole, in its own colour; the background stays black
    assert (got[small] == colours[by_area.index(0)]).all()
    assert (got[~(big | medium | small | scattered)] == 0).all()
    assert not render_instances([], (h, w)).any()


def test_palette_is_distinct_and_never_black():
    colours = palette(700)
    assert colours.shape == (700, 3) and colours.dtype == np.uint8
    assert len({tuple(c) for c in colours}) == 700
    assert not (colours == 0).all(axis=1).any()
    # the synthetic scenes' SGT colours come first, so both data sources agree
    np.testing.assert_array_equal(colours[: len(scenes.PALETTE)], np.array(scenes.PALETTE))


def test_box_nms_hand_computed():
    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [0, 0, 10, 9], [20, 20, 25, 25]],
                         dtype=torch.float32)
    scores = torch.tensor([0.9, 0.8, 0.95, 0.1])
    # IoU(2, 0) = 90 / 100 = 0.9 -> box 0 goes; IoU(2, 1) = 72 / 118 = 0.61 -> box 1 stays
    assert box_nms(boxes, scores, 0.7) == [2, 1, 3]
    assert box_nms(boxes, scores, 0.95) == [2, 0, 1, 3]
    assert box_nms(boxes, scores, 0.6) == [2, 3]
    assert box_nms(torch.zeros(0, 4), torch.zeros(0), 0.7) == []


def test_rle_decoding_matches_transformers_encoding(seed):
    from transformers.models.sam.image_processing_pil_sam import _mask_to_rle

    rng = np.random.default_rng(seed)
    masks = torch.from_numpy(rng.random((4, 7, 9)) < 0.4)
    masks[1] = True
    masks[2] = False
    masks[3, 0, 0] = True
    for mask, rle in zip(masks, _mask_to_rle(masks)):
        np.testing.assert_array_equal(rle_to_mask(rle), mask.numpy())


def test_depth_normalisation():
    depth = torch.tensor([[2.0, 4.0], [3.0, 6.0]])
    np.testing.assert_allclose(teachers.normalise_depth(depth), [[0.0, 0.5], [0.25, 1.0]])
    assert (teachers.normalise_depth(torch.full((3, 3), 7.0)) == 0).all()
    png = teachers.depth_to_png_array(np.array([[0.0, 0.5], [0.25, 1.0]], np.float32))
    # x 255 truncated, as Depth-Anything-V2's run.py writes the maps (0.5 -> 127.5 -> 127)
    np.testing.assert_array_equal(png, [[0, 127], [63, 255]])


# ---------------------------------------------------------------------------- errors
def error_of(argv, capsys):
    code = prep.main(argv + ["--no-progress"])
    return code, capsys.readouterr().err


def test_clear_errors_before_any_work(images, models, tmp_path, capsys):
    base = ["--images", str(images), "--depth-model", str(models["depth"]),
            "--sam-model", str(models["sam"]), "--device", "cpu"]

    def check(argv, *phrases):
        code, err = error_of(argv, capsys)
        assert code == 2, (argv, err)
        for phrase in phrases:
            assert phrase in err, (phrase, err)
        assert not (images.parent / "tuning_data_depth").exists()
        assert not (images.parent / "tuning_data_mask").exists()

    missing = tmp_path / "nowhere"
    check(["--images", str(missing), "--depth-model", str(models["depth"]), "--sam-model",
           str(models["sam"])], "image folder", "does not exist")
    check(base[:2] + ["--sam-model", str(models["sam"])], "--depth-model is required")
    check(base[:4] + ["--sam-model", str(missing)], "SAM model folder", "does not exist")
    check(base[:2] + ["--depth-model", str(tmp_path), "--tasks", "depth"], "no config.json")
    check(base + ["--tasks", "depth,normals"], "--tasks")
    check(base + ["--batch-size", "0"], "--batch-size")
    check(base + ["--depth-out", str(images)], "must not be the image folder")

    # a folder that looks like a checkpoint but does not load: caught before writing
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((models["depth"] / "config.json").read_text())
    check(base[:2] + ["--depth-model", str(broken), "--tasks", "depth"],
          "cannot load the depth model")

    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = error_of(["--images", str(empty), "--depth-model", str(models["depth"]),
                          "--tasks", "depth"], capsys)
    assert code == 2 and "no images" in err, err

    (images / "top.jpg").write_bytes((images / "top.png").read_bytes())
    check(base, "top.jpg and top.png")
    (images / "top.jpg").unlink()

    if not torch.cuda.is_available():
        check(base[:-2] + ["--device", "cuda"], "no CUDA device")


def test_cli_reports_skipped_images(images, models, capsys):
    code = prep.main(["--images", str(images), "--depth-model", str(models["depth"]),
                      "--tasks", "depth", "--device", "cpu", "--batch-size", "2",
                      "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert f"depth: {len(SIZES)} written, 0 already present" in out, out
    assert f"skipped {len(CORRUPT)} image(s) (unreadable" in out, out
    for rel in CORRUPT:
        assert rel in out


def test_interrupted_write_leaves_no_file(tmp_path, monkeypatch):
    target = tmp_path / "out" / "a.png"
    original = Image.Image.save

    def dies_halfway(self, fp, *args, **kwargs):
        fp.write(b"\x89PNG\r\n\x1a\n half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        prep.write_png(target, np.zeros((4, 5), np.uint8))
    assert list(target.parent.iterdir()) == []
    monkeypatch.setattr(Image.Image, "save", original)
    prep.write_png(target, np.full((4, 5), 7, np.uint8))
    assert np.asarray(Image.open(target)).tolist() == [[7] * 5] * 4
    assert [p.name for p in target.parent.iterdir()] == ["a.png"]


def test_module_entry_point_exits_2_on_a_missing_folder(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "trainer.prepare", "--images",
                           str(tmp_path / "missing"), "--depth-model", str(tmp_path)],
                          capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 2, proc.stderr
    assert "does not exist" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.gpu
def test_cuda_matches_cpu(images, models, tmp_path):
    """fp16 autocast depth on the GPU agrees with fp32 on the CPU; SAM (fp32) the same."""
    cpu = run(images, models, depth_out=tmp_path / "d_cpu", seg_out=tmp_path / "s_cpu")
    gpu = run(images, models, depth_out=tmp_path / "d_gpu", seg_out=tmp_path / "s_gpu",
              device="cuda")
    assert cpu.written == gpu.written == {"depth": len(SIZES), "seg": len(SIZES)}
    for rel in SIZES:
        a = np.asarray(Image.open(tmp_path / "d_cpu" / expected_png(rel)), np.float64)
        b = np.asarray(Image.open(tmp_path / "d_gpu" / expected_png(rel)), np.float64)
        assert a.shape == b.shape and np.abs(a - b).mean() < 3.0, (rel, np.abs(a - b).mean())
        seg = [np.asarray(Image.open(tmp_path / f"s_{d}" / expected_png(rel)))
               for d in ("cpu", "gpu")]
        np.testing.assert_array_equal(*seg)


# ------------------------------------------------------ odd images, links, modes, style
def save_noise(path, h, w, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), np.uint8)).save(path)


def test_thin_and_extreme_images_never_stop_the_run(tmp_path, models, capsys):
    """1-pixel strips used to lose a side in the depth post-processing's squeeze(); past an
    aspect ratio the model's input (the tiny one: shorter side 42 px) would be more than
    16 times its area, which raises. Sorted by aspect, such an image shares the first
    batch: the batch is retried image by image and only the one that fails alone is left
    out, run after run."""
    root = tmp_path / "tuning_data"
    sizes = {"a.png": (20, 30), "dot.png": (1, 1), "tall.png": (5, 1), "wide.png": (1, 5),
             "strip.png": (1, 200)}                       # (h, w); strip: a 42 x 8,400 input
    for i, (name, (h, w)) in enumerate(sizes.items()):
        save_noise(root / name, h, w, seed=i)
    summary = run(root, models, tasks="depth", batch_size=8)
    out = tmp_path / "tuning_data_depth"
    assert summary.written == {"depth": 4} and summary.skipped == {}
    assert list(summary.failed["depth"]) == ["strip.png"], summary.failed
    assert "ValueError" in summary.failed["depth"]["strip.png"]
    for name, (h, w) in sizes.items():
        if name != "strip.png":
            with Image.open(out / name) as depth:
                assert depth.size == (w, h), (name, depth.size)
    assert not (out / "strip.png").exists()
    # a rerun does not die on it either: it tries it again, alone, and says so
    assert prep.main(["--images", str(root), "--depth-model", str(models["depth"]), "--tasks",
                      "depth", "--device", "cpu", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "depth: 0 written, 4 already present, 1 failed" in printed, printed
    assert "strip.png (depth): ValueError" in printed, printed


def test_long_names_odd_bytes_and_failed_writes_never_stop_the_run(tmp_path, models, capsys,
                                                                   monkeypatch):
    """A 249-character output name is legal, but the temporary file next to it used to be
    named after it and overran the 255-byte limit: the run died, and every rerun again. A
    write that fails for one image is that image's failure; a full disk stops the run. A
    name that is not UTF-8 is printed escaped, not as an UnicodeEncodeError."""
    root = tmp_path / "tuning_data"
    long_name = "a" * 245 + ".jpg"
    for i, name in enumerate([long_name, "b.png", "c.png"]):
        save_noise(root / name, 20, 30, seed=i)
    (root / os.fsdecode(b"caf\xe9.jpg")).write_bytes(b"not a jpeg")
    real_write = prep.write_png

    def refuses_c(path, array):
        if path.name == "c.png":
            raise OSError(errno.EACCES, "Permission denied", str(path))
        return real_write(path, array)

    monkeypatch.setattr(prep, "write_png", refuses_c)
    assert prep.main(["--images", str(root), "--depth-model", str(models["depth"]), "--tasks",
                      "depth", "--device", "cpu", "--batch-size", "1", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    out = tmp_path / "tuning_data_depth"
    assert sorted(p.name for p in out.iterdir()) == sorted([long_name[:-4] + ".png", "b.png"])
    assert "depth: 2 written, 0 already present, 1 failed" in printed, printed
    assert "c.png (depth): PermissionError" in printed, printed
    assert "caf\\xe9.jpg" in printed, printed

    def disk_full(path, array):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(prep, "write_png", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(root, models, tasks="depth", batch_size=1)


def test_sam_leaves_out_only_the_image_it_cannot_take(tmp_path, models):
    root = tmp_path / "tuning_data"
    save_noise(root / "a.png", 20, 30)
    save_noise(root / "strip.png", 200, 1)        # the tiny SAM's 64-px side: width 0.3 -> 0
    summary = run(root, models, tasks="seg", batch_size=2)
    assert summary.written == {"seg": 1} and list(summary.failed["seg"]) == ["strip.png"]
    assert (tmp_path / "tuning_data_mask" / "a.png").is_file()


def test_symlinked_folders_are_followed_and_loops_are_not(tmp_path):
    real = tmp_path / "datasets" / "coco" / "train2017"
    save_noise(real / "0001.jpg", 8, 8)
    linked = tmp_path / "all_linked"                                   # nothing but a link
    linked.mkdir()
    (linked / "coco").symlink_to(tmp_path / "datasets" / "coco")
    assert [p.as_posix() for p in prep.list_images(linked)] == ["coco/train2017/0001.jpg"]
    root = tmp_path / "tuning_data"
    save_noise(root / "local.jpg", 8, 8)
    (root / "coco").symlink_to(tmp_path / "datasets" / "coco")
    (root / "coco2017").symlink_to(tmp_path / "datasets" / "coco")   # the same folder again
    (real / "up").symlink_to(root)                                     # a loop
    (root / "self").symlink_to(root)                                   # and a shorter one
    found = [p.as_posix() for p in prep.list_images(root)]
    assert found == ["coco/train2017/0001.jpg", "coco2017/train2017/0001.jpg", "local.jpg"]


def test_fifos_are_not_listed_and_every_pil_format_is(tmp_path):
    # os.walk lists a FIFO as a file, and Image.open on one blocks forever
    root = tmp_path / "tuning_data"
    save_noise(root / "a.png", 8, 8)
    for name in ("b.gif", "c.bmp", "d.tif", "e.TIFF"):
        Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / name)
    os.mkfifo(root / "pipe.png")
    found = [p.as_posix() for p in prep.list_images(root)]
    assert found == ["a.png", "b.gif", "c.bmp", "d.tif", "e.TIFF"], found


def test_an_image_beside_another_of_the_same_stem(tmp_path, models):
    # The output is x.png for both: a .jpg / .jpeg / .png / .webp takes it beside a .gif /
    # .bmp / .tif master (which is passed over, and named); two of one kind are refused
    root = tmp_path / "tuning_data"
    save_noise(root / "x.jpg", 8, 8)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "x.tif")
    # a limit counts the kept images: the .tif is passed over, never prepared in the .jpg's name
    assert [p.as_posix() for p in prep.plan(root, depth_model=models["depth"], tasks="depth",
                                             limit=1).images] == ["x.jpg"]
    summary = run(root, models, tasks="depth")
    assert summary.written == {"depth": 1} and list(summary.skipped) == ["x.tif"]
    assert "x.jpg, which takes it" in summary.skipped["x.tif"]
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "x.gif")   # two masters
    save_noise(root / "y.png", 8, 8)
    save_noise(root / "y.webp", 8, 8)
    with pytest.raises(prep.PrepareError, match="y.png and y.webp"):
        run(root, models, tasks="depth")


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_mode_of_a_plain_save(tmp_path, umask):
    old = os.umask(umask)
    try:
        prep.write_png(tmp_path / "a.png", np.zeros((4, 5), np.uint8))
        prep.write_seg_style(tmp_path, "unimrg")
    finally:
        os.umask(old)
    for name in ("a.png", SEG_STYLE_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_sixteen_bit_images_are_read_as_the_trainer_reads_them(tmp_path):
    ramp16 = np.tile(np.linspace(0, 65535, 64).astype(np.uint16), (4, 1))
    Image.fromarray(ramp16).save(tmp_path / "grey16.png")
    got = np.asarray(prep.load_image(tmp_path / "grey16.png"))
    assert got.shape == (4, 64, 3) and (got[0, 0, 0], got[0, -1, 0]) == (0, 255)
    assert len(np.unique(got)) == 64                                  # not saturated
    with Image.open(tmp_path / "grey16.png") as image:
        np.testing.assert_array_equal(got, np.asarray(to_rgb(image)))


def test_mask_folder_records_its_style_and_refuses_the_other(images, models, monkeypatch):
    monkeypatch.setattr(MaskGenerator, "masks", lambda self, ims: [[] for _ in ims])
    run(images, models, tasks="seg", seg_style="sgt", limit=2)
    out = images.parent / "tuning_data_mask"
    assert json.loads((out / SEG_STYLE_FILE).read_text()) == {"seg_style": "sgt"}
    assert read_seg_style(str(out)) == "sgt"                       # what the trainer checks
    with pytest.raises(prep.PrepareError, match="--seg-style sgt"):
        run(images, models, tasks="seg")                           # unimrg into sgt: refused
    assert run(images, models, tasks="seg", seg_style="sgt").written == {"seg": len(SIZES) - 1}


def test_stability_score_at_the_threshold_is_kept_as_segment_anything_keeps_it():
    """segment-anything keeps stability >= 0.95; a mask whose eroded / dilated pixel
    counts are 19 : 20 scores exactly float32(0.95), which transformers' '>' dropped."""
    from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

    # logits of 3 masks over 20 pixels: 19 above +1 and 20 above -1 (0.95 exactly); 18 of
    # 20 (0.9); 20 of 20 (1.0)
    logits = torch.full((3, 4, 5), -5.0)
    logits[0].view(-1)[:19], logits[0].view(-1)[19] = 5.0, 0.5
    logits[1].view(-1)[:18], logits[1].view(-1)[18:] = 5.0, 0.5
    logits[2].fill_(5.0)
    kept, _, _ = SamImageProcessorPil().filter_masks(
        logits[None], torch.ones(1, 3), [4, 5], [0, 0, 5, 4], pred_iou_thresh=0.5,
        stability_score_thresh=teachers._below(0.95), mask_threshold=0.0,
        stability_score_offset=1.0)
    assert len(kept) == 2   # the 0.95 and the 1.0 mask, as segment-anything keeps them
    kept, _, _ = SamImageProcessorPil().filter_masks(
        logits[None], torch.ones(1, 3), [4, 5], [0, 0, 5, 4], pred_iou_thresh=0.5,
        stability_score_thresh=0.95, mask_threshold=0.0, stability_score_offset=1.0)
    assert len(kept) == 1   # transformers' own rule at 0.95 drops the first


# ------------------------------------- the teachers run as the released inference runs
def _v2_depth_teacher(model=None):
    """A DepthTeacher with Depth Anything V2's processor settings (518, multiples of 14)."""
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    processor = DPTImageProcessorPil(size={"height": 518, "width": 518}, keep_aspect_ratio=True,
                                     ensure_multiple_of=14, do_pad=False)
    return DepthTeacher(model or torch.nn.Identity(), processor)


@pytest.mark.parametrize("height, width, want", [
    (427, 640, (518, 770)),     # COCO's common size: transformers' processor gave 350 x 518
    (500, 333, (784, 518)),       # Visual Genome's: 518 x 350
    (300, 800, (518, 1386)), (518, 518, (518, 518)), (1000, 1000, (518, 518))])
def test_depth_input_is_sized_as_depth_anythings_own_inference(height, width, want):
    """Depth-Anything-V2's infer_image scales the SHORTER side to 518 ("lower_bound"),
    sides rounded to multiples of 14; transformers' processor scales as little as possible."""
    assert _v2_depth_teacher().input_size(height, width) == want
    with pytest.raises(ValueError, match="aspect ratio too extreme"):
        _v2_depth_teacher().input_size(1, 1000)


def test_depth_pixels_are_bicubic_without_antialiasing_then_normalised(seed):
    """The [0, 1] image resized with Keys' cubic (a = -0.75, OpenCV's INTER_CUBIC), no
    antialiasing on the way down and no clipping, then normalised with the processor's
    mean / std; compared with OpenCV where it is installed."""
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    # halving 8 columns [0 0 1 0 0 0 0 0]: output j samples x = 2j + 0.5, taps 2j - 1 ..
    # 2j + 2 (clamped) weighted -0.09375, 0.59375, 0.59375, -0.09375
    row = np.array([0, 0, 255, 0, 0, 0, 0, 0], np.uint8)
    image = Image.fromarray(np.repeat(np.repeat(row[None, :, None], 2, 0), 3, 2))
    teacher = DepthTeacher(torch.nn.Identity(), DPTImageProcessorPil(
        size={"height": 1, "width": 4}, ensure_multiple_of=1, image_mean=[0.5] * 3,
        image_std=[2.0] * 3))
    pixels = teacher.pixels(image)
    assert pixels.shape == (1, 3, 1, 4) and pixels.dtype == torch.float32
    want = (np.array([-0.09375, 0.59375, 0.0, 0.0]) - 0.5) / 2.0
    np.testing.assert_allclose(pixels[0, :, 0].numpy(), np.broadcast_to(want, (3, 4)), atol=1e-7)
    try:
        import cv2
    except ImportError:
        return
    teacher = _v2_depth_teacher()
    image = np.random.default_rng(seed).integers(0, 256, (600, 700, 3), np.uint8)
    pixels = teacher.pixels(Image.fromarray(image))
    mean = np.array(teacher.processor.image_mean).reshape(3, 1, 1)
    std = np.array(teacher.processor.image_std).reshape(3, 1, 1)
    want = cv2.resize(image / 255.0, (602, 518), interpolation=cv2.INTER_CUBIC)
    np.testing.assert_allclose((pixels[0].double().numpy() * std + mean).transpose(1, 2, 0),
                               want, atol=1e-4)


def test_depth_prediction_is_resized_back_bilinearly_with_aligned_corners():
    """infer_image: F.interpolate(bilinear, align_corners=True) to the image size, then
    min-max: a prediction that is a linear ramp stays exactly linear, ends included."""
    class Ramp(torch.nn.Module):
        def forward(self, pixel_values):
            from types import SimpleNamespace

            b, _, h, w = pixel_values.shape
            ramp = torch.linspace(0.0, 5.0, w).expand(b, h, w).clone()
            return SimpleNamespace(predicted_depth=ramp)

    teacher = _v2_depth_teacher(Ramp())
    teacher.model.register_parameter("p", torch.nn.Parameter(torch.zeros(1)))  # a dtype
    (depth,) = teacher.predict([Image.new("RGB", (50, 40))])
    assert depth.shape == (40, 50)
    np.testing.assert_allclose(depth, np.broadcast_to(np.linspace(0, 1, 50), (40, 50)),
                               atol=2e-6)


def test_sam_size_cap_is_unimrgs(seed):
    """run_mask.py: a longer side past 2,048 px shrinks the image (sides truncated, area
    interpolation), and the edge map comes back with OpenCV's nearest neighbour."""
    assert teachers.work_size(3000, 4000, 2048) == (1536, 2048)
    assert teachers.work_size(2049, 1000, 2048) == (2048, 999)
    assert teachers.work_size(2048, 2048, 2048) == (2048, 2048)
    assert teachers.work_size(5000, 3000, 0) == (5000, 3000)
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 256, (12, 9, 3), np.uint8)
    # an integer factor: the mean of each block
    np.testing.assert_array_equal(
        np.asarray(teachers.shrink(Image.fromarray(a), 4, 3)),
        np.rint(a.reshape(4, 3, 3, 3, 3).astype(float).mean(axis=(1, 3))))
    # a partial pixel counts by its share: 3 pixels [0, 90, 30] to 2 (1.5 each)
    row = np.array([[[0] * 3, [90] * 3, [30] * 3]], np.uint8)
    np.testing.assert_array_equal(np.asarray(teachers.shrink(Image.fromarray(row), 1, 2))[0, :, 0],
                                  [30, 50])   # (0 + 45) / 1.5, (45 + 30) / 1.5
    rows = np.arange(7, dtype=np.uint8)[:, None].repeat(5, axis=1)   # row i holds i
    big = teachers.enlarge(rows, 654, 310)
    assert big.shape == (654, 310) and big[327, 0] == 3   # 327 x 7/654 = 3.5 -> row 3
    np.testing.assert_array_equal(big[:, 0], np.floor(np.arange(654) * (1 / (654 / 7))))
    try:
        import cv2
    except ImportError:
        return
    for h, w, nh, nw in [(88, 162, 654, 310), (37, 53, 100, 400)]:
        small = rng.integers(0, 256, (h, w), np.uint8)
        np.testing.assert_array_equal(teachers.enlarge(small, nh, nw),
                                      cv2.resize(small, (nw, nh), interpolation=cv2.INTER_NEAREST))
    for h, w, nh, nw in [(300, 200, 123, 77), (64, 48, 32, 24), (99, 101, 50, 50)]:
        image = rng.integers(0, 256, (h, w, 3), np.uint8)
        got = np.asarray(teachers.shrink(Image.fromarray(image), nh, nw)).astype(int)
        want = cv2.resize(image, (nw, nh), interpolation=cv2.INTER_AREA).astype(int)
        assert np.abs(got - want).max() <= 1   # OpenCV's fixed-point rounding apart


def test_sam_runs_on_the_shrunk_image_and_the_target_has_the_images_size(
        tmp_path, models, monkeypatch):
    images = tmp_path / "tuning_data"
    for i, (h, w) in enumerate([(20, 30), (40, 17), (10, 10)]):
        save_noise(images / f"{i}.png", h, w, seed=i)
    seen = []

    def fake_masks(self, ims):
        seen.extend(im.size for im in ims)
        return [[np.ones((im.height, im.width), bool)] for im in ims]

    monkeypatch.setattr(MaskGenerator, "masks", fake_masks)
    run(images, models, tasks="seg", sam_max_size=16)
    out = images.parent / "tuning_data_mask"
    for i, (h, w) in enumerate([(20, 30), (40, 17), (10, 10)]):
        with Image.open(out / f"{i}.png") as target:
            assert target.size == (w, h)
    # 30 x 20 -> 16 x 10 (truncated), 17 x 40 -> 6 x 16, 10 x 10 as it is
    assert sorted(seen) == sorted([(16, 10), (6, 16), (10, 10)]), seen


def test_only_depth_anything_is_taken_as_the_depth_teacher(models, monkeypatch, tmp_path):
    """input_size is Depth Anything's own sizing: a DPT / GLPN / ZoeDepth checkpoint (whose
    processors size inputs otherwise) is refused at load, not run wrongly or failed per image."""
    import shutil

    import transformers

    real = transformers.AutoModelForDepthEstimation.from_pretrained

    def as_dpt(*args, **kwargs):
        model = real(*args, **kwargs)
        model.config.model_type = "dpt"
        return model

    monkeypatch.setattr(transformers.AutoModelForDepthEstimation, "from_pretrained", as_dpt)
    with pytest.raises(teachers.TeacherError, match="'dpt' model.*Depth Anything"):
        DepthTeacher.load(models["depth"])
    monkeypatch.undo()
    folder = tmp_path / "depth"
    shutil.copytree(models["depth"], folder)
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["size"] = {"shortest_edge": 42}
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(teachers.TeacherError, match="height / width size"):
        DepthTeacher.load(folder)


def test_an_exact_halving_rounds_halves_up_as_opencv():
    """cv2.INTER_AREA at exactly 2x adds in integers: (a + b + c + d + 2) >> 2."""
    block = np.repeat(np.array([[0, 0], [1, 1]], np.uint8)[:, :, None], 3, axis=2)
    assert np.asarray(teachers.shrink(Image.fromarray(block), 1, 1))[0, 0, 0] == 1
    ramp = np.repeat(np.arange(16, dtype=np.uint8).reshape(4, 4)[:, :, None], 3, axis=2)
    got = np.asarray(teachers.shrink(Image.fromarray(ramp), 2, 2))[:, :, 0]
    np.testing.assert_array_equal(got, [[3, 5], [11, 13]])   # (0+1+4+5+2)>>2 = 3, ...
