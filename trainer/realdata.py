"""Real data: LLaVA-format records + an image folder + depth / segmentation target folders
(the UniMRG release's layout, trainer/datapaths.py), turned into the same Samples the
synthetic scenes give, so packing (trainer/data.py) is reused unchanged.

    {"id": "000001", "image": "coco/0001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

Preprocessing (DESIGN.md 6):

    und      image padded to a square with grey (127, 127, 127), resized to S x S; text:
             every human -> gpt turn, "<image>" removed; the loss covers the answers only
    pixel    image stretched to S x S; target = the same image
    depth    image stretched; target: grey depth stretched (bilinear), min-max to [0, 1]
             per image, then to [-1, 1], repeated to 3 channels
    seg      image stretched; target: the mask stretched nearest-neighbour (no new colours)
    prompts  REAL_PROMPTS: DESIGN.md 6's sentences and paraphrases (one drawn per sample);
             the synthetic scenes keep their own lower-case word language (scenes.PROMPTS)
    16-bit   grey images (PIL modes I;16, I, F) are scaled to 8 bits first (to_rgb), in the
             trainer and in trainer.prepare alike; a plain convert("RGB") saturates them

A target is found as the release's loaders find it (datapaths.target_path): at the image's
own relative path in the target folder, then with .png (what trainer.prepare writes), then
with .jpg.

Streaming: RecordDataset is a torch IterableDataset over the records, which a RecordStore
(trainer/records.py) holds compactly and reads by index (a JSON Lines line when it is
wanted; a JSON list as one byte buffer). Each epoch visits the records in a permutation
drawn from (seed, epoch) (--no-shuffle: file order; LLaVA-style files are often grouped
by source, which one long run in file order would train on one source at a time).
Position p of that order belongs to shard (rank * workers + worker) when p % (world *
workers) equals it, so ranks and workers see disjoint records that together cover the
file every epoch. Everything random about a sample is drawn from a generator seeded by
(seed, epoch, record, task, k), so a run replays exactly. A record that cannot be used
is skipped and counted, never fatal:

    bad_json         a JSON Lines line that does not parse, or a record that is not an object
                     (a JSON list that does not parse as a whole is a ConfigError naming --data)
    no_image         a record without an "image" (text-only records: the model needs one)
    missing_image    the image file does not exist
    bad_image        the image does not decode
    no_conversation  no human -> gpt turn (only the und sample is skipped)
    too_long         the und sample does not fit in --pack-tokens even with one turn
    missing_depth / missing_mask   no target for the image (only that task's samples; once
                                   a record, though sgt's cycle asks two seg samples of it)
    bad_depth / bad_mask           the target does not decode, or (depth) holds a NaN or
                                   inf pixel (likewise)
    bad_record       anything else that fails while one record is turned into samples (a
                     record of an unexpected shape): the rest of that record is left out

Before training (RealSource), the first records whose image opens are probed: a target
folder that holds none of their targets (prepare not run yet, or run into another folder)
is a ConfigError naming --depth-dir / --mask-dir, not a run without that task's samples.
"""
from __future__ import annotations

import collections
import dataclasses
import os
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from trainer import scenes
from trainer.config import TASKS, Config, ConfigError
from trainer.data import TASK_ID, Sample, SampleFactory
from trainer.datapaths import DataPaths, prepare_command, resolve, target_names, target_path
from trainer.records import RecordStore, epoch_order

GREY = (127, 127, 127)
IMAGE_TOKEN = "<image>"
_REAL_SALT = 0x4EA1
SKIP_REASONS = ("bad_json", "no_image", "missing_image", "bad_image", "no_conversation",
                "too_long", "missing_depth", "missing_mask", "bad_depth", "bad_mask",
                "bad_record", "surplus")   # surplus: a round-robin queue's oldest, dropped
