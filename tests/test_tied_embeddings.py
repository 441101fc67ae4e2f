"""--tie-word-embeddings (trainer/config.py, trainer/model.py): the LM head IS the input
embedding Parameter, as in Qwen2.5-0.5B / 1.5B. Presets and the flag; one Parameter counted
once (optimizer, estimate); its gradient is the sum of both uses; a step without answers
keeps it (trainer/distributed.py drop_unused_grads); a tied run resumes bit-exact and a
resume that changes the tying is refused; --llm follows the checkpoint's own tying unless
the flag says otherwise (untying clones, tying a different head is refused). The 2-process
DDP / FSDP2 runs with tying are in tests/test_distributed.py."""

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer import distributed, estimate
from trainer.__main__ import build_parser, main, parse_config
from trainer.config import ConfigError, build_config
from trainer.data import SampleFactory, TrainData
from trainer.loop import build_optimizer, train
from trainer.model import build_model
from trainer.telemetry import FlopModel
from trainer_helpers import small_config, train_rows


def _model(tmp_path, tie: bool, **overrides):
    config = small_config(tmp_path, tie_word_embeddings=tie, **overrides)
    model, text, images, cond = build_model(config)
    return config, model, text, SampleFactory(config, text, images, cond)


def _first_pack(config, factory, text, answers: bool = False):
    """The stream's first pack (with answers scored, when asked)."""
    data = TrainData(config, factory, text.pad_id)
    for _ in range(20):
        pack = data.step()[0]
        if not answers or pack.text_rows.numel() > 0:
            return pack
    raise AssertionError("no pack with answers in 20 steps")


# --------------------------------------------------------------------------- config
def test_qwen_presets_tie_and_tiny_does_not():
    assert build_config("tiny").model.tie_word_embeddings is False
    for preset in ("qwen2.5-0.5b", "qwen2.5-1.5b"):
        assert build_config(preset).model.tie_word_embeddings is True, preset
        assert build_config(preset, {"tie_word_embeddings": False}).model.tie_word_embeddings is False
    parser = build_parser()
    assert parse_config(["--tie-word-embeddings"], parser).model.tie_word_embeddings is True
    config = parse_config(["--preset", "qwen2.5-1.5b", "--no-tie-word-embeddings"], parser)
    assert config.model.tie_word_embeddings is False
    with pytest.raises(ConfigError, match="--tie-word-embeddings"):
        build_config("tiny", {"tie_word_embeddings": "yes please"})


# ---------------------------------------------------------------------------- model
def test_tied_head_is_the_embedding_parameter_counted_once(tmp_path):
    _, untied, *_ = _model(tmp_path, False)
    config, tied, *_ = _model(tmp_path, True)
    assert not untied.tied and untied.lm_head.weight is not untied.llm.embed_tokens.weight
    assert tied.tied and tied.lm_head.weight is tied.llm.embed_tokens.weight
    assert tied.lm_head.bias is None
    vocab, hidden = tied.llm.embed_tokens.weight.shape
    count = lambda m: sum(p.numel() for p in m.parameters())   # noqa: E731
    assert count(untied) - count(tied) == vocab * hidden
    names = [n for n, _ in tied.named_parameters()]
    assert "llm.embed_tokens.weight" in names and "lm_head.weight" not in names
    # both keys stay in the state dict (checkpoint.pt, DCP), holding the same storage
    state = tied.state_dict()
    assert state["lm_head.weight"].data_ptr() == state["llm.embed_tokens.weight"].data_ptr()
    # one entry in the optimizer, in the no-decay group of the embeddings
    optimizer, _ = build_optimizer(tied, config, torch.device("cpu"))
    groups = [[id(p) for p in g["params"]] for g in optimizer.param_groups]
    shared = id(tied.lm_head.weight)
    assert sum(g.count(shared) for g in groups) == 1 and shared in groups[1]
    # the LM head's FLOPs per answer row do not depend on the tying
    assert FlopModel.from_model(tied).lm_head == 6.0 * vocab * hidden


