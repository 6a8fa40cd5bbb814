"""Tiny random CSM checkpoints in the two hub formats, and transformers' CSM as the reference.

The original-format weights are generated here from the key layout of the real
csm-1b (tests/data/csm-1b-keys.tsv); the transformers-format copy applies the
documented q/k row permutation independently of csm_mlx's own conversion code.
"""

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from csm_mlx.models import FLAVORS, ModelArgs, TransformerArgs

TINY_BACKBONE = "tiny-backbone"
TINY_DECODER = "tiny-decoder"
TEXT_VOCAB = 384
VOCAB = 2051
N_CODEBOOKS = 32
INIT_STD = 0.2  # at 0.02 attention is near-uniform and a wrong RoPE convention goes unnoticed

FLAVORS[TINY_BACKBONE] = TransformerArgs(num_layers=2, hidden_size=128, num_heads=4, num_kv_heads=2, intermediate_size=256)
FLAVORS[TINY_DECODER] = TransformerArgs(num_layers=2, hidden_size=64, num_heads=4, num_kv_heads=2, intermediate_size=128)

TINY_ARGS = ModelArgs.from_flavors(TINY_BACKBONE, TINY_DECODER, text_vocab_size=TEXT_VOCAB)


def original_spec(args: ModelArgs):
    """Key -> shape of an original Sesame checkpoint with these sizes."""
    spec = {}
    for name, a in (("backbone", args.backbone), ("decoder", args.decoder)):
        d, hd = a.hidden_size, a.head_dim
        for i in range(a.num_layers):
            p = f"{name}.layers.{i}"
            spec[f"{p}.attn.q_proj.weight"] = (a.num_heads * hd, d)
            spec[f"{p}.attn.k_proj.weight"] = (a.num_kv_heads * hd, d)
            spec[f"{p}.attn.v_proj.weight"] = (a.num_kv_heads * hd, d)
            spec[f"{p}.attn.output_proj.weight"] = (d, a.num_heads * hd)
            spec[f"{p}.mlp.w1.weight"] = (a.intermediate_size, d)
            spec[f"{p}.mlp.w2.weight"] = (d, a.intermediate_size)
            spec[f"{p}.mlp.w3.weight"] = (a.intermediate_size, d)
            spec[f"{p}.sa_norm.scale"] = (d,)
            spec[f"{p}.mlp_norm.scale"] = (d,)
        spec[f"{name}.norm.scale"] = (d,)
    d, dd, v, k = args.backbone.hidden_size, args.decoder.hidden_size, args.audio_vocab_size, args.audio_num_codebooks
    spec["text_embeddings.weight"] = (args.text_vocab_size, d)
    spec["audio_embeddings.weight"] = (v * k, d)
    spec["projection.weight"] = (dd, d)
    spec["codebook0_head.weight"] = (v, d)
    spec["audio_head"] = (k - 1, dd, v)
    return spec


def random_original_state(args: ModelArgs, seed: int = 0):
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in original_spec(args).items():
        if key.endswith(".scale"):
            state[key] = (1.0 + INIT_STD * rng.standard_normal(shape)).astype(np.float32)
        else:
            state[key] = (INIT_STD * rng.standard_normal(shape)).astype(np.float32)
    return state


def write_original(path: Path, state, args: ModelArgs, backbone_flavor: str, decoder_flavor: str) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    config = {
        "audio_num_codebooks": args.audio_num_codebooks,
        "audio_vocab_size": args.audio_vocab_size,
        "backbone_flavor": backbone_flavor,
        "decoder_flavor": decoder_flavor,
        "text_vocab_size": args.text_vocab_size,
    }
    (path / "config.json").write_text(json.dumps(config))
    save_file(state, str(path / "model.safetensors"))
    return path


