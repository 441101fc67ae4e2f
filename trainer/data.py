"""Samples of each task built from synthetic scenes, and packs of them (DESIGN.md 6).

A sample is a list of spans (DESIGN.md 3.4):

    und        [condition image: ViT tokens (full) | bos question answer eos (causal)]
    pixel,     [condition image: ViT tokens (full) | bos prompt (causal) | target image]
    depth, seg  target image: (image_size / patch)^2 tokens, "full" for ar / mar,
                "noise" for flow

The text loss covers the answer (and its eos) only. Everything random about a sample (the
question, the prompt paraphrase, which target tokens are masked, the noise and the
timesteps) is drawn on the host from a generator seeded by (seed, task, sample index), so
the packs of a run are a pure function of its config: the fused and the plain path see
identical packs, and a run can be replayed.

A Pack holds its samples back to back, padded to --pack-tokens, with one PackedLayout,
position ids that restart at 0 for each sample, and for every head the rows it scores
(indices computed on the host, so no boolean indexing syncs the device).

Real data (--data) goes through the same SampleFactory (und_from / gen_from) from
trainer/realdata.py, whose samples PackStream takes instead of the synthetic ones.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

from trainer import scenes
from trainer.config import ROUND_ROBIN_ORDER, TASKS, Config, ConfigError
from trainer.tokenizers import depth_to_image, image_to_unit
from unimrg_fast import PackedLayout
from unimrg_fast.packing import StreamingPacker

TASK_ID = {task: i for i, task in enumerate(TASKS)}
UND = TASK_ID["und"]
# Held-out scenes live above every training scene seed (training seeds are < 2**40).
EVAL_SEED_OFFSET = 1 << 40
_SAMPLE_SALT = 0x5EED


def train_scene_seed(seed: int, index: int) -> int:
    return seed * 1_000_003 + index


def eval_scene_seed(seed: int, index: int) -> int:
    return EVAL_SEED_OFFSET + seed * 1_000_003 + index


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor's copy on `device` that does not make the host wait: from pageable
    memory a copy to a GPU waits for the stream (every queued kernel), so pin it first."""
    if device.type == "cuda" and tensor.device.type == "cpu":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


@dataclasses.dataclass
class Sample:
    """One sample's host arrays; positions are relative to the sample's first token."""

    task: int
    spans: Tuple[Tuple[int, str], ...]
    input_ids: np.ndarray            # [L] int64; image positions hold the tokenizer's img id
    cond_image: np.ndarray           # uint8 [S, S, 3]: the ViT's input
    label_rows: np.ndarray           # [A] positions whose next token is an answer token
    label_ids: np.ndarray            # [A] those answer tokens (und only)
    target_start: int = -1           # first target-image position (generation only)
    codes: Optional[np.ndarray] = None     # [Lt] int64 target codes (ar)
    latents: Optional[np.ndarray] = None   # [Lt, C] float32 target latents (mar, flow)
    scored: Optional[np.ndarray] = None    # [Ls] int64 target tokens the loss scores
    eps: Optional[np.ndarray] = None       # [Lt, C] float32 noise (mar, flow)
    timestep: Optional[np.ndarray] = None  # [Lt] int64 DDPM step (mar) / float32 s (flow)
    qa: Optional[scenes.QA] = None
    source: Optional[str] = None           # real data: "record index:id" it was made from
    # real data: (record index, epoch, item k of the record) - enough to make it again
    # (RecordDataset.record_samples is a function of them), which is what a checkpoint
    # keeps of a queued sample instead of its arrays
    origin: Optional[Tuple[int, int, int]] = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