def test_a_tied_head_with_a_bias_is_refused():
    from unimrg_fast.heads import LMHead

    from trainer.model import tie_lm_head

    with pytest.raises(ConfigError, match="--tie-word-embeddings.*bias"):
        tie_lm_head(LMHead(8, 10, bias=True), torch.nn.Embedding(10, 8))
    with pytest.raises(ConfigError, match="--tie-word-embeddings"):
        tie_lm_head(LMHead(8, 11), torch.nn.Embedding(10, 8))


def test_shared_gradient_is_the_sum_of_the_embedding_and_head_gradients(tmp_path):
    """The tied model against an untied copy with the same values: their forwards are the
    same computation, and the shared Parameter's gradient is the sum of the untied
    embedding's and head's gradients. The library's ops take fp32 / fp16 / bf16 only, so
    the parts are fp32, summed in float64: the tied accumulation is one fp32 rounding of
    that sum."""
    config, tied, text, factory = _model(tmp_path, True)
    _, untied, *_ = _model(tmp_path, False)
    untied.load_state_dict(tied.state_dict())            # both keys: the head = embeddings
    pack = _first_pack(config, factory, text, answers=True)
    losses = []
    for model in (tied, untied):
        out = model.loss(pack, "reference")
        out.total.backward()
        losses.append(out.total.detach())
    assert torch.equal(losses[0], losses[1])
    embed = untied.llm.embed_tokens.weight.grad.double()
    head = untied.lm_head.weight.grad.double()
    assert embed.abs().sum() > 0 and head.abs().sum() > 0
    shared = tied.llm.embed_tokens.weight.grad.double()
    torch.testing.assert_close(shared, embed + head, rtol=1e-6, atol=1e-9)
    for part in (embed, head):   # neither use alone
        assert (shared - part).abs().max() > 1e-3 * part.abs().max()
    # every other gradient is the untied model's
    grads = dict(untied.named_parameters())
    for name, p in tied.named_parameters():
        if name != "llm.embed_tokens.weight" and p.grad is not None:
            torch.testing.assert_close(p.grad, grads[name].grad, rtol=1e-6, atol=1e-9, msg=name)


def _backward_as_under_torchrun(umm, pack, counts):
    """The loop's backward of one pack through the module a multi-process run wraps: 0 *
    one element of every parameter outside the decoder layers joins the objective."""
    from trainer.loop import step_objective

    out = distributed._LossModule(umm, touch=True)(pack, "reference")
    step_objective(out, counts, umm.task_weights, world=1).backward()


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_a_step_without_answers_keeps_the_tied_embedding_gradient(tmp_path, tie):
    """A generation-only step under torchrun: every parameter got a (touch) gradient;
    drop_unused_grads drops the LM head's, except when it is the embeddings every task
    reads."""
    config, umm, text, factory = _model(tmp_path, tie, tasks="depth")
    pack = _first_pack(config, factory, text)
    counts = distributed.weight_sums([pack])
    assert counts[0] == 0 and counts.sum() > 0
    _backward_as_under_torchrun(umm, pack, counts)
    embed = umm.llm.embed_tokens.weight
    before = embed.grad.clone()
    assert before.abs().sum() > 0 and umm.lm_head.weight.grad is not None
    distributed.drop_unused_grads(umm, counts)
    assert embed.grad is not None and torch.equal(embed.grad, before)
    if tie:
        assert umm.lm_head.weight.grad is embed.grad
    else:
        assert umm.lm_head.weight.grad is None
    assert all(p.grad is not None for p in umm.gen.parameters())


def test_an_answers_only_step_drops_the_generation_side_not_the_shared_weight(tmp_path):
    config, umm, text, factory = _model(tmp_path, True, tasks="und")
    pack = _first_pack(config, factory, text)
    counts = distributed.weight_sums([pack])
    _backward_as_under_torchrun(umm, pack, counts)
    distributed.drop_unused_grads(umm, counts)
    assert all(p.grad is None for p in umm.gen.parameters())
    assert umm.lm_head.weight.grad is not None and umm.lm_head.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------------- checkpoints
