"""Other CSM-architecture models on the same code: Marvis (250m), MisoTTS (8B widths), a model with
16 codebooks, and mlx-audio's quantized conversions, each from its own repo layout in the local hub
cache, against transformers' CsmForConditionalGeneration built from the same config.

Marvis 250m runs at its documented sizes (6 + 4 layers, text vocabulary cut to 384: its size does not
change the code). MisoTTS runs at its documented widths (hidden 4096, 32/8 heads, MLP 14336; decoder
1536, 24/6 heads of 64, MLP 6912) with 1 + 2 of its 32 + 8 layers: the layer count is a loop, and
at full depth its float32 weights (33 GB) do not fit this machine.
"""

import gc
import json
import shutil
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
import rustymimi

from csm_fixtures import (
    TEXT_VOCAB,
    TINY_ARGS,
    TINY_BACKBONE,
    TINY_DECODER,
    generate_codes,
    original_spec,
    reference_greedy_frames,
    reference_prompt_embeds,
    reference_teacher_forced_logits,
    transformers_config,
    transformers_reference,
)
from csm_mlx import CSM, load_model
from csm_mlx.checkpoint import quantize, read_config
from csm_mlx.convert import convert
from csm_mlx.models import FLAVORS, ModelArgs
from csm_mlx.conversation import Conversation
from csm_mlx.options import OptionError
from csm_mlx.prompt import TokenizedSegment, prompt_rows
from csm_mlx.sampling import Sampling
from csm_mlx.static_batch import speak_all
from csm_mlx.utterance import Chunk, Utterance, random_key
from speech_fixtures import SMOLLM2_SPECIAL, add_to_hub_cache, make_tokenizer, write_voice

MARVIS_REPO = "Marvis-AI/marvis-tts-250m-v0.2"
MARVIS_MLX_REPO = "Marvis-AI/marvis-tts-250m-v0.2-MLX-8bit"
MISO_REPO = "MisoLabs/MisoTTS"
MARVIS_VOICE = "Hello, this is a Marvis voice prompt."

MODELS = {
    "marvis-250m": ModelArgs.from_flavors("llama-250M", "llama-60M", text_vocab_size=TEXT_VOCAB),
    "misotts-8b": ModelArgs(replace(FLAVORS["llama-8B"], num_layers=1), replace(FLAVORS["llama-300M"], num_layers=2),
                            text_vocab_size=TEXT_VOCAB),
    "16-codebooks": ModelArgs(FLAVORS[TINY_BACKBONE], FLAVORS[TINY_DECODER], text_vocab_size=TEXT_VOCAB,
                              audio_num_codebooks=16),
}
N_FRAMES = 4
# float32 sums over thousands of terms in another order: relative to the logits' own scale
RELATIVE_TOLERANCE = 1e-5


def random_state(args: ModelArgs, seed: int = 0):
    """Sesame-style weights scaled by their fan-in (standard deviation 1.5 / sqrt(fan-in)), so that
    wide stacks keep activations of order one and attention far from uniform. Uniform, not normal,
    and scaled in place: half the time for MisoTTS's 600M values."""
    rng = np.random.default_rng(seed)
    state = {}
    for key, shape in original_spec(args).items():
        w = rng.random(shape, dtype=np.float32)
        w -= np.float32(0.5)
        w *= np.float32(2 * np.sqrt(3))  # unit variance
        if key.endswith(".scale"):
            w *= np.float32(0.1)
            w += np.float32(1.0)
        elif "embeddings" in key:
            w *= np.float32(0.5)
        else:
            w *= np.float32(1.5 / np.sqrt(shape[-2] if key == "audio_head" else shape[-1]))
        state[key] = w
    return state


def save_safetensors(state, path):
    from safetensors.numpy import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path))
    return path


