"""CSM: a Llama backbone over interleaved text/audio rows and a Llama depth decoder
over the codebooks of one frame.

Both stacks are mlx-lm's Llama blocks. The one RoPE convention used inside is
rotate-half (``traditional=False``); the original Sesame checkpoint rotates
interleaved pairs, so its q/k rows are permuted once in ``sanitize``.
"""

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import llama
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache

# torchtune's Llama-3.2 RoPE scaling, which both original flavors use.
LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 32.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 8192,
}


@dataclass
class TransformerArgs:
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: Optional[int] = None
    max_seq_len: int = 2048
    norm_eps: float = 1e-5
    rope_theta: float = 500_000.0
    rope_scaling: Optional[Dict[str, Any]] = field(
        default_factory=lambda: dict(LLAMA3_ROPE_SCALING)
    )

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_heads


# Label of a code that is not trained (transformers' ignore_index).
IGNORE = -100

# Sesame-style configs name their stacks by flavor (torchtune's Llama builders); tests register
# tiny ones. csm-1b: 1B + 100M; Marvis 250m: 250M + 60M (Marvis-Labs/marvis-tts); MisoTTS:
# 8B + 300M (MisoLabsAI/MisoTTS).
FLAVORS: Dict[str, TransformerArgs] = {
    "llama-1B": TransformerArgs(16, 2048, 32, 8, 8192),
    "llama-100M": TransformerArgs(4, 1024, 8, 2, 8192),
    "llama-250M": TransformerArgs(6, 1536, 12, 3, 8192, head_dim=128),
    "llama-60M": TransformerArgs(4, 1024, 8, 2, 4096, head_dim=128),
    "llama-8B": TransformerArgs(32, 4096, 32, 8, 14336),
    "llama-300M": TransformerArgs(8, 1536, 24, 6, 6912),
}


@dataclass
class ModelArgs:
    backbone: TransformerArgs
    decoder: TransformerArgs
    text_vocab_size: int = 128_256
    audio_vocab_size: int = 2051
    audio_num_codebooks: int = 32

    @classmethod
    def from_flavors(cls, backbone: str, decoder: str, **kw) -> "ModelArgs":
        return cls(FLAVORS[backbone], FLAVORS[decoder], **kw)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "ModelArgs":
        d = dict(d)
        return cls(
            backbone=TransformerArgs(**d.pop("backbone")),
            decoder=TransformerArgs(**d.pop("decoder")),
            **d,
        )

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)


class PositionTableRoPE(nn.Module):
    """RoPE for a fixed range of positions, from cos/sin tables that the given RoPE module
    computes once. The depth decoder only ever sees positions 0..31, and mx.fast.rope with
    explicit (Llama-3 scaled) frequencies recomputes them on every call."""

    def __init__(self, rope: nn.Module, dims: int, n_positions: int):
        super().__init__()
        half = dims // 2
        # Rotating [1, .., 1, 0, .., 0] by position p gives cos(p*theta) then sin(p*theta).
        probe = mx.concatenate([mx.ones((n_positions, half)), mx.zeros((n_positions, half))], axis=-1)
        rotated = rope(probe[None, None])[0, 0]
        cos, sin = rotated[:, :half], rotated[:, half:]
        self._cos = mx.concatenate([cos, cos], axis=-1)
        self._sin = mx.concatenate([-sin, sin], axis=-1)
        mx.eval(self._cos, self._sin)

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        n, half = x.shape[-2], x.shape[-1] // 2
        swapped = mx.concatenate([x[..., half:], x[..., :half]], axis=-1)
        cos = self._cos[offset : offset + n].astype(x.dtype)
        sin = self._sin[offset : offset + n].astype(x.dtype)
        return x * cos + swapped * sin