class SampleFactory:
    """Turns (task, scene seed, random generator) into a Sample for one model family."""

    def __init__(self, config: Config, text_tokenizer, image_tokenizer, condition_tokens: int):
        self.config = config
        self.text = text_tokenizer
        self.images = image_tokenizer  # KMeansCodebook (ar) or PatchLatents (mar, flow)
        self.cond_tokens = condition_tokens
        self.family = config.model.family
        self.image_size = config.model.image_size
        self.target_tokens = config.model.target_tokens
        self.seg_colour = config.data.seg_colour
        self.target_mode = "noise" if self.family == "flow" else "full"

    # ----------------------------------------------------------------- text
    def _prefix(self) -> List[int]:
        return [self.text.bos_id] if self.text.bos_id is not None else []

    def und(self, scene: scenes.Scene, qas: Sequence[scenes.QA], *,
            with_answer: bool = True) -> Sample:
        return self.und_from(scene.image, qas, with_answer=with_answer)

    def und_from(self, image: np.ndarray, qas: Sequence[scenes.QA], *,
                 with_answer: bool = True, max_tokens: Optional[int] = None) -> Optional[Sample]:
        """[image | bos q1 a1 eos q2 a2 eos ...]: a multi-turn conversation about the image
        (LLaVA-style); the loss covers each answer and its eos. Without the answer (held-out
        prompts) a single question ends the text. `image`: uint8 [S, S, 3]. With
        `max_tokens`, trailing turns are dropped until the sample fits (each turn is
        tokenised once); None when not even the first turn fits."""
        text: List[int] = self._prefix()
        rows: List[int] = []
        labels: List[int] = []
        turns = 0
        for qa in qas:
            question = self.text.encode(qa.question)
            answer = self.text.encode(qa.answer) + [self.text.eos_id] if with_answer else []
            if (max_tokens is not None
                    and self.cond_tokens + len(text) + len(question) + len(answer) > max_tokens):
                break   # the sample grows with every turn: no later prefix fits either
            turns += 1
            text += question
            # position p predicts token p + 1: the rows are the answer tokens' predecessors
            start = self.cond_tokens + len(text) - 1
            rows += range(start, start + len(answer))
            labels += answer
            text += answer
        if qas and turns == 0:
            return None
        ids = np.array([self.text.img_id] * self.cond_tokens + text, dtype=np.int64)
        return Sample(UND, ((self.cond_tokens, "full"), (len(text), "causal")), ids,
                      image, np.array(rows, dtype=np.int64),
                      np.array(labels, dtype=np.int64), qa=qas[0])

    # ----------------------------------------------------------- generation
    def target_image(self, task: str, scene: scenes.Scene) -> np.ndarray:
        if task == "pixel":
            return scene.image
        if task == "depth":
            return depth_to_image(scene.depth)
        return scene.seg_colour if self.seg_colour else scene.seg_edges

    def gen(self, task: str, scene: scenes.Scene, rng: np.random.Generator) -> Sample:
        return self.gen_from(task, scene.image, self.target_image(task, scene), rng)

    def gen_from(self, task: str, image: np.ndarray, target: np.ndarray,
                 rng: np.random.Generator, prompts: Optional[Dict[str, Sequence[str]]] = None
                 ) -> Sample:
        """[condition image | bos prompt | target image]; `image` uint8 [S, S, 3], `target`
        uint8 [S, S, 3] or float32 in [-1, 1] (what the image tokenizer encodes). `prompts`:
        the paraphrases by task (real data has its own); default scenes.PROMPTS."""
        paraphrases = (prompts or scenes.PROMPTS)[task]
        prompt = self._prefix() + self.text.encode(paraphrases[int(rng.integers(len(paraphrases)))])
        n = self.target_tokens
        ids = np.array([self.text.img_id] * self.cond_tokens + prompt
                       + [self.text.img_id] * n, dtype=np.int64)
        spans = ((self.cond_tokens, "full"), (len(prompt), "causal"), (n, self.target_mode))
        empty = np.zeros(0, dtype=np.int64)
        sample = Sample(TASK_ID[task], spans, ids, image, empty, empty,
                        target_start=self.cond_tokens + len(prompt))
        target = target[None]
        if self.family == "ar":
            sample.codes = self.images.encode(target)[0].numpy()
            # Show-o / MaskGIT: mask ratio cos(pi/2 * u), u ~ U(0, 1), at least one token
            ratio = np.cos(0.5 * np.pi * rng.uniform())
            sample.scored = self._masked(rng, max(1, int(round(ratio * n))))
        else:
            sample.latents = self.images.encode(target)[0].numpy()
            sample.eps = rng.standard_normal(sample.latents.shape).astype(np.float32)
            if self.family == "mar":
                # MAR: mask ratio in [0.7, 1]; each masked token draws its own DDPM step
                sample.scored = self._masked(rng, max(1, int(round(rng.uniform(0.7, 1.0) * n))))
                sample.timestep = rng.integers(0, 1000, size=n).astype(np.int64)
            else:
                # flow (BAGEL / OpenUni): one logit-normal time s per image, every token scored
                s = 1.0 / (1.0 + np.exp(-rng.standard_normal()))
                sample.timestep = np.full(n, s, dtype=np.float32)
                sample.scored = np.arange(n, dtype=np.int64)
        return sample

    def _masked(self, rng: np.random.Generator, count: int) -> np.ndarray:
        return np.sort(rng.permutation(self.target_tokens)[:count]).astype(np.int64)

    # --------------------------------------------------------------- stream
    def make(self, task: str, scene_seed: int, rng: np.random.Generator) -> Sample:
        scene = scenes.make_scene(scene_seed, self.image_size)
        if task == "und":
            k = self.config.data.questions_per_image
            return self.und(scene, scenes.make_questions(scene, int(rng.integers(2 ** 31)), k=k))
        return self.gen(task, scene, rng)

    def train_sample(self, task: str, index: int) -> Sample:
        """The index-th training sample of `task`: scene `index`, its own generator."""
        seed = self.config.data.seed
        rng = np.random.default_rng((_SAMPLE_SALT, seed, TASK_ID[task], index))
        return self.make(task, train_scene_seed(seed, index), rng)


