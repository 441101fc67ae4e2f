"""Held-out evaluation, run before and after training on scenes no training sample uses.

- Understanding accuracy: each held-out question is answered by greedy decoding of as
  many tokens as the reference answer has (the question's kind fixes that length: one
  word, or "colour shape"; eos is never chosen), exact match.
- Per-task losses: the joint loss's per-task means over held-out samples of every active
  task, with fixed masks, noise and timesteps (so before and after are comparable).
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Dict, List

import numpy as np
import torch

from trainer.config import TASKS, Config
from trainer.data import (Pack, Sample, SampleFactory, build_pack, eval_packs, eval_questions,
                          refuse_longer_than_a_pack)
from unimrg_fast.packing import pack_first_fit_decreasing



@dataclasses.dataclass
class HeldOut:
    questions: List[Sample]
    answers: List[List[int]]   # each question's answer as token ids (greedy decoding's target)
    packs: List[Pack]


def held_out(config: Config, factory: SampleFactory, pad_id: int) -> HeldOut:
    d = config.data
    questions = eval_questions(factory, d.eval_questions) if "und" in d.active_tasks else []
    answers = [factory.text.encode(q.qa.answer) for q in questions]
    # greedy decoding packs each question with all but the last token of its answer
    for q, answer in zip(questions, answers):
        refuse_longer_than_a_pack("held-out question with its answer",
                                  q.length + max(0, len(answer) - 1), d.pack_tokens)
    packs = eval_packs(factory, d.active_tasks, d.eval_scenes, d.pack_tokens, pad_id)
    return HeldOut(questions, answers, packs)


def _extended(sample: Sample, extra: List[int]) -> Sample:
    """The prompt with the answer tokens decoded so far appended to its text span."""
    if not extra:
        return sample
    spans = sample.spans[:-1] + ((sample.spans[-1][0] + len(extra), sample.spans[-1][1]),)
    ids = np.concatenate([sample.input_ids, np.array(extra, dtype=np.int64)])
    return dataclasses.replace(sample, spans=spans, input_ids=ids)


@torch.no_grad()
def greedy_answers(model, questions: List[Sample], lengths: List[int], text, pack_tokens: int,
                   device, impl: str, cond_tokens: int) -> List[List[int]]:
    """Greedy continuations of each question, `lengths[i]` tokens each (eos excluded)."""
    answers: List[List[int]] = [[] for _ in questions]
    done = [n == 0 for n in lengths]
    for _ in range(max(lengths, default=0)):
        active = [i for i, d in enumerate(done) if not d]
        if not active:
            break
        samples = [_extended(questions[i], answers[i]) for i in active]
        assignment = pack_first_fit_decreasing([s.length for s in samples], pack_tokens)
        for p in range(int(assignment.max()) + 1):
            members = [j for j, a in enumerate(assignment) if a == p]
            group = [samples[j] for j in members]
            pack = build_pack(group, pack_tokens, text.pad_id, cond_tokens).to(device)
            last = np.cumsum([s.length for s in group]) - 1
            hidden = model.hidden_states(pack, impl)
            rows = torch.as_tensor(last, device=hidden.device)
            logits = model.lm_head(hidden.index_select(0, rows)).float()
            # An answer has at least one word, and its length is fixed by the question's
            # kind: eos is never the greedy choice (early in training it is the most
            # frequent label and would end every answer before it starts).
            logits[:, text.eos_id] = float("-inf")
            # A model may be wider than its tokenizer (--vocab-size, Qwen's 151,936 rows
            # over the synthetic words): ids past the tokenizer are no answer at all
            logits[:, text.vocab_size:] = float("-inf")
            for j, token in zip(members, logits.argmax(-1).tolist()):
                i = active[j]
                answers[i].append(token)
                done[i] = len(answers[i]) >= lengths[i]
    return answers


@torch.no_grad()
def evaluate(model, held: HeldOut, factory: SampleFactory, text, device, impl: str,
             autocast=contextlib.nullcontext) -> Dict[str, Any]:
    was_training = model.training
    model.eval()
    result: Dict[str, Any] = {}
    with autocast():
        if held.questions:
            refs = held.answers
            answers = greedy_answers(model, held.questions, [len(r) for r in refs], text,
                                     factory.config.data.pack_tokens, device, impl,
                                     factory.cond_tokens)
            right = [a == r for a, r in zip(answers, refs)]
            kinds: Dict[str, List[bool]] = {}
            for ok, q in zip(right, held.questions):
                kinds.setdefault(q.qa.kind, []).append(ok)
            result["und_accuracy"] = float(np.mean(right))
            result["und_questions"] = len(right)
            result["und_accuracy_by_kind"] = {k: float(np.mean(v)) for k, v in sorted(kinds.items())}
            result["und_examples"] = [
                {"question": q.qa.question, "answer": q.qa.answer, "model": text.decode(a)}
                for a, q in list(zip(answers, held.questions))[:4]]
        loss_sum = torch.zeros(len(TASKS), dtype=torch.float64)
        weight_sum = torch.zeros(len(TASKS), dtype=torch.float64)
        for pack in held.packs:
            out = model.loss(pack.to(device), impl)
            loss_sum += out.task_loss_sum.double().cpu()
            weight_sum += out.task_weight_sum.double().cpu()
    for t, task in enumerate(TASKS):
        if weight_sum[t] > 0:
            result[f"loss/{task}"] = float(loss_sum[t] / weight_sum[t])
    model.train(was_training)
    return result