def _permute_for_rotate_half(w: np.ndarray, n_heads: int) -> np.ndarray:
    # W_hf[h*d + j*(d/2) + i] = W_orig[h*d + 2*i + j]
    d = w.shape[0] // n_heads
    index = np.empty(w.shape[0], dtype=np.int64)
    for h in range(n_heads):
        for i in range(d // 2):
            for j in range(2):
                index[h * d + j * (d // 2) + i] = h * d + 2 * i + j
    return w[index]


def to_transformers_state(state, args: ModelArgs):
    names = {
        "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
        "attn.v_proj": "self_attn.v_proj", "attn.output_proj": "self_attn.o_proj",
        "mlp.w1": "mlp.gate_proj", "mlp.w2": "mlp.down_proj", "mlp.w3": "mlp.up_proj",
        "sa_norm.scale": "input_layernorm.weight", "mlp_norm.scale": "post_attention_layernorm.weight",
    }
    out = {}
    for name, prefix, a in (("backbone", "backbone_model", args.backbone), ("decoder", "depth_decoder.model", args.decoder)):
        for i in range(a.num_layers):
            for old, new in names.items():
                suffix = "" if old.endswith(".scale") else ".weight"
                w = state[f"{name}.layers.{i}.{old}{suffix}"]
                if old == "attn.q_proj":
                    w = _permute_for_rotate_half(w, a.num_heads)
                if old == "attn.k_proj":
                    w = _permute_for_rotate_half(w, a.num_kv_heads)
                out[f"{prefix}.layers.{i}.{new}{suffix}"] = w
        out[f"{prefix}.norm.weight"] = state[f"{name}.norm.scale"]
    out["embed_text_tokens.weight"] = state["text_embeddings.weight"]
    out["backbone_model.embed_tokens.embed_audio_tokens.weight"] = state["audio_embeddings.weight"]
    out["depth_decoder.model.embed_tokens.weight"] = state["audio_embeddings.weight"]
    out["depth_decoder.model.inputs_embeds_projector.weight"] = state["projection.weight"]
    out["lm_head.weight"] = state["codebook0_head.weight"]
    out["depth_decoder.codebooks_head.weight"] = state["audio_head"]
    return out


def transformers_config(args: ModelArgs):
    from transformers import CsmConfig, MimiConfig

    # A tiny codec keeps the saved checkpoint small; CSM itself never runs it here.
    codec = MimiConfig(
        hidden_size=32, num_filters=4, codebook_dim=16, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, intermediate_size=32, head_dim=16, upsample_groups=32,
    )
    b, d = args.backbone, args.decoder
    # transformers' rescaled Llama-3 thresholds (same frequencies as torchtune's factor 32, 1, 4, 8192).
    backbone_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 0.125,
                     "high_freq_factor": 0.5, "original_max_position_embeddings": 1024}
    decoder_rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 32.0, "low_freq_factor": 1 / 512,
                    "high_freq_factor": 1 / 128, "original_max_position_embeddings": 16}
    return CsmConfig(
        num_codebooks=args.audio_num_codebooks, vocab_size=args.audio_vocab_size,
        text_vocab_size=args.text_vocab_size, hidden_size=b.hidden_size, intermediate_size=b.intermediate_size,
        num_hidden_layers=b.num_layers, num_attention_heads=b.num_heads, num_key_value_heads=b.num_kv_heads,
        max_position_embeddings=2048, rope_parameters=backbone_rope,
        depth_decoder_config=dict(
            num_codebooks=args.audio_num_codebooks, backbone_hidden_size=b.hidden_size,
            vocab_size=args.audio_vocab_size, hidden_size=d.hidden_size, intermediate_size=d.intermediate_size,
            num_hidden_layers=d.num_layers, num_attention_heads=d.num_heads, num_key_value_heads=d.num_kv_heads,
            max_position_embeddings=33, rope_parameters=decoder_rope,
        ),
        codec_config=codec.to_dict(),
    )


def transformers_reference(state, args: ModelArgs):
    from transformers import CsmForConditionalGeneration

    model = CsmForConditionalGeneration(transformers_config(args)).eval()
    hf_state = {k: torch.from_numpy(v) for k, v in to_transformers_state(state, args).items()}
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    assert not unexpected and all(k.startswith("codec_model.") for k in missing), (missing, unexpected)
    return model


@torch.no_grad()
def reference_prompt_embeds(model, segments, text_tokens):
    """Backbone inputs the way transformers builds them: text ids through embed_text_tokens,
    audio frames (and the all-zero end-of-audio frame) through the backbone's audio embedding."""
    parts = []
    for seg_text, seg_codes in segments:
        parts.append(model.embed_text_tokens(torch.tensor(seg_text)[None]))
        if seg_codes is not None:
            frames = torch.tensor(np.asarray(seg_codes, dtype=np.int64).T)[None]
            eos = torch.zeros((1, 1, frames.shape[-1]), dtype=torch.long)
            parts.append(model.backbone_model.embed_tokens(torch.cat([frames, eos], dim=1)))
    parts.append(model.embed_text_tokens(torch.tensor(text_tokens)[None]))
    return torch.cat(parts, dim=1)


@torch.no_grad()
def reference_teacher_forced_logits(model, prompt_embeds, frames: np.ndarray) -> np.ndarray:
    """transformers' logits for frames (T, 32): backbone over prompt + frames, depth decoder per frame."""
    frames_t = torch.tensor(frames, dtype=torch.long)[None]
    T, K = frames.shape
    fed = model.backbone_model.embed_tokens(frames_t[:, :-1])
    hidden = model.backbone_model(inputs_embeds=torch.cat([prompt_embeds, fed], dim=1)).last_hidden_state
    h = hidden[0, prompt_embeds.shape[1] - 1 :]
    c0 = model.lm_head(h)
    depth_ids = torch.nn.functional.pad(frames_t[0, :, : K - 1], (1, 0))
    rest = model.depth_decoder(input_ids=depth_ids, backbone_last_hidden_state=h).logits
    return torch.cat([c0[:, None], rest], dim=1).numpy()


@torch.no_grad()
def reference_greedy_frames(model, text_tokens, n_frames: int) -> np.ndarray:
    """transformers' greedy generate; ids 2048..2050 are suppressed, as csm-mlx never samples them."""
    not_audio = list(range(2048, model.config.vocab_size))
    out = model.generate(
        input_ids=torch.tensor(text_tokens)[None], max_new_tokens=n_frames, do_sample=False,
        suppress_tokens=not_audio, depth_decoder_do_sample=False, depth_decoder_suppress_tokens=not_audio,
    )
    return out[0].numpy()


def generate_codes(model, text_tokens, context=(), *, max_frames=125, seed=0, stop_after_repeats=None, **sampling):
    """Codes (32, T) of text_tokens spoken after the context (TokenizedSegments), through the
    frame core as one row; sampling as csm_mlx.sampling.Sampling takes it."""
    from csm_mlx.sampling import Sampling
    from csm_mlx.static_batch import speak_all
    from csm_mlx.utterance import Chunk, Utterance, random_key

    utterance = Utterance(list(context), [Chunk(list(text_tokens), max_frames)], Sampling(**sampling),
                          random_key(seed), stop_after_repeats)
    return next(speak_all(model, [utterance], 1))[1]
