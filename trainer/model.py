"""The unified multimodal model (UMM) and its three generation sides.

    condition image ─ frozen ViT ─ projector ─┐
    text ids ─────── embed_tokens ────────────┼─> one pack [T, H] ─ Qwen2 decoder ─> hidden [T, H]
    target image ─── family's input side ─────┘   (packed attention, PackedLayout)
                                                                     │
        LM head (answers) ─ image-token head (ar) ─ regression head (mar, flow) ─> ONE joint_loss

The decoder is a Hugging Face Qwen2Model whose attention is unimrg_fast.packed_attention:
the function below is registered with transformers' AttentionInterface under
ATTENTION_NAME, and the pack's PackedLayout travels through the forward's kwargs to every
layer. transformers builds no mask for an attention implementation it has no mask
function for, so no [T, T] mask is ever made.
"""
from __future__ import annotations

import math
import pickle
from typing import List, Optional, Tuple

import torch
from torch import nn

import unimrg_fast as uf
from unimrg_fast.heads import ImageTokenHead, LMHead, RegressionHead
from unimrg_fast.targets import ddpm_eps_target, flow_matching_target

from trainer.config import TASKS, Config, ConfigError
from trainer.data import UND, Pack
from trainer.telemetry import matmul_weights

ATTENTION_NAME = "unimrg_packed"


# ----------------------------------------------------------------------- attention
def packed_attention_forward(module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                             value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                             scaling: Optional[float] = None, dropout: float = 0.0, *,
                             packed_layout: Optional[uf.PackedLayout] = None,
                             attention_impl: str = "reference",
                             sliding_window: Optional[int] = None,
                             **_) -> Tuple[torch.Tensor, None]:
    """HF attention signature over a pack: query [1, Hq, T, D], key / value [1, Hkv, T, D]
    -> ([1, T, Hq, D], None). What the pack's mask cannot express is refused, not
    dropped: attention dropout (HF passes 0 outside training) and a sliding window
    shorter than the pack."""
    if dropout:
        raise ValueError(f"attention dropout {dropout} is not supported by the packed "
                         f"attention; set the model config's attention_dropout to 0")
    if sliding_window is not None and sliding_window < query.shape[2]:
        raise ValueError(f"a sliding window of {sliding_window} tokens (shorter than the "
                         f"{query.shape[2]}-token pack) is not supported by the packed "
                         f"attention; set the model config's use_sliding_window to false")
    if packed_layout is None:
        raise ValueError(f"attn_implementation={ATTENTION_NAME!r} needs the pack's layout: "
                         f"call the model with packed_layout=PackedLayout(...)")
    if query.shape[0] != 1:
        raise ValueError(f"a pack is one sequence (batch 1), got batch {query.shape[0]}")
    # RoPE leaves q and k in fp32 under autocast while v is bf16: attend in one dtype.
    device = query.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else query.dtype
    q, k, v = (x[0].transpose(0, 1).to(dtype) for x in (query, key, value))   # [T, H, D]
    out = uf.packed_attention(q, k, v, packed_layout, scale=scaling, impl=attention_impl)
    return out.unsqueeze(0), None


def register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, packed_attention_forward)


register_attention()


# ---------------------------------------------------------------- generation sides
class TimestepEmbedding(nn.Module):
    """Sinusoidal features of a (DDPM step or 1000 * flow time) scalar, then an MLP (DiT)."""

    def __init__(self, hidden: int, frequencies: int = 64):
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device) / half)
        angles = t.float()[:, None] * freqs[None]
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1))