@pytest.fixture(scope="module", params=list(MODELS))
def family(request, tmp_path_factory, hub_cache, tokenizer_path):
    """(name, args, transformers reference, how to load it) for each model, one at a time."""
    name, args = request.param, MODELS[request.param]
    state = random_state(args, seed=len(name))
    reference = transformers_reference(state, args)
    work = tmp_path_factory.mktemp(name)
    if name == "marvis-250m":
        # Marvis's own repo: transformers' CsmConfig with Sesame's fields, Sesame's tensor names,
        # SmolLM2's tokenizer and its voice prompts with their transcripts
        config = transformers_config(args).to_dict()
        config.update(backbone_flavor="llama-250M", decoder_flavor="llama-60M", audio_num_codebooks=32,
                      audio_vocab_size=2051, text_tokenizer=MARVIS_REPO)
        (work / "config.json").write_text(json.dumps(config))
        voice = write_voice(work / "voice.wav", seed=7)
        (work / "voice.txt").write_text(MARVIS_VOICE + "\n")
        add_to_hub_cache(hub_cache, MARVIS_REPO, {
            "config.json": work / "config.json",
            "model.safetensors": save_safetensors(state, work / "model.safetensors"),
            "tokenizer.json": make_tokenizer(work / "tokenizer.json", special_tokens=SMOLLM2_SPECIAL),
            "prompts/conversational_a.wav": voice, "prompts/conversational_a.txt": work / "voice.txt",
        })
        source = MARVIS_REPO
    elif name == "misotts-8b":
        # MisoTTS: Sesame's names, no config.json; the tokenizer is Llama-3.2's from the hub
        add_to_hub_cache(hub_cache, MISO_REPO, {"model.safetensors": save_safetensors(state, work / "model.safetensors")})
        add_to_hub_cache(hub_cache, "unsloth/Llama-3.2-1B", {"tokenizer.json": tokenizer_path})
        source = MISO_REPO
    else:
        reference.save_pretrained(work / "transformers")
        (work / "transformers" / "tokenizer.json").write_bytes(tokenizer_path.read_bytes())
        source = str(work / "transformers")
    del state  # written; only the reference and the loaded model stay in memory
    yield name, args, reference, source
    # other modules check what happens when Llama-3.2's tokenizer is not in the cache
    shutil.rmtree(hub_cache / "models--unsloth--Llama-3.2-1B", ignore_errors=True)
    # gigabytes of weights: give them back before the next model (and the timing tests after)
    del reference
    gc.collect()
    mx.clear_cache()


@pytest.fixture(scope="module")
def csm(family, mimi_path):
    return CSM.load(family[3], mimi=mimi_path, watermark=False)


def context_for(args, seed=2):
    rng = np.random.default_rng(seed)
    k = args.audio_num_codebooks
    return [TokenizedSegment(rng.integers(0, args.text_vocab_size, 7).tolist(), rng.integers(0, 2048, (k, 9))),
            TokenizedSegment(rng.integers(0, args.text_vocab_size, 5).tolist(), rng.integers(0, 2048, (k, 4)))]


def teacher_forced(model, args, context, text_tokens, frames):
    tokens, mask = prompt_rows(context, text_tokens, args.audio_num_codebooks)
    logits = model.teacher_forced_logits(mx.array(tokens)[None], mx.array(mask)[None], mx.array(frames)[None])
    return np.array(logits[0].astype(mx.float32))


def reference_logits(reference, context, text_tokens, frames):
    segments = [(s.text_tokens, s.audio_codes) for s in context]
    return reference_teacher_forced_logits(reference, reference_prompt_embeds(reference, segments, text_tokens), frames)


def assert_close(got, expected, tolerance=RELATIVE_TOLERANCE):
    assert got.shape == expected.shape
    error = np.abs(got - expected).max() / np.abs(expected).max()
    assert error <= tolerance, error


def sizes(args: ModelArgs):
    """Everything of a config but how RoPE is written (transformers rescales llama3's thresholds
    to the same frequencies; the logits tests check those) and the depth decoder's table length
    (33 in transformers' configs, 2048 in Sesame's flavors; it sees positions 0..31 only)."""
    stack = lambda t: replace(t, rope_scaling=None, rope_theta=None)
    return replace(args, backbone=stack(args.backbone), decoder=replace(stack(args.decoder), max_seq_len=None))