# The generation prompts of real data (DESIGN.md 6: the UniMRG release's sentences first,
# then paraphrases). Synthetic scenes keep scenes.PROMPTS, in their lower-case word language.
REAL_PROMPTS = {
    "depth": ["Generate the depth map of this image.",
              "Predict the depth map of this image.",
              "Estimate the depth of this image.",
              "Produce a depth map for this image."],
    "seg": ["Generate the segmentation mask of this image.",
            "Predict the segmentation mask of this image.",
            "Segment the objects in this image.",
            "Produce a segmentation mask for this image."],
    "pixel": ["Reconstruct this image.",
              "Generate a copy of this image.",
              "Redraw this image.",
              "Reproduce this image exactly."],
}
# The pre-training probe of the target folders: records with a readable image it looks at,
# and records it reads at most to find them (a data set's first records, cheaply).
PROBE_RECORDS = 32
PROBE_SCAN = 1024
# PIL modes of more than 8 bits per pixel (16-bit grey PNGs open as I;16 or I)
WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


# ------------------------------------------------------------------------ preprocessing
def _pil(image):
    from PIL import Image

    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


def to_8bit(image):
    """A grey image of more than 8 bits (WIDE_MODES) -> mode L. PIL's own conversion clips
    at 255, so a 16-bit photo turns white: I;16 is scaled by 255 / 65535; I and F are kept
    if they already lie in [0, 255] (F in [0, 1] is scaled by 255: a float image in [0, 1]
    kept as it is would be black), else I in [0, 65535] is scaled as 16 bits and anything
    else is min-max normalised. Other modes are returned as they are."""
    from PIL import Image

    image = _pil(image)
    if image.mode not in WIDE_MODES:
        return image
    values = np.nan_to_num(np.asarray(image.convert("F"), dtype=np.float64))
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode.startswith("I;16") or (image.mode == "I" and low >= 0 and 255 < high <= 65535):
        values = values * (255.0 / 65535.0)
    elif image.mode == "F" and low >= 0 and high <= 1:
        values = values * 255.0     # a float image in [0, 1], the usual float convention
    elif not (low >= 0 and high <= 255):
        values = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    return Image.fromarray(np.rint(np.clip(values, 0, 255)).astype(np.uint8), "L")


def to_rgb(image):
    """Any PIL image (or array) -> RGB, 16-bit grey scaled to 8 bits first (to_8bit). The
    trainer and trainer.prepare both read images through this, so that prepare's targets
    and the trainer's inputs share one pixel grid and one brightness."""
    return to_8bit(image).convert("RGB")