class ARSide(nn.Module):
    """Show-o-like: discrete codes; masked tokens read a [MASK] embedding and the image-token
    head predicts their codes (cross-entropy over the codebook)."""

    def __init__(self, hidden: int, num_codes: int):
        super().__init__()
        self.mask_id = num_codes
        self.code_embed = nn.Embedding(num_codes + 1, hidden)
        nn.init.normal_(self.code_embed.weight, std=0.02)
        self.head = ImageTokenHead(hidden, num_codes)

    def matmul_weights(self) -> Tuple[int, int]:
        """(weights every target token passes through, weights every scored one does): the
        model FLOPs telemetry counts. Code embeddings are a lookup."""
        return 0, matmul_weights(self.head)

    def inputs(self, pack: Pack):
        codes = pack.gen_codes.index_fill(0, pack.scored, self.mask_id)
        return self.code_embed(codes), None

    def specs(self, hidden: torch.Tensor, pack: Pack, state):
        rows = pack.gen_rows.index_select(0, pack.scored)
        target = pack.gen_codes.index_select(0, pack.scored)
        return hidden, [self.head.spec(rows, target, pack.scored_task)]


class AdaLNBlock(nn.Module):
    """MAR's residual block: LayerNorm modulated by the condition, MLP, gated residual."""

    def __init__(self, hidden: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 3 * hidden))
        nn.init.zeros_(self.modulation[1].weight)
        nn.init.zeros_(self.modulation[1].bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.modulation(cond).chunk(3, dim=-1)
        return x + gate * self.mlp(self.norm(x) * (1 + scale) + shift)


class DiffusionMLP(nn.Module):
    """MAR / Harmon's per-token diffusion head up to its last layer: (z, x_t, t) -> [R, H]
    features; a RegressionHead turns them into the predicted eps."""

    def __init__(self, hidden: int, channels: int, layers: int):
        super().__init__()
        self.x_in = nn.Linear(channels, hidden)
        self.z_in = nn.Linear(hidden, hidden)
        self.t_embed = TimestepEmbedding(hidden)
        self.blocks = nn.ModuleList(AdaLNBlock(hidden) for _ in range(layers))
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, z: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = self.z_in(z) + self.t_embed(t)
        x = self.x_in(x_t)
        for block in self.blocks:
            x = block(x, cond)
        shift, scale = self.final_modulation(cond).chunk(2, dim=-1)
        return self.norm(x) * (1 + scale) + shift


class MARSide(nn.Module):
    """Harmon-like: clean latent tokens, a random subset replaced by a learned mask
    embedding (mode "full"); each masked token's hidden state z conditions the diffusion
    MLP, whose features the regression head turns into eps (DDPM, cosine, 1,000 steps)."""

    def __init__(self, hidden: int, channels: int, layers: int):
        super().__init__()
        self.latent_in = nn.Linear(channels, hidden)
        self.mask_embed = nn.Parameter(torch.randn(hidden) * 0.02)
        self.diffusion = DiffusionMLP(hidden, channels, layers)
        self.head = RegressionHead(hidden, channels)

    def matmul_weights(self) -> Tuple[int, int]:
        return matmul_weights(self.latent_in), matmul_weights(self.diffusion) + matmul_weights(self.head)

    def inputs(self, pack: Pack):
        x = self.latent_in(pack.gen_latents)
        masked = torch.zeros(x.shape[0], 1, dtype=torch.bool, device=x.device)
        masked = masked.index_fill(0, pack.scored, True)
        return torch.where(masked, self.mask_embed.to(x.dtype), x), None

    def specs(self, hidden: torch.Tensor, pack: Pack, state):
        take = lambda x: x.index_select(0, pack.scored)  # noqa: E731
        noisy, target, t = ddpm_eps_target(take(pack.gen_latents), eps=take(pack.gen_eps),
                                           timesteps=take(pack.gen_timestep))
        z = hidden.index_select(0, take(pack.gen_rows))
        features = self.diffusion(z, noisy, t)
        # One [T + R, H] tensor, so the single joint_loss call scores the LM head on the
        # first T rows and the regression head on the R diffusion-feature rows.
        joint = torch.cat([hidden, features.to(hidden.dtype)])
        rows = torch.arange(hidden.shape[0], joint.shape[0], device=hidden.device)
        return joint, [self.head.spec(rows, target, pack.scored_task)]


class FlowSide(nn.Module):
    """OpenUni / BAGEL-like: x_s = (1 - s) x0 + s eps in a "noise" span (plus a timestep
    embedding); a linear head predicts the velocity eps - x0 at every target token."""

    def __init__(self, hidden: int, channels: int):
        super().__init__()
        self.latent_in = nn.Linear(channels, hidden)
        self.t_embed = TimestepEmbedding(hidden)
        self.head = RegressionHead(hidden, channels)

    def matmul_weights(self) -> Tuple[int, int]:
        return matmul_weights(self.latent_in) + matmul_weights(self.t_embed), matmul_weights(self.head)

    def inputs(self, pack: Pack):
        noisy, target, s = flow_matching_target(pack.gen_latents, eps=pack.gen_eps,
                                                timesteps=pack.gen_timestep)
        return self.latent_in(noisy) + self.t_embed(s * 1000.0), target

    def specs(self, hidden: torch.Tensor, pack: Pack, target):
        rows = pack.gen_rows.index_select(0, pack.scored)
        return hidden, [self.head.spec(rows, target.index_select(0, pack.scored), pack.scored_task)]


# ------------------------------------------------------------------------------ UMM
class UMM(nn.Module):
    """Decoder + frozen ViT + projector + LM head + one generation side. With
    --tie-word-embeddings the LM head's weight is the decoder's input embedding Parameter
    (Qwen2.5's tie_word_embeddings): both keys stay in state_dict(), named_parameters()
    and parameters() yield it once (as llm.embed_tokens.weight)."""

    def __init__(self, llm: nn.Module, vit: nn.Module, vocab_size: int, family: str,
                 config: Config, image_size: int):
        super().__init__()
        m = config.model
        hidden = llm.config.hidden_size
        self.llm, self.vit = llm, vit
        self.image_size = image_size          # what the ViT expects
        vit_hidden = vit.config.hidden_size
        self.projector = nn.Sequential(nn.Linear(vit_hidden, hidden), nn.GELU(),
                                       nn.Linear(hidden, hidden))
        # The heads only hold weights here: every loss goes through the one joint_loss call
        # of UMM.loss, whose impl the run chooses.
        if m.tie_word_embeddings:   # no vocab x hidden matrix of its own: meta, then shared
            self.lm_head = tie_lm_head(LMHead(hidden, vocab_size, device="meta"),
                                       llm.get_input_embeddings())
        else:
            self.lm_head = LMHead(hidden, vocab_size)
        if family == "ar":
            self.gen = ARSide(hidden, m.num_codes)
        elif family == "mar":
            self.gen = MARSide(hidden, m.latent_channels, m.diffusion_layers)
        else:
            self.gen = FlowSide(hidden, m.latent_channels)
        self.register_buffer("task_weights", torch.ones(len(TASKS)), persistent=False)
        # The decoder's RMSNorm / SwiGLU / rotary follow the run's impl (uf.hf), unless
        # decoder_impl names another ("reference": --no-fused-decoder and --estimate's
        # "fast-hf-decoder" path keep the model's own).
        self.decoder_impl: Optional[str] = None if config.run.fused_decoder else "reference"
        self._decoder_applied = "reference"
        uf.hf.fuse_decoder_ops(self.llm, impl="reference")
        self.vit.requires_grad_(False)
        self.vit.eval()

    @property
    def tied(self) -> bool:
        """The LM head's weight is the input embeddings' Parameter (--tie-word-embeddings)."""
        return self.lm_head.weight is self.llm.get_input_embeddings().weight

    def train(self, mode: bool = True):
        super().train(mode)
        self.vit.eval()  # frozen: never dropout / batch statistics
        return self

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-1] != self.image_size:
            images = nn.functional.interpolate(images, size=(self.image_size, self.image_size),
                                               mode="bilinear", align_corners=False)
        return self.vit(pixel_values=images).last_hidden_state   # [N, Lv, Hv]

    def use_decoder_impl(self, impl: str) -> None:
        """The impl of the decoder's fused elementwise ops (set on its modules, so that a
        checkpointed layer's recomputation runs what its forward ran)."""
        impl = self.decoder_impl or impl
        if impl != self._decoder_applied:
            uf.hf.set_decoder_impl(self.llm, impl)
            self._decoder_applied = impl

    def hidden_states(self, pack: Pack, impl: str, gen_embeds: Optional[torch.Tensor] = None):
        self.use_decoder_impl(impl)
        embeds = self.llm.get_input_embeddings()(pack.input_ids)                 # [T, H]
        cond = self.projector(self.encode_images(pack.vit_images)).flatten(0, 1)
        embeds = embeds.index_copy(0, pack.vit_rows, cond.to(embeds.dtype))
        if gen_embeds is not None:
            embeds = embeds.index_copy(0, pack.gen_rows, gen_embeds.to(embeds.dtype))
        out = self.llm(inputs_embeds=embeds[None], position_ids=pack.position_ids[None],
                       packed_layout=pack.layout, attention_impl=impl, use_cache=False)
        return out.last_hidden_state[0]

    def loss(self, pack: Pack, impl: str) -> uf.JointLossOutput:
        """The pack's joint loss: every head, one joint_loss call, per-task sums on device."""
        has_gen = pack.gen_rows.shape[0] > 0   # host-known shapes: no sync
        gen_embeds, state = self.gen.inputs(pack) if has_gen else (None, None)
        hidden = self.hidden_states(pack, impl, gen_embeds)
        specs: List = []
        if pack.text_rows.shape[0] > 0:
            specs.append(self.lm_head.spec(pack.text_rows, pack.text_targets, UND))
        if has_gen:
            hidden, gen_specs = self.gen.specs(hidden, pack, state)
            specs += gen_specs
        return uf.joint_loss(hidden, specs, num_tasks=len(TASKS),
                             task_weights=self.task_weights, impl=impl)