@dataclasses.dataclass
class Pack:
    """One pack's tensors (see the module docstring). Rows index the pack's T tokens."""

    layout: PackedLayout
    input_ids: torch.Tensor          # [T] int64
    position_ids: torch.Tensor       # [T] int64, restarting at 0 per sample
    vit_images: torch.Tensor         # [N, 3, S, S] float32 in [-1, 1]: condition images
    vit_rows: torch.Tensor           # [N * Lv] where their ViT tokens go
    text_rows: torch.Tensor          # [A] rows scored by the LM head
    text_targets: torch.Tensor       # [A] int64 answer tokens
    gen_rows: torch.Tensor           # [G] rows of every target-image token
    gen_codes: Optional[torch.Tensor]    # [G] int64 (ar)
    gen_latents: Optional[torch.Tensor]  # [G, C] float32 (mar, flow)
    gen_eps: Optional[torch.Tensor]      # [G, C] float32 (mar, flow)
    gen_timestep: Optional[torch.Tensor]  # [G] int64 (mar) / float32 (flow)
    scored: torch.Tensor             # [R] indices into the G target tokens that are scored
    scored_task: torch.Tensor        # [R] int64 task of each scored target token
    task_tokens: np.ndarray          # [4] host: tokens of each task's samples
    sample_tasks: Tuple[int, ...]    # host: task of each sample
    num_real_tokens: int             # host: tokens that are not padding

    def to(self, device: torch.device) -> "Pack":
        device = torch.device(device)
        moved = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                value = to_device(value, device)
            elif isinstance(value, PackedLayout):
                value = value.to(device)
            moved[f.name] = value
        return Pack(**moved)

    @property
    def num_tokens(self) -> int:
        return self.layout.num_tokens