def test_sizes_come_from_the_checkpoint(family, csm):
    args = family[1]
    assert sizes(csm.model.args) == sizes(args)
    assert csm.mimi.num_codebooks == args.audio_num_codebooks
    assert len(csm.model.audio_head) == args.audio_num_codebooks - 1
    assert csm.model.backbone.layers[0].self_attn.n_heads == args.backbone.num_heads
    assert csm.model.decoder.layers[0].self_attn.n_kv_heads == args.decoder.num_kv_heads


def test_text_is_framed_as_the_model_was_trained(family, csm):
    """Marvis: SmolLM2's <|im_start|>[0]text<|im_end|>; MisoTTS: Llama-3's tokens and a space after
    the speaker tag; the others: Llama-3's tokens, no space."""
    name = family[0]
    tokenizer = csm.tokenizer._tokenizer
    ids = csm.tokenizer.encode("  Hello there.", 1)
    bos, eos = ("<|im_start|>", "<|im_end|>") if name == "marvis-250m" else ("<|begin_of_text|>", "<|end_of_text|>")
    assert ids[0] == tokenizer.token_to_id(bos) and ids[-1] == tokenizer.token_to_id(eos)
    text = "[1] Hello there." if name == "misotts-8b" else "[1]  Hello there."
    assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_logits_match_transformers(family, csm):
    _, args, reference, _ = family
    rng = np.random.default_rng(3)
    text_tokens = rng.integers(0, args.text_vocab_size, 9).tolist()
    frames = rng.integers(0, 2048, (6, args.audio_num_codebooks))
    context = context_for(args)
    expected = reference_logits(reference, context, text_tokens, frames)
    assert expected.shape == (6, args.audio_num_codebooks, 2051)
    assert_close(teacher_forced(csm.model, args, context, text_tokens, frames), expected)


def test_greedy_frames_match_transformers(family, csm):
    _, args, reference, _ = family
    text_tokens = np.random.default_rng(5).integers(0, args.text_vocab_size, 9).tolist()
    expected = reference_greedy_frames(reference, text_tokens, N_FRAMES)
    got = generate_codes(csm.model, text_tokens, max_frames=N_FRAMES, temperature=0.0)
    assert got.shape == (args.audio_num_codebooks, N_FRAMES)
    np.testing.assert_array_equal(got.T, expected[:N_FRAMES])


def test_speaks_with_its_own_voice_prompts(family, csm, mimi_path):
    """A whole turn through the API: the repo's voice prompt as context, Mimi decoding as many
    codebooks as the model has."""
    name, args = family[0], family[1]
    if name == "marvis-250m":
        assert csm.voices()["conversational_a"] == MARVIS_VOICE
        context = [csm.voice("conversational_a", 0)]
    else:
        context = []
    speech = csm.generate("Hello there.", 0, context, max_audio_length_ms=400, seed=1)
    assert speech.codes.shape[0] == args.audio_num_codebooks and speech.codes.shape[1] >= 1
    assert len(speech.audio) == speech.codes.shape[1] * 1920
    # rustymimi's own one-pass decode, built for that many codebooks (it takes no other count)
    mimi = rustymimi.Tokenizer(str(mimi_path), num_codebooks=args.audio_num_codebooks)
    expected = mimi.decode(np.ascontiguousarray(speech.codes, dtype=np.uint32)[None])[0, 0]
    np.testing.assert_allclose(speech.audio, expected, atol=1e-5)