def tie_lm_head(head: LMHead, embedding: nn.Embedding) -> LMHead:
    """`head` with the embedding's Parameter as its weight (Qwen2.5's tie_word_embeddings):
    one matrix, so Module.parameters() (the optimizer, clipping, counts) yields it once and
    autograd sums the gradients of its two uses. A bias has no embedding counterpart."""
    if head.bias is not None:
        raise ConfigError("--tie-word-embeddings", "a tied LM head cannot have a bias (the "
                                                   "input embeddings have none)")
    if tuple(head.weight.shape) != tuple(embedding.weight.shape):
        raise ConfigError("--tie-word-embeddings", f"the LM head is {tuple(head.weight.shape)} "
                                                   f"but the input embeddings are "
                                                   f"{tuple(embedding.weight.shape)}")
    head.weight = embedding.weight
    return head


# ---------------------------------------------------------------------------- build
class HFTextTokenizer:
    """A local checkpoint's tokenizer behind WordTokenizer's interface."""

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            raise ConfigError("--llm", f"cannot load a tokenizer from {path!r} (a local "
                                       f"checkpoint saved with save_pretrained, tokenizer "
                                       f"included): {type(exc).__name__}: {exc}") from None
        self.vocab_size = len(self.tok)
        self.eos_id = self.tok.eos_token_id
        if self.eos_id is None:
            raise ConfigError("--llm", f"the tokenizer in {path!r} has no eos token")
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.eos_id
        self.bos_id = self.tok.bos_token_id          # Qwen has none: samples start with text
        self.img_id = self.pad_id                    # image positions are overwritten anyway

    def encode(self, text: str) -> List[int]:
        # split_special_tokens: a record's text that spells a special token
        # ("<|endoftext|>", "<|im_end|>") stays text, never an EOS in mid-answer; the
        # packer places the real special tokens by id.
        return self.tok.encode(text, add_special_tokens=False, split_special_tokens=True)

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def _tiny_vit(m) -> nn.Module:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    cfg = SiglipVisionConfig(hidden_size=m.vit_hidden_size, intermediate_size=4 * m.vit_hidden_size,
                             num_hidden_layers=m.vit_layers, num_attention_heads=m.vit_heads,
                             image_size=m.image_size, patch_size=m.vit_patch,
                             vision_use_head=False)
    return SiglipVisionModel(cfg)