def test_a_tied_run_resumes_bit_exact_and_stays_tied(tmp_path, monkeypatch):
    from test_checkpoint import Killed, _kill_after_save, _losses

    common = dict(family="mar", steps=4, checkpoint_every=2, tie_word_embeddings=True,
                  eval_questions=0, eval_scenes=0)
    straight = train_rows(train(small_config(tmp_path / "a", **common)))
    _kill_after_save(monkeypatch, 2)
    with pytest.raises(Killed) as info:
        train(small_config(tmp_path / "b", **common))
    monkeypatch.undo()
    saved = info.value.args[0]
    run_dir = train(small_config(tmp_path / "b", resume=str(saved), **common))
    assert _losses(train_rows(run_dir)) == _losses(straight)
    weights = torch.load(run_dir / "checkpoint.pt", map_location="cpu")["model"]
    assert torch.equal(weights["lm_head.weight"], weights["llm.embed_tokens.weight"])
    # loading the DCP checkpoint keeps the two one Parameter, with the saved values
    config = small_config(tmp_path / "c", **common)
    model, *_ = build_model(config)
    init = model.lm_head.weight.detach().clone()
    optimizer, schedule = build_optimizer(model, config, torch.device("cpu"))
    ckpt.load(saved, model=model, optimizer=optimizer, scheduler=schedule)
    assert model.tied and model.lm_head.weight is model.llm.embed_tokens.weight
    assert not torch.equal(model.lm_head.weight, init)
    shared = model.lm_head.weight
    assert list(optimizer.state[shared]) and sum(
        p is shared for g in optimizer.param_groups for p in g["params"]) == 1


def test_a_resume_that_changes_the_tying_is_refused_naming_the_field(tmp_path):
    run_dir = train(small_config(tmp_path, steps=2, checkpoint_every=2,
                                 tie_word_embeddings=True, eval_questions=0, eval_scenes=0))
    path = str(ckpt.latest(run_dir))
    with pytest.raises(ConfigError) as info:
        train(small_config(tmp_path, steps=4, tie_word_embeddings=False, eval_questions=0,
                           eval_scenes=0, resume=path))
    message = str(info.value)
    assert message.startswith("--resume")
    assert "model.tie_word_embeddings (checkpoint True, now False)" in message, message


def test_a_checkpoint_from_before_the_field_compares_as_untied(tmp_path):
    saved = small_config(tmp_path).to_dict()
    del saved["model"]["tie_word_embeddings"]
    assert ckpt.config_differences(saved, small_config(tmp_path)) == []
    diffs = ckpt.config_differences(saved, small_config(tmp_path, tie_word_embeddings=True))
    assert diffs == ["model.tie_word_embeddings (checkpoint False, now True)"]