def test_converts_and_quantizes(family, csm, tmp_path):
    """csm-mlx-convert keeps the sizes and the text settings, and quantizes to 8 bits; the model
    quantizes to 4 bits too. The quantized models' codebook-0 logits stay near the float ones
    (8-bit within 5% RMS, 4-bit within 60%: random weights are far less forgiving than trained
    ones) and they generate."""
    name, args = family[0], family[1]
    out = convert(family[3], tmp_path / "mlx", dtype="float32", quantize_weights=True, q_bits=8)
    fmt, converted_args, config = read_config(out)
    assert (fmt, sizes(converted_args)) == ("mlx", sizes(args))
    assert config.get("speaker_prefix_space", False) == (name == "misotts-8b")
    eight_bit = load_model(out)[0]
    four_bit = load_model(csm.model_dir, lazy=True)[0]
    quantize(four_bit, 4, 64)
    rng = np.random.default_rng(6)
    text_tokens = rng.integers(0, args.text_vocab_size, 9).tolist()
    # few frames: MLX's CPU backend has no fast quantized products, and at these widths each frame costs seconds
    frames = rng.integers(0, 2048, (2, args.audio_num_codebooks))
    full = teacher_forced(csm.model, args, [], text_tokens, frames)[:, 0]
    for bits, model, bound in ((8, eight_bit, 0.05), (4, four_bit, 0.6)):
        assert model.backbone.layers[0].mlp.gate_proj.bits == bits
        quantized = teacher_forced(model, args, [], text_tokens, frames)[:, 0]
        error = np.sqrt(np.mean((quantized - full) ** 2) / np.mean(full**2))
        assert error <= bound, (bits, error)
        codes = generate_codes(model, text_tokens, max_frames=1, temperature=0.0)
        assert codes.shape == (args.audio_num_codebooks, 1) and codes.max() < 2048


def test_mlx_audio_8bit_conversion_matches_transformers(tmp_path_factory, hub_cache, mimi_path):
    """Marvis's -MLX-8bit repo as mlx-audio writes it (at Marvis's widths, 2 + 2 layers):
    model_type "sesame", its own key names
    under "model.", q/k in Sesame's interleaved order, Linear layers and embeddings quantized
    (groups of 64), audio_head stacked and not. Its logits equal transformers' on the same
    weights dequantized."""
    marvis = MODELS["marvis-250m"]
    args = replace(marvis, backbone=replace(marvis.backbone, num_layers=2), decoder=replace(marvis.decoder, num_layers=2))
    state = random_state(args, seed=11)
    names = {"attn.q_proj.weight": "self_attn.q_proj.weight", "attn.k_proj.weight": "self_attn.k_proj.weight",
             "attn.v_proj.weight": "self_attn.v_proj.weight", "attn.output_proj.weight": "self_attn.o_proj.weight",
             "mlp.w1.weight": "mlp.gate_proj.weight", "mlp.w2.weight": "mlp.down_proj.weight",
             "mlp.w3.weight": "mlp.up_proj.weight", "sa_norm.scale": "input_layernorm.weight",
             "mlp_norm.scale": "post_attention_layernorm.weight", "norm.scale": "norm.weight"}
    weights, dequantized = {}, {}
    for key, value in state.items():
        mlx_key = "model." + next((key[: -len(old)] + new for old, new in names.items() if key.endswith(old)), key)
        if value.ndim == 2 and value.shape[-1] % 64 == 0:
            q, scales, biases = mx.quantize(mx.array(value), group_size=64, bits=8)
            stem = mlx_key[: -len(".weight")]
            weights.update({mlx_key: q, f"{stem}.scales": scales, f"{stem}.biases": biases})
            dequantized[key] = np.array(mx.dequantize(q, scales, biases, group_size=64, bits=8))
        else:
            weights[mlx_key] = mx.array(value)
            dequantized[key] = value
    assert "model.audio_head" in weights and "model.audio_embeddings.scales" in weights
    config = transformers_config(args).to_dict()
    config.update(model_type="sesame", backbone_flavor="llama-250M", decoder_flavor="llama-60M",
                  audio_num_codebooks=32, audio_vocab_size=2051, text_tokenizer=MARVIS_REPO,
                  rope_scaling={"type": "linear", "factor": 1.0},
                  quantization={"group_size": 64, "bits": 8, "mode": "affine"})
    work = tmp_path_factory.mktemp("mlx-audio")
    mx.save_safetensors(str(work / "model.safetensors"), weights)
    (work / "config.json").write_text(json.dumps(config))
    snapshot = add_to_hub_cache(hub_cache, MARVIS_MLX_REPO, {
        "config.json": work / "config.json", "model.safetensors": work / "model.safetensors",
        "tokenizer.json": make_tokenizer(work / "tokenizer.json", special_tokens=SMOLLM2_SPECIAL)})
    del weights
    csm = CSM.load(MARVIS_MLX_REPO, mimi=mimi_path, watermark=False)
    assert read_config(snapshot)[0] == "mlx-audio"
    assert csm.model.audio_embeddings.bits == 8 and csm.model.backbone.layers[0].self_attn.q_proj.bits == 8
    reference = transformers_reference(dequantized, args)
    rng = np.random.default_rng(3)
    text_tokens = rng.integers(0, args.text_vocab_size, 9).tolist()
    frames = rng.integers(0, 2048, (2, 32))
    context = context_for(args)
    assert_close(teacher_forced(csm.model, args, context, text_tokens, frames),
                 reference_logits(reference, context, text_tokens, frames), 1e-4)