def _cat(arrays: Sequence[np.ndarray], dtype, width: Optional[int] = None) -> torch.Tensor:
    if not arrays:
        shape = (0,) if width is None else (0, width)
        return torch.zeros(shape, dtype=dtype)
    return torch.from_numpy(np.concatenate(arrays)).to(dtype)


def build_pack(samples: Sequence[Sample], pack_tokens: int, pad_id: int,
               condition_tokens: int, latent_channels: int = 0) -> Pack:
    """Concatenates samples into one pack padded to `pack_tokens` (one causal pad sample)."""
    if not samples:
        raise ValueError("a pack needs at least one sample")
    total = sum(s.length for s in samples)
    if total > pack_tokens:
        raise ValueError(f"samples hold {total} tokens, more than --pack-tokens {pack_tokens}")
    layout = PackedLayout.from_spans([s.spans for s in samples], pad_to=pack_tokens)
    starts = np.concatenate([[0], np.cumsum([s.length for s in samples])])[:-1]
    pad = pack_tokens - total
    ids = [s.input_ids for s in samples] + [np.full(pad, pad_id, dtype=np.int64)]
    positions = [np.arange(s.length) for s in samples] + [np.arange(pad)]
    gen = [(start, s) for start, s in zip(starts, samples) if s.target_start >= 0]
    gen_rows, scored, scored_task = [], [], []
    seen = 0
    for start, s in gen:
        n = s.input_ids.shape[0] - s.target_start
        gen_rows.append(start + s.target_start + np.arange(n))
        scored.append(seen + s.scored)
        scored_task.append(np.full(s.scored.shape[0], s.task, dtype=np.int64))
        seen += n
    task_tokens = np.zeros(len(TASKS), dtype=np.int64)
    for s in samples:
        task_tokens[s.task] += s.length
    images = np.stack([image_to_unit(s.cond_image) for s in samples])       # [N, S, S, 3]
    family_has = lambda name: bool(gen) and getattr(gen[0][1], name) is not None  # noqa: E731
    width = latent_channels or None
    return Pack(
        layout=layout,
        input_ids=_cat(ids, torch.int64),
        position_ids=_cat(positions, torch.int64),
        vit_images=torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
        vit_rows=_cat([start + np.arange(condition_tokens) for start in starts], torch.int64),
        text_rows=_cat([start + s.label_rows for start, s in zip(starts, samples)], torch.int64),
        text_targets=_cat([s.label_ids for s in samples], torch.int64),
        gen_rows=_cat(gen_rows, torch.int64),
        gen_codes=_cat([s.codes for _, s in gen], torch.int64) if family_has("codes") else None,
        gen_latents=(_cat([s.latents for _, s in gen], torch.float32, width)
                     if family_has("latents") else None),
        gen_eps=_cat([s.eps for _, s in gen], torch.float32, width) if family_has("eps") else None,
        gen_timestep=(_cat([s.timestep for _, s in gen], torch.from_numpy(gen[0][1].timestep).dtype)
                      if family_has("timestep") else None),
        scored=_cat(scored, torch.int64),
        scored_task=_cat(scored_task, torch.int64),
        task_tokens=task_tokens,
        sample_tasks=tuple(s.task for s in samples),
        num_real_tokens=total,
    )