# ---------------------------------------------------------------- --llm checkpoints
def _local_qwen(path, tie: bool, head_is_embeddings: bool = False):
    """A tiny Qwen2 causal LM + word-level tokenizer saved with save_pretrained."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from trainer.tokenizers import WordTokenizer

    words = WordTokenizer().id_to_word
    vocab = {"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words[4:])}}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="<|endoftext|>",
                            pad_token="<|endoftext|>", unk_token="<unk>").save_pretrained(path)
    torch.manual_seed(7)
    qwen = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(vocab), hidden_size=32,
                                        intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1,
                                        head_dim=16, tie_word_embeddings=tie))
    assert (qwen.lm_head.weight is qwen.model.embed_tokens.weight) == tie
    if head_is_embeddings:
        with torch.no_grad():
            qwen.lm_head.weight.copy_(qwen.model.embed_tokens.weight)
    qwen.save_pretrained(path)
    return qwen


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    models = {}
    for name, tie, same in (("tied", True, False), ("untied", False, False),
                            ("untied-same", False, True)):
        models[name] = (root / name, _local_qwen(root / name, tie, same))
    return models


@pytest.mark.parametrize("name, flag, tied", [
    ("tied", None, True), ("tied", False, False), ("untied", None, False),
    ("untied-same", True, True)])
def test_llm_checkpoint_tying_follows_the_checkpoint_unless_the_flag_is_given(tmp_path, local,
                                                                            name, flag, tied):
    path, qwen = local[name]
    extra = {} if flag is None else {"tie_word_embeddings": flag}
    config = small_config(tmp_path, llm=str(path), **extra)
    assert config.model.tie_word_embeddings is tied
    model, *_ = build_model(config)
    assert model.tied is tied
    assert torch.equal(model.llm.embed_tokens.weight, qwen.model.embed_tokens.weight)
    assert torch.equal(model.lm_head.weight, qwen.lm_head.weight)   # untying clones
    assert model.llm.config.tie_word_embeddings is tied


def test_llm_checkpoint_tying_beats_the_preset_but_not_the_flag(local):
    path = str(local["untied"][0])
    assert build_config("qwen2.5-0.5b", {"llm": path}).model.tie_word_embeddings is False
    tied = str(local["tied"][0])
    assert build_config("tiny", {"llm": tied}).model.tie_word_embeddings is True
    assert build_config("tiny", {"llm": tied, "tie_word_embeddings": False}
                        ).model.tie_word_embeddings is False


def test_tying_an_untied_checkpoint_with_its_own_head_is_refused(tmp_path, local, capsys):
    path = str(local["untied"][0])
    with pytest.raises(ConfigError, match="--tie-word-embeddings.*untied LM head that differs"):
        build_model(small_config(tmp_path, llm=path, tie_word_embeddings=True))
    with pytest.raises(SystemExit) as info:   # the command line: exit 2 before any run dir
        main(["--llm", path, "--tie-word-embeddings", "--out", str(tmp_path / "runs"),
              "--eval-questions", "0", "--steps", "1", "--no-progress"])
    assert info.value.code == 2
    assert "--tie-word-embeddings" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_tied_local_checkpoint_trains_tied(tmp_path, local):
    path, qwen = local["tied"]
    run_dir = train(small_config(tmp_path, llm=str(path), steps=2, eval_questions=0,
                                 eval_scenes=0))
    weights = torch.load(run_dir / "checkpoint.pt", map_location="cpu")["model"]
    assert torch.equal(weights["lm_head.weight"], weights["llm.embed_tokens.weight"])
    assert not torch.equal(weights["lm_head.weight"], qwen.lm_head.weight)   # it trained


# ------------------------------------------------------------------------- estimate
def test_the_estimate_counts_the_shared_matrix_once(monkeypatch):
    import trainer.config as config_module

    real = config_module.build_config
    recipe = estimate.ESTIMATE_RECIPES["unimrg-harmon-1.5b"]
    results = {}
    for tie in (False, True):
        monkeypatch.setattr(config_module, "build_config", lambda preset, overrides, tie=tie:
                            real(preset, {**overrides, "tie_word_embeddings": tie}))
        results[tie] = estimate.estimate("tiny", recipe, 4, None, ["plain"], 0, 1, False)
    model, *_ = build_model(build_config("tiny"))
    vocab, hidden = model.lm_head.weight.shape
    assert results[False]["trainable"] - results[True]["trainable"] == vocab * hidden
    assert results[False]["params"] - results[True]["params"] == vocab * hidden
    assert results[True]["tied"] and not results[False]["tied"]
    text = estimate.report("unimrg-harmon-1.5b", recipe, "tiny", 4, 10, 8, results[True])
    assert "LM head tied to the input embeddings" in text
    assert "LM head tied" not in estimate.report("unimrg-harmon-1.5b", recipe, "tiny", 4, 10,
                                                 8, results[False])
    assert "step_s" in results[True]["paths"]["plain"]