def test_rope_parameters_and_rope_scaling_configs_load_the_same(tmp_path):
    """transformers 5 writes rope_parameters (theta inside); 4.x wrote rope_scaling and rope_theta."""
    new = transformers_config(TINY_ARGS).to_dict()
    assert "rope_parameters" in new and "rope_scaling" not in new

    def old_style(cfg):
        cfg = dict(cfg)
        rope = dict(cfg.pop("rope_parameters"))
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = {"type" if k == "rope_type" else k: v for k, v in rope.items()}
        return cfg

    old = old_style(new)
    old["depth_decoder_config"] = old_style(new["depth_decoder_config"])
    results = []
    for name, cfg in (("new", new), ("old", old)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(cfg))
        results.append(read_config(tmp_path / name)[1])
    assert results[0] == results[1]
    assert results[0].backbone.rope_scaling["factor"] == 32.0 and results[0].backbone.rope_theta == 500000.0


def test_fewer_codebooks_first_frame_is_the_full_runs_prefix(original_dir, text_tokens):
    """Greedy, codebooks=8 on csm-1b-shaped weights: the first frame's 8 codes are the first 8 of
    the full run's (the depth decoder just stops early); later frames differ, since the backbone
    then reads 8-codebook frames. Beside a full row in one batch, each row gives what it gives alone."""
    model = load_model(original_dir)[0]

    def run(*codebooks):
        utterances = [Utterance([], [Chunk(list(text_tokens), 5)], Sampling(temperature=0.0), random_key(0), None, n)
                      for n in codebooks]
        return dict(speak_all(model, utterances, len(utterances)))

    full, eight = run(None)[0], run(8)[0]
    assert full.shape == (32, 5) and eight.shape == (8, 5)
    np.testing.assert_array_equal(eight[:, 0], full[:8, 0])
    assert not np.array_equal(eight[:, 1:], full[:8, 1:])
    together = run(8, None)
    np.testing.assert_array_equal(together[0], eight)
    np.testing.assert_array_equal(together[1], full)


def test_fewer_codebooks_conversation_equals_fresh(hub_cache):
    """A turn at codebooks=8 becomes context with codebooks 8..31 off; the next turn from the kept
    cache (fed back with the same mask) gives what a fresh prompt of the same history gives."""
    csm = CSM.load(watermark=False)
    conversation = csm.conversation()
    conversation.say("First turn here.", 0, max_audio_length_ms=480, temperature=0, codebooks=8)
    assert conversation.history[-1].audio_codes.shape[0] == 8
    kept = conversation.say("And the second.", 1, max_audio_length_ms=480, temperature=0, codebooks=8).codes
    fresh = Conversation(csm.model, csm.tokenizer, csm.mimi, speech=csm.speech, reuse_cache=False)
    fresh.history = conversation.history[:-1]
    again = fresh.say("And the second.", 1, max_audio_length_ms=480, temperature=0, codebooks=8).codes
    assert conversation.prefilled_rows[-1] < fresh.prefilled_rows[-1]
    np.testing.assert_array_equal(kept, again)
    with pytest.raises(OptionError, match="codebooks must be at most 32"):
        csm.generate("Hi", codebooks=33)