def _load_vit(path: str) -> nn.Module:
    from transformers import AutoConfig, SiglipVisionModel

    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
        if cfg.model_type == "siglip":           # a full SigLIP: keep the vision tower
            from transformers import SiglipModel

            return SiglipModel.from_pretrained(path, local_files_only=True).vision_model
        return SiglipVisionModel.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError("--vit", f"cannot load a SigLIP vision model from {path!r}: {exc}") from None


def _build_llm(config: Config, vocab_size: int):
    from transformers import Qwen2Config, Qwen2Model

    m = config.model
    cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=m.hidden_size,
                      intermediate_size=m.intermediate_size, num_hidden_layers=m.num_layers,
                      num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads,
                      head_dim=m.head_dim, max_position_embeddings=32_768,
                      rope_theta=m.rope_theta, tie_word_embeddings=m.tie_word_embeddings,
                      use_cache=False)
    cfg._attn_implementation = ATTENTION_NAME
    return Qwen2Model(cfg)


def _load_llm(path: str, tie: bool, pack_tokens: Optional[int] = None):
    """(the checkpoint's decoder, the LM head weight to start from: None when the run ties
    it to the decoder's input embeddings, else a copy of the checkpoint's output
    embeddings, which untying a tied checkpoint duplicates). pack_tokens: the longest
    sample the run can make (a sliding window at least that long never binds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        cfg = AutoConfig.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise ConfigError("--llm", f"cannot read a model config in {path!r}: {exc}") from None
    if cfg.model_type != "qwen2":
        raise ConfigError("--llm", f"{path!r} is a {cfg.model_type!r} model; allowed: qwen2")
    _check_attention_config(path, cfg, pack_tokens)
    try:
        causal = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                      attn_implementation=ATTENTION_NAME,
                                                      dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:   # no / broken weights
        raise ConfigError("--llm", f"cannot load the model weights in {path!r}: "
                                   f"{type(exc).__name__}: {exc}") from None
    llm, head = causal.model, causal.get_output_embeddings().weight.detach()
    if tie and not cfg.tie_word_embeddings:
        _check_tieable(path, head, llm.get_input_embeddings().weight.detach())
    llm.config.tie_word_embeddings = tie
    return llm, None if tie else head.clone()


def _check_attention_config(path: str, cfg, pack_tokens: Optional[int] = None) -> None:
    """Attention the packed attention cannot give, refused before training rather than
    at the first step: dropout on the attention weights, and sliding-window layers whose
    window is shorter than a sample may be (the pack's mask would silently attend past
    it). A window of at least pack_tokens never binds: a query attends to the keys less
    than `window` places back (transformers' rule), and no sample is longer than a pack."""
    if getattr(cfg, "attention_dropout", 0.0):
        raise ConfigError("--llm", f"{path!r} sets attention_dropout "
                                   f"{cfg.attention_dropout}; the packed attention has no "
                                   f"dropout: set it to 0 in its config.json")
    kinds = getattr(cfg, "layer_types", None)   # transformers < 4.54: no layer_types
    sliding = ("sliding_attention" in kinds if kinds is not None
               else bool(getattr(cfg, "use_sliding_window", False)))
    window = getattr(cfg, "sliding_window", None)
    if sliding and window and (pack_tokens is None or window < pack_tokens):
        raise ConfigError("--llm", f"{path!r} uses a {window}-token sliding window "
                                   f"(use_sliding_window) shorter than a pack "
                                   f"(--pack-tokens {pack_tokens}); the packed attention has "
                                   f"none: set use_sliding_window to false in its config.json, "
                                   f"or pack at most {window} tokens")


def _check_tieable(path: str, head: torch.Tensor, embeddings: torch.Tensor) -> None:
    """Tying an untied checkpoint keeps its input embeddings as the head: refused when its
    own head differs (its trained weights would be dropped without a word)."""
    if head.shape != embeddings.shape or not torch.equal(head, embeddings):
        raise ConfigError("--tie-word-embeddings", f"the checkpoint {path!r} has an untied LM "
                                                   f"head that differs from its input "
                                                   f"embeddings; tying would discard the head. "
                                                   f"Drop the flag (or pass "
                                                   f"--no-tie-word-embeddings) to train it "
                                                   f"untied, as saved")


def build_model(config: Config):
    """(model, text tokenizer, image tokenizer, condition tokens per image), on the CPU.

    The image tokenizer is fitted / drawn deterministically from config.data.seed (ar: a
    k-means codebook on training scenes; mar / flow: fixed orthonormal patch latents).
    """
    from trainer.tokenizers import KMeansCodebook, PatchLatents, WordTokenizer

    m = config.model
    torch.manual_seed(config.data.seed)
    if m.llm is not None:
        text = HFTextTokenizer(m.llm)
        llm, lm_weight = _load_llm(m.llm, m.tie_word_embeddings, config.data.pack_tokens)
        vocab = llm.get_input_embeddings().weight.shape[0]
    else:
        text = WordTokenizer()
        vocab = max(m.vocab_size, text.vocab_size)
        llm, lm_weight = _build_llm(config, vocab), None
    vit = _tiny_vit(m) if m.vit == "tiny" else _load_vit(m.vit)
    vit_size, vit_patch = vit.config.image_size, vit.config.patch_size
    cond_tokens = (vit_size // vit_patch) ** 2
    if m.image_tokenizer is not None:
        images = load_image_tokenizer(config)
    elif m.family == "ar":
        images = KMeansCodebook(m.num_codes, m.image_size, m.patch, seed=config.data.seed,
                                num_scenes=32, iters=10)
    else:
        images = PatchLatents(m.image_size, m.patch, m.latent_channels, seed=config.data.seed)
    model = UMM(llm, vit, vocab, m.family, config, vit_size)
    if lm_weight is not None:
        with torch.no_grad():
            model.lm_head.weight.copy_(lm_weight)
    if m.gradient_checkpointing:
        # transformers 5 renamed it; older releases (>= 4.56 is allowed) have only the old name
        if hasattr(model.llm, "activation_checkpointing_enable"):
            model.llm.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.llm.gradient_checkpointing_enable({"use_reentrant": False})
    return model, text, images, cond_tokens


def load_image_tokenizer(config: Config):
    """The local image tokenizer of --image-tokenizer, checked against the model's shape
    settings so a mismatch fails before training, naming the flag to change."""
    from trainer.tokenizers import KMeansCodebook, VAELatents

    m = config.model
    try:
        if m.family == "ar":
            images = KMeansCodebook.from_state_dict(torch.load(m.image_tokenizer, map_location="cpu"))
        else:
            images = VAELatents(m.image_tokenizer, m.image_size)
    except (OSError, ValueError, RuntimeError, KeyError, EOFError, TypeError,
            pickle.UnpicklingError) as exc:   # empty, truncated or not a codebook at all
        raise ConfigError("--image-tokenizer", f"cannot load {m.image_tokenizer!r}: "
                                               f"{type(exc).__name__}: {exc}") from exc
    checks = (("--patch", m.patch, images.patch), ("--image-size", m.image_size, images.image_size))
    checks += ((("--num-codes", m.num_codes, images.num_codes),) if m.family == "ar" else
               (("--latent-channels", m.latent_channels, images.channels),))
    for flag, ours, theirs in checks:
        if ours != theirs:
            raise ConfigError(flag, f"must match the image tokenizer {m.image_tokenizer!r}, "
                                    f"which has {theirs}; got {ours}")
    return images