class Transformer(nn.Module):
    """A stack of Llama blocks and a final norm; no embedding, no head.

    With rope_positions, RoPE comes from tables for positions below it."""

    def __init__(self, args: TransformerArgs, rope_positions: Optional[int] = None):
        super().__init__()
        block_args = llama.ModelArgs(
            model_type="llama",
            hidden_size=args.hidden_size,
            num_hidden_layers=args.num_layers,
            intermediate_size=args.intermediate_size,
            num_attention_heads=args.num_heads,
            num_key_value_heads=args.num_kv_heads,
            head_dim=args.head_dim,
            rms_norm_eps=args.norm_eps,
            vocab_size=0,
            max_position_embeddings=args.max_seq_len,
            rope_theta=args.rope_theta,
            rope_scaling=args.rope_scaling,
        )
        self.layers = [llama.TransformerBlock(block_args) for _ in range(args.num_layers)]
        if rope_positions is not None:
            for layer in self.layers:
                layer.self_attn.rope = PositionTableRoPE(layer.self_attn.rope, args.head_dim, rope_positions)
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.norm_eps)

    def __call__(self, x: mx.array, cache: Optional[List[Any]] = None) -> mx.array:
        cache = cache or [None] * len(self.layers)
        mask = create_attention_mask(x, cache[0])
        for layer, c in zip(self.layers, cache):
            x = layer(x, mask, c)
        return self.norm(x)

    def make_cache(self) -> List[KVCache]:
        return [KVCache() for _ in self.layers]


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        dim, dec_dim = args.backbone.hidden_size, args.decoder.hidden_size
        vocab, n_codebooks = args.audio_vocab_size, args.audio_num_codebooks
        self.backbone = Transformer(args.backbone)
        self.decoder = Transformer(args.decoder, rope_positions=args.audio_num_codebooks)
        self.text_embeddings = nn.Embedding(args.text_vocab_size, dim)
        self.audio_embeddings = nn.Embedding(vocab * n_codebooks, dim)
        self.projection = nn.Linear(dim, dec_dim, bias=False)
        self.codebook0_head = nn.Linear(dim, vocab, bias=False)
        # One head per codebook 1..31. Checkpoints stack them as one (31, dim, vocab) tensor;
        # separate contiguous layers avoid a copy of the slice on every step and can be quantized.
        self.audio_head = [nn.Linear(dec_dim, vocab, bias=False) for _ in range(n_codebooks - 1)]
        self._codebook_offsets = mx.arange(n_codebooks) * vocab

    def embed_rows(self, tokens: mx.array, mask: mx.array) -> mx.array:
        """Backbone inputs for prompt rows: (B, S, 33) ids and mask -> (B, S, D)."""
        audio = self.audio_embeddings(tokens[..., :-1] + self._codebook_offsets)
        text = self.text_embeddings(tokens[..., -1])
        mask = mask.astype(audio.dtype)
        return (audio * mask[..., :-1, None]).sum(axis=-2) + text * mask[..., -1:]

    def embed_frames(self, codes: mx.array, codebooks: Optional[mx.array] = None) -> mx.array:
        """Backbone inputs for generated frames: (B, T, N) codes of the first N codebooks -> (B, T, D).

        A frame row has its audio columns on and the text column off, so the row is just the
        sum of its codebook embeddings. codebooks (B,): how many of the N each row uses (a row
        generated at a lower quality level has the rest off, as its prompt rows do)."""
        n = codes.shape[-1]
        embedded = self.audio_embeddings(codes + self._codebook_offsets[:n])
        if codebooks is not None:
            used = mx.arange(n) < codebooks[:, None]
            embedded = embedded * used[:, None, :, None].astype(embedded.dtype)
        return embedded.sum(axis=-2)

    def embed_audio(self, codebook: int, codes: mx.array) -> mx.array:
        return self.audio_embeddings(codes + codebook * self.args.audio_vocab_size)

    def codebook_logits(self, codebook: int, decoder_hidden: mx.array) -> mx.array:
        return self.audio_head[codebook - 1](decoder_hidden)

    def teacher_forced_logits(
        self, tokens: mx.array, mask: mx.array, frames: mx.array
    ) -> mx.array:
        """Logits for every codebook of ``frames`` given the prompt and the frames before.

        tokens, mask: (B, S, 33) prompt rows; frames: (B, T, 32).
        Returns (B, T, 32, vocab): [:, t, 0] from the backbone state after the
        prompt and frames < t; [:, t, k] from that state and codes 0..k-1 of frame t.
        """
        B, T, K = frames.shape
        x = mx.concatenate([self.embed_rows(tokens, mask), self.embed_frames(frames[:, :-1])], axis=1)
        h = self.backbone(x)[:, tokens.shape[1] - 1 :]
        c0_logits = self.codebook0_head(h)

        codes = self.audio_embeddings(frames[..., :-1] + self._codebook_offsets[:-1])
        depth_in = mx.concatenate([h[:, :, None], codes], axis=2).reshape(B * T, K, -1)
        depth_h = self.decoder(self.projection(depth_in))
        rest = mx.stack([self.codebook_logits(k, depth_h[:, k]) for k in range(1, K)], axis=1)
        return mx.concatenate([c0_logits[:, :, None], rest.reshape(B, T, K - 1, -1)], axis=2)

    def training_loss(
        self, tokens: mx.array, mask: mx.array, labels: mx.array
    ) -> Tuple[mx.array, mx.array, mx.array]:
        """transformers' CsmForConditionalGeneration loss: (loss, backbone_loss, depth_decoder_loss).

        tokens, mask: (B, S, 33) rows of whole training sequences; labels: (B, S, 32) int32, the
        codes of each row, -100 where nothing is trained (text rows, padding, codebooks 1..31 of
        frames left out of the depth decoder's share). The backbone's state at row t is scored
        on codebook 0 of row t + 1; the depth decoder runs only on the rows whose codebooks
        1..31 are labelled, after the backbone state of the row before, so its memory follows
        the trained frames. Both terms are means over their labelled codes, summed unweighted.
        """
        h = self.backbone(self.embed_rows(tokens, mask))
        backbone_loss = _mean_cross_entropy(self.codebook0_head(h[:, :-1]), labels[:, 1:, 0])

        # Which frames the depth decoder trains on depends on the data: find them on the host.
        batch, row = np.nonzero((np.array(labels[..., 1:]) != IGNORE).any(axis=-1))
        batch, row = mx.array(batch), mx.array(row)
        frames = labels[batch, row]
        # An unlabelled code (-100) before a labelled one still has to be embedded; 0 keeps the
        # lookup in bounds, and no loss is taken where it is -100.
        codes = self.audio_embeddings(mx.maximum(frames[:, :-1], 0) + self._codebook_offsets[:-1])
        depth_h = self.decoder(self.projection(mx.concatenate([h[batch, row - 1][:, None], codes], axis=1)))
        logits = mx.stack([self.codebook_logits(k, depth_h[:, k]) for k in range(1, frames.shape[-1])], axis=1)
        depth_loss = _mean_cross_entropy(logits, frames[:, 1:])
        return backbone_loss + depth_loss, backbone_loss, depth_loss

    def sanitize(self, weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
        """Map a checkpoint in any supported format (Sesame's, transformers', mlx-audio's, or
        already ours) onto this model's keys."""
        if any(k.startswith("backbone_model.") for k in weights):
            weights = _from_transformers(weights)
        elif any(".attn.q_proj." in k for k in weights):
            weights = _from_original(weights, self.args)
        elif any(k.startswith("model.backbone.") for k in weights):
            weights = _from_mlx_audio(weights, self.args)
        if "audio_head" in weights:
            stacked = weights.pop("audio_head")
            for k in range(stacked.shape[0]):
                weights[f"audio_head.{k}.weight"] = mx.contiguous(stacked[k].T)
        return weights


def _mean_cross_entropy(logits: mx.array, targets: mx.array) -> mx.array:
    """Mean cross-entropy over the targets that are not IGNORE, in float32."""
    trained = targets != IGNORE
    ce = nn.losses.cross_entropy(logits.astype(mx.float32), mx.where(trained, targets, 0))
    return (ce * trained).sum() / trained.sum()


_TRANSFORMERS_PREFIXES = [
    ("backbone_model.embed_tokens.embed_audio_tokens.", "audio_embeddings."),
    ("backbone_model.", "backbone."),
    ("depth_decoder.model.inputs_embeds_projector.", "projection."),
    ("depth_decoder.model.", "decoder."),
    ("depth_decoder.codebooks_head.weight", "audio_head"),
    ("embed_text_tokens.", "text_embeddings."),
    ("lm_head.", "codebook0_head."),
]

# transformers ties the backbone's audio embeddings to the depth decoder's
# embed_tokens and may save either name; full checkpoints also carry the Mimi
# codec, which is not part of this model.
_TIED_AUDIO_EMBEDDINGS = "depth_decoder.model.embed_tokens.weight"


def _from_transformers(weights):
    out = {}
    if "backbone_model.embed_tokens.embed_audio_tokens.weight" not in weights and _TIED_AUDIO_EMBEDDINGS in weights:
        out["audio_embeddings.weight"] = weights[_TIED_AUDIO_EMBEDDINGS]
    for key, value in weights.items():
        if key == _TIED_AUDIO_EMBEDDINGS or key.startswith("codec_model.") or "rotary_emb" in key:
            continue
        for old, new in _TRANSFORMERS_PREFIXES:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


_ORIGINAL_RENAMES = [
    (".attn.output_proj.", ".self_attn.o_proj."),
    (".attn.", ".self_attn."),
    (".mlp.w1.", ".mlp.gate_proj."),
    (".mlp.w2.", ".mlp.down_proj."),
    (".mlp.w3.", ".mlp.up_proj."),
    (".sa_norm.scale", ".input_layernorm.weight"),
    (".mlp_norm.scale", ".post_attention_layernorm.weight"),
    ("norm.scale", "norm.weight"),
]


def interleaved_to_rotate_half(w: mx.array, n_heads: int) -> mx.array:
    """Reorder q/k projection rows so rotate-half RoPE computes what interleaved RoPE did.

    Row h*d + 2i + j (head h, pair i, member j) moves to h*d + j*d/2 + i.
    """
    out_dim, in_dim = w.shape
    d = out_dim // n_heads
    return w.reshape(n_heads, d // 2, 2, in_dim).swapaxes(1, 2).reshape(out_dim, in_dim)


def _to_rotate_half(key: str, value: mx.array, args: ModelArgs) -> mx.array:
    """A q/k projection's tensor (weight, or a quantized one's scales and biases: all one row per
    output) reordered for rotate-half RoPE; any other tensor as it is."""
    stack = args.backbone if key.startswith("backbone.") else args.decoder
    if ".self_attn.q_proj." in key:
        return interleaved_to_rotate_half(value, stack.num_heads)
    if ".self_attn.k_proj." in key:
        return interleaved_to_rotate_half(value, stack.num_kv_heads)
    return value


def _from_original(weights, args: ModelArgs):
    out = {}
    for key, value in weights.items():
        for old, new in _ORIGINAL_RENAMES:
            key = key.replace(old, new)
        out[key] = _to_rotate_half(key, value, args)
    return out


def _from_mlx_audio(weights, args: ModelArgs):
    """mlx-audio's "sesame" conversions (the Marvis -MLX repos): our names under "model.", with
    q/k in Sesame's interleaved order, as its RoPE is the traditional one."""
    out = {}
    for key, value in weights.items():
        key = key[len("model.") :] if key.startswith("model.") else key
        out[key] = _to_rotate_half(key, value, args)
    return out