class PackStream:
    """Endless packs of training samples whose tasks follow `cycle`, packed first-fit
    decreasing by unimrg_fast.packing.StreamingPacker; samples that do not fit this time
    wait for the next pack, none is lost."""

    def __init__(self, factory: SampleFactory, cycle: Sequence[str], pack_tokens: int,
                 packs: int, pad_id: int, source: Optional[Callable[[str], Sample]] = None):
        self.factory, self.cycle = factory, tuple(cycle)
        self.pack_tokens, self.packs, self.pad_id = pack_tokens, packs, pad_id
        self.packer = StreamingPacker(pack_tokens, max_packs=packs)
        self.pending: Dict[int, Sample] = {}
        self.counts = {task: 0 for task in self.cycle}
        self.next_id = 0
        # source(task) -> the next sample of that task (real data); None: synthetic scenes
        self.source = source

    def _add_one(self) -> None:
        task = self.cycle[self.next_id % len(self.cycle)]
        sample = (self.source(task) if self.source is not None
                  else self.factory.train_sample(task, self.counts[task]))
        self.counts[TASKS[sample.task]] = self.counts.get(TASKS[sample.task], 0) + 1
        refuse_longer_than_a_pack(f"{TASKS[sample.task]} sample", sample.length, self.pack_tokens)
        self.packer.add([self.next_id], [sample.length])
        self.pending[self.next_id] = sample
        self.next_id += 1

    def state_dict(self) -> Dict[str, object]:
        """What the next packs depend on besides the config: the samples waiting for a pack
        (host arrays, a step's worth at most), the packer's buffer and the sample counters."""
        return {"pending": dict(self.pending), "counts": dict(self.counts),
                "next_id": self.next_id, "packer": self.packer.state_dict()}

    def load_state_dict(self, state: Dict[str, object]) -> None:
        self.pending, self.counts = dict(state["pending"]), dict(state["counts"])
        self.next_id = state["next_id"]
        self.packer.load_state_dict(state["packer"])

    def next_packs(self) -> List[Pack]:
        # Buffer enough that every pack can be filled, then pack the buffer.
        longest = max((s.length for s in self.pending.values()), default=0)
        while sum(s.length for s in self.pending.values()) < self.packs * self.pack_tokens + longest:
            self._add_one()
            longest = max(longest, self.pending[self.next_id - 1].length)
        groups = self.packer.pop_packs()
        f = self.factory
        channels = f.config.model.latent_channels if f.family != "ar" else 0
        return [build_pack([self.pending.pop(i) for i in group], self.pack_tokens, self.pad_id,
                           f.cond_tokens, channels) for group in groups]


class TrainData:
    """Micro-batches of each optimizer step: interleaved packs, or round-robin single-task
    packs (und -> depth -> pixel -> seg, the tasks of the recipe only)."""

    def __init__(self, config: Config, factory: SampleFactory, pad_id: int, replicas: int = 1):
        """replicas: each step packs `replicas` times the step's packs from the same
        streams (a torchrun run's ranks each take their share: distributed.ShardedData)."""
        d = config.data
        # Real data (--data): samples come from worker processes reading the records;
        # skipped records are counted by reason in self.skipped.
        self.real = None
        if d.data is not None:
            from trainer.realdata import RealSource

            self.real = RealSource(config, factory)
        source = self.real.next_sample if self.real is not None else None
        if d.schedule == "interleaved":
            self.streams = [PackStream(factory, d.task_cycle, d.pack_tokens,
                                       d.packs_per_step * replicas, pad_id, source)]
        else:
            order = [t for t in ROUND_ROBIN_ORDER if t in d.active_tasks]
            self.streams = [PackStream(factory, (t,), d.pack_tokens, replicas, pad_id, source)
                            for t in order]

    @property
    def skipped(self) -> Dict[str, int]:
        """Records / samples of the real data set skipped so far, by reason."""
        return dict(self.real.skipped) if self.real is not None else {}

    def close(self) -> None:
        """Stops the real data's worker processes (nothing to do for synthetic data)."""
        if self.real is not None:
            self.real.close()

    def step(self) -> List[Pack]:
        return [pack for packs in self.step_by_stream() for pack in packs]

    def step_by_stream(self) -> List[List[Pack]]:
        """The step's packs, one list per stream (one per task when round-robin)."""
        return [stream.next_packs() for stream in self.streams]

    def state_dict(self) -> Dict[str, object]:
        """The data position as state (a checkpoint's per-rank data file): the streams'
        buffers and counters, and for real data where each reader stands. Loading it
        continues the identical packs without regenerating the samples before it."""
        return {"streams": [s.state_dict() for s in self.streams],
                "real": self.real.state_dict() if self.real is not None else None}

    def load_state_dict(self, state: Optional[Dict[str, object]]) -> bool:
        """Restores state_dict(); False (nothing changed) when there is none or it cannot
        be continued exactly (real data whose readers fell out of step), in which case the
        caller replays step() from the start instead."""
        if state is None:
            return False
        if self.real is not None and state["real"] is not None:   # before a replay, too
            self.real.check_same_records(state["real"])
        if len(state["streams"]) != len(self.streams):
            return False
        if (state["real"] is None) != (self.real is None):
            return False
        if self.real is not None and not self.real.load_state_dict(state["real"]):
            return False
        for stream, saved in zip(self.streams, state["streams"]):
            stream.load_state_dict(saved)
        return True

    def __iter__(self) -> Iterator[List[Pack]]:
        while True:
            yield self.step()