def pad_to_square(image, fill=GREY):
    """PIL image -> the smallest square holding it, centred, the rest filled with `fill`."""
    from PIL import Image

    image = to_rgb(image)
    w, h = image.size
    if w == h:
        return image
    side = max(w, h)
    out = Image.new("RGB", (side, side), fill)
    out.paste(image, ((side - w) // 2, (side - h) // 2))
    return out


def und_image(image, size: int) -> np.ndarray:
    """Understanding input: grey-padded to square, resized: uint8 [S, S, 3]."""
    from PIL import Image

    return np.array(pad_to_square(image).resize((size, size), Image.BICUBIC), dtype=np.uint8)


def gen_image(image, size: int) -> np.ndarray:
    """Generation input (and pixel target): stretched to S x S: uint8 [S, S, 3]."""
    from PIL import Image

    return np.array(to_rgb(image).resize((size, size), Image.BICUBIC), dtype=np.uint8)


def depth_target(depth, size: int) -> np.ndarray:
    """A depth map (grey PNG, 8 or 16 bit, or RGB read as grey) -> float32 [S, S, 3] in
    [-1, 1]: stretched (bilinear), per-image min-max to [0, 1], to [-1, 1], 3 channels.
    A constant map gives -1 everywhere; a map with a NaN or inf pixel is refused
    (ValueError: the sample is skipped as bad_depth)."""
    from PIL import Image

    depth = _pil(depth)
    if depth.mode in ("RGB", "RGBA", "P", "LA"):
        depth = depth.convert("L")
    values = np.asarray(depth.convert("F").resize((size, size), Image.BILINEAR),
                        dtype=np.float64)
    if not np.isfinite(values).all():   # a float map with NaN / inf pixels: a NaN min-max
        # would give a constant target, an inf one NaN losses; the caller counts bad_depth
        raise ValueError("the depth map holds non-finite values")
    low, high = values.min(), values.max()
    unit = (values - low) / (high - low) if high > low else np.zeros_like(values)
    out = (unit * 2.0 - 1.0).astype(np.float32)
    return np.repeat(out[..., None], 3, axis=-1)


def seg_target(mask, size: int) -> np.ndarray:
    """A segmentation target -> uint8 [S, S, 3], stretched nearest-neighbour (so only the
    mask's own colours appear)."""
    from PIL import Image

    return np.array(_pil(mask).convert("RGB").resize((size, size), Image.NEAREST),
                      dtype=np.uint8)


def load_image(path: str):
    """Decodes the whole file now (a truncated or corrupt one fails here)."""
    from PIL import Image

    with Image.open(path) as image:
        image.load()
        return image.copy()


# LLaVA's roles and the chat-template names other exports use, any capitalisation
ASKS, ANSWERS = ("human", "user"), ("gpt", "assistant")


def conversation_turns(record: dict) -> List[scenes.QA]:
    """Every human -> gpt pair of a LLaVA record, "<image>" removed from the questions
    (user / assistant, in any case, are the same roles). Human turns in a row make one
    question, joined by newlines: the first usually holds the instruction."""
    turns, question = [], None
    messages = record.get("conversations")
    if not isinstance(messages, list):   # absent, null, or a number / string by mistake
        return turns
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("value"), str):
            continue
        who = message.get("from")
        who = who.lower() if isinstance(who, str) else who
        if who in ASKS:
            text = message["value"].replace(IMAGE_TOKEN, "").strip()
            question = text if question is None else f"{question}\n{text}".strip()
        elif who in ANSWERS and question is not None:
            answer = message["value"].strip()
            if answer:
                turns.append(scenes.QA(question, answer, "real"))
            question = None
    return turns


# ------------------------------------------------------------------------------ dataset
@dataclasses.dataclass(frozen=True)
class Skipped:
    """A record or a task's sample that was left out, and why (see SKIP_REASONS)."""

    reason: str
    source: str


@dataclasses.dataclass(frozen=True)
class Tagged:
    """An item with where its reader stood: reader `role` (a worker's part of the shard),
    `epoch`, position `j` in the reader's records of that epoch, `k`-th item of the
    record. RealSource keeps the last one of each reader: the data position."""

    role: int
    epoch: int
    j: int
    k: int
    item: object


class RecordDataset(torch.utils.data.IterableDataset):
    """Samples (and Skipped markers) of this rank's shard of the records, split further
    among DataLoader workers; each record gives, in the order of `cycle`, one sample per
    task occurrence (sgt's seg, seg, und: two seg samples with their own prompt, masks and
    noise). Every epoch visits the records in epoch_order (shuffled by (seed, epoch), or
    file order); shard s of S takes the positions p of that order with p % S == s.
    epochs=None: endless. A reader ends early only when it has no record at all, or, in
    file order, after an epoch whose share gave no sample (the next would be the same);
    shuffled, its next share differs, and RealSource stops a data set that gives no
    sample in a whole data set's worth of records in a row."""

    def __init__(self, factory: SampleFactory, paths: DataPaths, cycle: Sequence[str], *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, pack_tokens: int,
                 epochs: Optional[int] = None, shuffle: bool = True):
        super().__init__()
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
        self.factory, self.paths, self.cycle = factory, paths, tuple(cycle)
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.pack_tokens, self.epochs, self.shuffle = pack_tokens, epochs, shuffle
        self.store = RecordStore(paths.records)
        self.size = factory.image_size

        # Where each reader resumes (RealSource.load_state_dict): role -> (epoch, j, k,
        # produced) of the last item taken; the DataLoader's worker w reads as role
        # (w + phase) % workers, so that its round-robin continues with the reader whose
        # turn was next.
        self.resume_at: Dict[int, Tuple[int, int, int, bool]] = {}
        self.phase = 0
        self.tagged = False

    def __iter__(self) -> Iterator[object]:
        """Samples and Skipped markers; each wrapped in a Tagged when self.tagged (what
        RealSource reads, to know the data position)."""
        items = self.tagged_items()
        return items if self.tagged else (tagged.item for tagged in items)

    def tagged_items(self) -> Iterator[Tagged]:
        info = torch.utils.data.get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        role = (worker + self.phase) % workers
        shards, shard = self.world_size * workers, self.rank * workers + role
        epoch, start, done, produced = self.resume_at.get(role, (0, 0, -1, False))
        if shard >= len(self.store):
            return   # fewer records than readers: this one has none, in any epoch
        while self.epochs is None or epoch < self.epochs:
            order = epoch_order(len(self.store), self.seed, epoch, self.shuffle)
            mine = order[shard::shards].tolist()
            for j in range(start, len(mine)):
                items = self.record_samples(mine[j], self.store.get(mine[j]), epoch)
                for k, item in enumerate(items):
                    if j == start and k <= done:
                        continue   # taken before the checkpoint
                    if isinstance(item, Sample):
                        produced, item.origin = True, (mine[j], epoch, k)
                    yield Tagged(role, epoch, j, k, item)
            if not produced and not self.shuffle:
                return   # in file order an all-bad shard stays all bad: nothing more to give
            # shuffled, the next epoch's share differs: RealSource judges a barren data set
            epoch, start, done, produced = epoch + 1, 0, -1, False

    def record_samples(self, index: int, record, epoch: int = 0) -> Iterator[object]:
        """The record's samples and Skipped markers. One record never stops the run: an
        error nobody foresaw (a record of an unexpected shape, an odd image) ends the
        record with a bad_record skip."""
        try:
            yield from self._record_samples(index, record, epoch)
        except Exception:  # noqa: BLE001 - one record's surprise is counted, not fatal
            yield Skipped("bad_record", f"record {index}")

    def _record_samples(self, index: int, record, epoch: int) -> Iterator[object]:
        if not isinstance(record, dict):
            yield Skipped("bad_json", f"record {index}")
            return
        source = f"{index}:{record.get('id', '')}"
        rel = record.get("image")
        if not isinstance(rel, str) or not rel:
            yield Skipped("no_image", source)
            return
        path = os.path.join(self.paths.images, rel)
        if not os.path.isfile(path):
            yield Skipped("missing_image", source)
            return
        try:
            image = load_image(path)
        except Exception:  # noqa: BLE001 - any undecodable file is skipped, not fatal
            yield Skipped("bad_image", source)
            return
        stretched: List[np.ndarray] = []

        def gen_input() -> np.ndarray:
            """The image resized for generation, once per record: every generation
            sample's condition, and the pixel task's target."""
            if not stretched:
                stretched.append(gen_image(image, self.size))
            return stretched[0]

        targets: Dict[str, object] = {}
        for k, task in enumerate(self.cycle):
            rng = np.random.default_rng((_REAL_SALT, self.seed, epoch, index, TASK_ID[task], k))
            if task == "und":
                sample = self._und(image, record, source)
            else:
                if task not in targets:
                    targets[task] = (gen_input() if task == "pixel"
                                     else self._target(task, image, rel, source))
                    if isinstance(targets[task], Skipped):
                        # once a record (sgt asks two seg samples of it), like every reason
                        yield targets[task]
                target = targets[task]
                if isinstance(target, Skipped):
                    continue
                sample = self.factory.gen_from(task, gen_input(), target, rng,
                                               prompts=REAL_PROMPTS)
            if isinstance(sample, Sample):
                sample.source = source
            yield sample

    def _und(self, image, record: dict, source: str):
        turns = conversation_turns(record)
        if not turns:
            return Skipped("no_conversation", source)
        cond = und_image(image, self.size)
        sample = self.factory.und_from(cond, turns, max_tokens=self.pack_tokens)
        return sample if sample is not None else Skipped("too_long", source)

    def _target(self, task: str, image, rel: str, source: str):
        """The depth or seg target of the image, or why there is none."""
        root, name = (self.paths.depth, "depth") if task == "depth" else (self.paths.mask, "mask")
        path = target_path(root, rel, images=self.paths.images)
        if path is None:
            return Skipped(f"missing_{name}", source)
        try:   # a file that decodes but cannot be converted (an odd mode) is as bad
            raw = load_image(path)
            return depth_target(raw, self.size) if task == "depth" else seg_target(raw, self.size)
        except Exception:  # noqa: BLE001
            return Skipped(f"bad_{name}", source)


def _readable(path: str) -> bool:
    """The file exists and its header is an image's (cheap: nothing is decoded)."""
    from PIL import Image

    if not os.path.isfile(path):   # a FIFO named x.png would block Image.open forever
        return False
    try:
        with Image.open(path) as image:
            return image.size[0] > 0
    except Exception:  # noqa: BLE001 - missing, not an image: not a probe record
        return False


def probe_targets(paths: DataPaths, store: RecordStore, tasks: Sequence[str],
                  seg_colour: bool = False) -> None:
    """Before training: a ConfigError naming --depth-dir / --mask-dir when none of the
    first PROBE_RECORDS records (in file order) whose image opens has a target in that
    folder. An empty folder (prepare not run yet, or run into another folder) would
    otherwise train without that task's samples and say so only in the skip counters."""
    folders = {"depth": ("--depth-dir", paths.depth), "seg": ("--mask-dir", paths.mask)}
    wanted = [t for t in tasks if t in folders and folders[t][1] is not None]
    if not wanted:
        return
    rels: List[str] = []
    for index in range(min(len(store), PROBE_SCAN)):
        if len(rels) >= PROBE_RECORDS:
            break
        record = store.get(index)
        rel = record.get("image") if isinstance(record, dict) else None
        if isinstance(rel, str) and rel and _readable(os.path.join(paths.images, rel)):
            rels.append(rel)
    if not rels:   # no image at all: RealSource's "no usable sample" error says so
        return
    for task in wanted:
        flag, root = folders[task]
        if any(target_path(root, rel, images=paths.images) is not None for rel in rels):
            continue
        raise ConfigError(flag, f"none of the first {len(rels)} records with an image has a "
                                f"{task} target in {root!r} (for {rels[0]!r} it looked for "
                                f"{', '.join(target_names(rels[0]))} there); make them with "
                                f"`{prepare_command(paths.images, task, root, seg_colour)}` "
                                f"or pass {flag} DIR (or leave {task} out with --tasks)")


def _identity(item):
    return item


def distributed_rank() -> Tuple[int, int]:
    """(rank, world size) from torch.distributed when initialised, else the launcher's env."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


class RealSource:
    """The trainer's view of the real data: next_sample(task) for PackStream, skip counts.

    Interleaved: samples are taken in arrival order (each record gives its tasks in the
    cycle's order). Round-robin: per-task queues, each stream taking its own task."""

    MAX_QUEUED = 1024        # per task; the oldest is dropped (counted) past this
    MAX_PULLS = 100_000      # samples without the wanted task before giving up on it

    def __init__(self, config: Config, factory: SampleFactory, *, epochs: Optional[int] = None):
        d = config.data
        paths = resolve(d.data, d.images, d.depth_dir, d.mask_dir, d.active_tasks,
                        seg_colour=d.seg_colour)
        rank, world = distributed_rank()
        self.dataset = RecordDataset(factory, paths, d.task_cycle, seed=d.seed, rank=rank,
                                     world_size=world, pack_tokens=d.pack_tokens, epochs=epochs,
                                     shuffle=d.shuffle)
        per_rank = max(1, d.num_workers)
        if len(self.dataset.store) <= (world - 1) * per_rank:   # reader s takes record s first
            raise ConfigError("--data", f"{paths.records!r} holds {len(self.dataset.store)} "
                                        f"record(s): the last of {world} processes (x "
                                        f"{per_rank} reader(s) each, --num-workers) would get "
                                        f"none; use fewer, or more records")
        self.where = f" (rank {rank} of {world}: its share of the records)" if world > 1 else ""
        probe_targets(paths, self.dataset.store, d.active_tasks, d.seg_colour)
        if d.num_workers:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        # Its own generator: starting the workers draws their base seed, which from the
        # global one would happen after a resume restored the RNG states (one draw ahead).
        self.loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=None, num_workers=d.num_workers, collate_fn=_identity,
            prefetch_factor=4 if d.num_workers else None,
            generator=torch.Generator().manual_seed(d.seed))
        self.dataset.tagged = True
        self.readers = max(1, d.num_workers)
        self.in_order = d.schedule == "interleaved"
        self.skipped: Dict[str, int] = collections.Counter()
        self.queues: Dict[int, collections.deque] = {
            i: collections.deque() for i in range(len(TASKS))}
        self._it: Optional[Iterator] = None
        # The data position: the last item taken from each reader, and how many were taken
        # since the loader started (the DataLoader takes them from its workers in turn).
        self.taken_at: Dict[int, Tuple[int, int, int, bool]] = {}
        self.taken = 0
        self.in_turn = True   # False once a reader was out of turn (one ran dry)
        # Records in a row that gave no sample: past a whole data set's worth (every
        # rank's share, a rank sees 1/world of each epoch) no record is usable, as far as
        # anyone can tell; shuffled readers never run dry on their own.
        self.barren = 0
        self.barren_limit = max(1, len(self.dataset.store))

    def state_dict(self) -> Dict[str, object]:
        """Where every reader stands, the task queues and the skip counters (a
        checkpoint's per-rank data file). in_turn False: the readers' round-robin broke
        (a reader whose records all failed ended), which a fresh loader cannot repeat, so
        load_state_dict refuses and the run replays the stream instead. A queued sample
        is kept as its origin, not its arrays: round-robin queues of a data set with
        missing targets fill up to MAX_QUEUED samples of the other tasks, ~1 GB of images
        per rank to write at every checkpoint."""
        return {"readers": self.readers, "in_turn": self.in_turn,
                "phase": (self.dataset.phase + self.taken) % self.readers,
                "taken_at": dict(self.taken_at), "skipped": dict(self.skipped),
                "barren": self.barren, "records": dict(self.dataset.store.fingerprint),
                "queues": {task: [s.origin for s in q] for task, q in self.queues.items()}}

    def load_state_dict(self, state: Dict[str, object]) -> bool:
        self.check_same_records(state)
        if not state["in_turn"] or state["readers"] != self.readers:
            return False
        if self._it is not None:
            raise RuntimeError("RealSource.load_state_dict must come before the first sample")
        self.dataset.phase, self.dataset.resume_at = state["phase"], dict(state["taken_at"])
        self.taken_at = dict(state["taken_at"])
        self.skipped = collections.Counter(state["skipped"])
        self.barren = state["barren"]
        self.queues = {task: collections.deque(self._remake(q))
                       for task, q in state["queues"].items()}
        return True

    def check_same_records(self, state: Dict[str, object]) -> None:
        """A checkpoint's data position (and a replay of its stream) names records by
        their index: records added, removed, reordered or edited since the save would
        silently continue on other samples than the checkpoint's run saw, so the resume
        is refused (checkpoints written before the fingerprint existed are not checked)."""
        saved, now = state.get("records"), self.dataset.store.fingerprint
        if saved is None or saved == now:
            return
        what = (f"{saved['records']} records then, {now['records']} now"
                if saved["records"] != now["records"] else
                f"the same {now['records']} records, but their text differs")
        raise ConfigError("--data", f"{self.dataset.paths.records!r} changed since the "
                                    f"checkpoint was written ({what}): its data position "
                                    f"would point at other records. Resume with the records "
                                    f"the run was trained on, or start a new run")

    def _remake(self, queued: List[object]) -> Iterator[Sample]:
        """The queued samples of a checkpoint, made again from their origins (older
        checkpoints hold the samples themselves). A record that no longer gives the same
        sample (its files changed since the save) is counted as skipped, not fatal."""
        made: Dict[Tuple[int, int], List[object]] = {}
        for entry in queued:
            if isinstance(entry, Sample):
                yield entry
                continue
            index, epoch, k = entry
            if (index, epoch) not in made:
                made[(index, epoch)] = list(self.dataset.record_samples(
                    index, self.dataset.store.get(index), epoch))
            items = made[(index, epoch)]
            item = items[k] if k < len(items) else Skipped("bad_record", f"record {index}")
            if isinstance(item, Sample):
                item.origin = (index, epoch, k)
                yield item
            else:
                self.skipped[item.reason] += 1

    def close(self) -> None:
        """Stops the worker processes now, not whenever the garbage collector reaches the
        run's frames (a finished or failed train() leaves them in reference cycles). A
        sample asked for later starts the readers again from the beginning."""
        it, self._it = self._it, None
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def _take(self) -> object:
        """The next item, its reader's position noted (and whether its record, so far,
        is one more that gave no sample)."""
        tagged = next(self._it)
        if isinstance(tagged.item, Sample):
            self.barren = 0
        elif tagged.k == 0:   # a record's first item: its first word on being usable
            self.barren += 1
        self.in_turn = self.in_turn and (
            tagged.role == (self.dataset.phase + self.taken) % self.readers)
        self.taken += 1
        produced = isinstance(tagged.item, Sample) or (
            self.taken_at.get(tagged.role, (-1,))[0] == tagged.epoch
            and self.taken_at[tagged.role][3])
        self.taken_at[tagged.role] = (tagged.epoch, tagged.j, tagged.k, produced)
        return tagged.item

    def _pull(self) -> Sample:
        if self._it is None:
            self._it = iter(self.loader)
        while True:
            try:
                item = self._take()
            except StopIteration:   # every reader ended (file order: a barren epoch)
                item = None
            if item is None or self.barren > self.barren_limit:
                raise ConfigError("--data", f"{self.dataset.paths.records!r} gave no usable "
                                            f"sample{self.where} (skipped: "
                                            f"{dict(self.skipped)}); check --images and the "
                                            f"records")
            if isinstance(item, Skipped):
                self.skipped[item.reason] += 1
                continue
            return item

    def next_sample(self, task: str) -> Sample:
        if self.in_order:
            return self._pull()
        queue = self.queues[TASK_ID[task]]
        pulls = 0
        while not queue:
            sample = self._pull()
            other = self.queues[sample.task]
            other.append(sample)
            if len(other) > self.MAX_QUEUED:
                other.popleft()
                self.skipped["surplus"] += 1
            pulls += 1
            if pulls > self.MAX_PULLS and not queue:
                flag = {"depth": "--depth-dir", "seg": "--mask-dir"}.get(task, "--data")
                raise ConfigError(flag, f"no {task} sample in the last {pulls} samples of "
                                        f"{self.dataset.paths.records!r}{self.where}: are "
                                        f"its targets missing? (skipped: {dict(self.skipped)})")
        return queue.popleft()