# --------------------------------------------------------------------------- held out
def eval_questions(factory: SampleFactory, count: int) -> List[Sample]:
    """Held-out und samples without their answers (prompts for greedy decoding)."""
    seed = factory.config.data.seed
    out = []
    for i in range(count):
        scene = scenes.make_scene(eval_scene_seed(seed, i), factory.image_size)
        # The question's seed is drawn as make() draws a training one: the scene's own seed
        # would replay make_scene's stream (its first draw picks the object count, the
        # question's first its kind), so "closer" went almost only to 2-object scenes and
        # "colour" to 4-object ones, a held-out mix unlike training's
        rng = np.random.default_rng((_SAMPLE_SALT, seed, TASK_ID["und"], EVAL_SEED_OFFSET + i))
        qa = scenes.make_questions(scene, int(rng.integers(2 ** 31)), k=1)[0]
        out.append(factory.und(scene, [qa], with_answer=False))
    return out


def refuse_longer_than_a_pack(what: str, length: int, pack_tokens: int) -> None:
    """A ConfigError naming --pack-tokens for a sample that cannot fit one pack: a packer
    would reject it, and a training step or an evaluation would go on without it."""
    if length > pack_tokens:
        raise ConfigError("--pack-tokens", f"a {what} holds {length} tokens, more than "
                                           f"{pack_tokens}; use --pack-tokens >= {length}")


def eval_packs(factory: SampleFactory, tasks: Sequence[str], num_scenes: int,
               pack_tokens: int, pad_id: int) -> List[Pack]:
    """Held-out samples of every task for per-task losses: one per task and scene, with
    fixed masks and noise, packed first-fit decreasing into as many packs as needed."""
    seed = factory.config.data.seed
    samples = []
    for i in range(num_scenes):
        for task in tasks:
            rng = np.random.default_rng((_SAMPLE_SALT, seed, TASK_ID[task], EVAL_SEED_OFFSET + i))
            samples.append(factory.make(task, eval_scene_seed(seed, i), rng))
    return pack_all(factory, samples, pack_tokens, pad_id, "held-out")


def pack_all(factory: SampleFactory, samples: Sequence[Sample], pack_tokens: int, pad_id: int,
             kind: str) -> List[Pack]:
    """Every sample in a pack (first-fit decreasing, as many packs as needed); a sample
    longer than a pack is a ConfigError naming --pack-tokens, never left out."""
    for sample in samples:
        refuse_longer_than_a_pack(f"{kind} {TASKS[sample.task]} sample", sample.length,
                                  pack_tokens)
    packer = StreamingPacker(pack_tokens)
    packer.add(range(len(samples)), [s.length for s in samples])
    channels = factory.config.model.latent_channels if factory.family != "ar" else 0
    return [build_pack([samples[i] for i in group], pack_tokens, pad_id, factory.cond_tokens,
                       channels) for group in packer.pop_packs()]
