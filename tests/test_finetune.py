"""Fine-tuning: learning, adapters (fresh, trained, saved, fused), the path from a folder of clips
to speech, and one-line errors for bad data."""

import json
import os

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np
import pytest
import soundfile as sf
from mlx.utils import tree_flatten

from csm_fixtures import TINY_ARGS, random_original_state, write_original
from speech_fixtures import write_voice
from csm_mlx import CSM, load_model
from csm_mlx.audio import read_audio
from csm_mlx.cli.main import main as cli_main
from csm_mlx.codec import Mimi
from csm_mlx.convert import convert
from csm_mlx.finetune.adapters import (ADAPTER_FILE, AdapterError, adapter_config, add_lora, fuse, load_adapters,
                                       prepare_model, save_config)
from csm_mlx.finetune.batches import iterate_batches
from csm_mlx.finetune.data import CACHE_DIR, Example, TrainingSegment, split_at_pauses
from csm_mlx.finetune.trainer import TrainingArgs, TrainingError, csm_loss, evaluate, train
from csm_mlx.models import FLAVORS, ModelArgs, TransformerArgs

TEXT = "Hello from MLX."


def tiny_examples(seed=0):
    rng = np.random.default_rng(seed)
    segment = lambda n_text, n_frames, train=True: TrainingSegment(
        rng.integers(0, TINY_ARGS.text_vocab_size, n_text).tolist(), rng.integers(0, 2048, (32, n_frames)).astype(np.int32),
        train)
    return [Example([segment(5, 6)], "x:1"), Example([segment(4, 3, train=False), segment(3, 5)], "x:2")]


def dataset_loss(model, examples):
    return evaluate(model, iterate_batches(examples, len(examples), depth_decoder_ratio=1.0, seed=0), -1)[0]


def logits(model, examples):
    """Teacher-forced logits of every sequence's frames after its text."""
    segment = examples[0].segments[0]
    tokens = np.zeros((len(segment.text_tokens), 33), np.int32)
    tokens[:, -1] = segment.text_tokens
    mask = np.zeros(tokens.shape, bool)
    mask[:, -1] = True
    return np.array(model.teacher_forced_logits(mx.array(tokens)[None], mx.array(mask)[None],
                                                mx.array(segment.audio_codes.T)[None]))


def frozen_weights(model):
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    return {k: np.array(v) for k, v in tree_flatten(model.parameters()) if k not in trainable}


@pytest.fixture(scope="module", params=["lora", "full"])
def trained(request, original_dir, tmp_path_factory):
    """A tiny model fine-tuned on two sequences, its loss before, and its frozen weights before."""
    mx.random.seed(0)
    model = load_model(original_dir)[0]
    examples = tiny_examples()
    before = dataset_loss(model, examples)
    prepare_model(model, request.param, num_layers=1, lora_parameters={"rank": 8, "scale": 2.0})
    frozen = frozen_weights(model)
    adapter_dir = tmp_path_factory.mktemp(request.param)
    save_config(adapter_dir, adapter_config(model, request.param, 1, {"rank": 8, "scale": 2.0}))
    args = TrainingArgs(batch_size=2, iters=60, steps_per_report=10, steps_per_save=1000,
                        adapter_file=str(adapter_dir / ADAPTER_FILE))
    reports = []
    steps = train(model, optim.Adam(learning_rate=1e-3), examples, examples, args, depth_decoder_ratio=0.5, seed=0,
                  on_report=reports.append)
    return dict(type=request.param, model=model, examples=examples, before=before, frozen=frozen,
                adapter_dir=adapter_dir, reports=reports, steps=steps)


def test_training_halves_the_loss(trained):
    after = dataset_loss(trained["model"], trained["examples"])
    assert trained["steps"] == 60
    assert after < trained["before"] / 2, (trained["before"], after)
    train_reports = [r for r in trained["reports"] if not r.validation]
    assert [r.iteration for r in train_reports] == [10, 20, 30, 40, 50, 60]
    r = train_reports[-1]
    assert r.loss == pytest.approx(r.backbone_loss + r.depth_decoder_loss, rel=1e-5)
    assert r.tokens_per_second > 0 and r.peak_memory > 0
    assert [r.iteration for r in trained["reports"] if r.validation] == [1, 60]


def test_frozen_weights_are_bit_identical_after_training(trained):
    now = frozen_weights(trained["model"])
    assert now.keys() == trained["frozen"].keys()
    assert "text_embeddings.weight" in now and "backbone.layers.0.mlp.up_proj.weight" in now  # layer 0 not trained
    for k, v in trained["frozen"].items():
        np.testing.assert_array_equal(now[k], v, err_msg=k)


def test_adapters_round_trip_and_fuse(trained, original_dir, tmp_path):
    """Saved and loaded, the adapter gives the trained model's logits exactly; fused into plain
    weights (in memory, and by csm-mlx-convert) it gives them to 1e-5 of the largest logit: fusing
    reassociates float32 sums (W x + s (x A) B -> (W + s A B) x), so only rounding may differ."""
    expected = logits(trained["model"], trained["examples"])
    loaded = load_adapters(load_model(original_dir)[0], trained["adapter_dir"])
    np.testing.assert_array_equal(logits(loaded, trained["examples"]), expected)
    base = logits(load_model(original_dir)[0], trained["examples"])
    assert np.abs(expected - base).max() > 0.1  # the adapter changes the model
    tolerance = 1e-5 * np.abs(expected).max()
    assert np.abs(logits(fuse(loaded), trained["examples"]) - expected).max() <= tolerance
    converted = convert(str(original_dir), tmp_path / "fused", dtype="float32", adapter_path=str(trained["adapter_dir"]))
    assert np.abs(logits(load_model(converted)[0], trained["examples"]) - expected).max() <= tolerance


def test_fresh_lora_gives_the_base_logits_exactly(original_dir):
    examples = tiny_examples()
    model = load_model(original_dir)[0]
    base = logits(model, examples)
    add_lora(model, -1, {"rank": 8, "scale": 2.0, "dropout": 0.0})
    assert any(".lora_a" in k for k, _ in tree_flatten(model.trainable_parameters()))
    np.testing.assert_array_equal(logits(model, examples), base)


def test_interrupt_saves_the_adapters_so_far(original_dir, tmp_path):
    model = load_model(original_dir)[0]
    prepare_model(model, "lora", -1, {"rank": 4, "scale": 1.0})

    def batches(*args):
        for n, batch in enumerate(iterate_batches(*args)):
            if n == 3:
                raise KeyboardInterrupt
            yield batch

    with pytest.raises(KeyboardInterrupt):
        train(model, optim.Adam(learning_rate=1e-3), tiny_examples(), None,
              TrainingArgs(batch_size=1, iters=10, adapter_file=str(tmp_path / ADAPTER_FILE)), batches=batches)
    saved = mx.load(str(tmp_path / ADAPTER_FILE))
    trainable = dict(tree_flatten(model.trainable_parameters()))
    assert saved.keys() == trainable.keys()
    for k, v in trainable.items():
        np.testing.assert_array_equal(np.array(saved[k]), np.array(v))
    assert np.abs(np.array(saved["decoder.layers.0.mlp.up_proj.lora_b"])).max() > 0  # three steps were taken


def test_split_at_pauses_cuts_between_sentences():
    rate = 24_000
    t = np.arange(4 * rate) / rate
    speech = [0.3 * np.sin(2 * np.pi * f * t) for f in (200, 300, 400)]
    pause = np.zeros(rate // 2)
    audio = np.concatenate([speech[0], pause, speech[1], pause, speech[2]]).astype(np.float32)
    text = "One two three four five. Six seven eight nine ten! Eleven twelve thirteen fifteen?"
    pieces = split_at_pauses(audio, text, max_seconds=6)
    assert [p[2] for p in pieces] == ["One two three four five.", "Six seven eight nine ten!",
                                      "Eleven twelve thirteen fifteen?"]
    assert [round(p[0] / rate, 2) for p in pieces] == [0, 4.25, 8.75]
    assert pieces[-1][1] == len(audio)
    # up to 10 s a piece: the first two sentences stay together
    assert [p[2] for p in split_at_pauses(audio, text, max_seconds=10)] == [
        "One two three four five. Six seven eight nine ten!", "Eleven twelve thirteen fifteen?"]
    # one sentence, or no pause: no cut
    assert split_at_pauses(audio, "One long sentence without an end", 6) is None
    assert split_at_pauses(np.concatenate(speech).astype(np.float32), text, 6) is None


@pytest.fixture
def data_dir(tmp_path):
    write_voice(tmp_path / "clips" / "a.wav", seconds=0.5, seed=3)
    (tmp_path / "train.jsonl").write_text(json.dumps({"audio": "clips/a.wav", "text": TEXT, "speaker": 0}) + "\n")
    return tmp_path


def model_flags(original_dir, tokenizer_path, mimi_path):
    return ["--model", str(original_dir), "--tokenizer", str(tokenizer_path), "--mimi", str(mimi_path)]


def test_fine_tuned_on_one_clip_speaks_it(hub_cache, data_dir, original_dir, tokenizer_path, mimi_path, tmp_path, capsys):
    """The whole path: a folder with a clip and train.jsonl -> csm-mlx finetune -> the adapter in
    CSM.load and csm-mlx -> greedy generation gives the clip's codes, then its end of speech."""
    flags = model_flags(original_dir, tokenizer_path, mimi_path)
    adapter = tmp_path / "adapter"
    (tmp_path / "config.yaml").write_text("lora_parameters: {rank: 16, scale: 2.0}\nlearning_rate: 0.002\n")
    code = cli_main(["finetune", "--data", str(data_dir), "--adapter-path", str(adapter), "--iters", "100",
                     "--batch-size", "1", "--depth-decoder-ratio", "1", "--steps-per-report", "50",
                     "-c", str(tmp_path / "config.yaml"), *flags])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "step 100: loss" in err and "backbone" in err and "tokens/s" in err and "peak memory" in err
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["lora_parameters"]["rank"] == 16 and config["lora_parameters"]["scale"] == 2.0
    assert config["learning_rate"] == 0.002 and (adapter / "0000100_adapters.safetensors").is_file()
    umask = os.umask(0)
    os.umask(umask)
    for written in (adapter / ADAPTER_FILE, adapter / "adapter_config.json", *(data_dir / CACHE_DIR).iterdir()):
        assert written.stat().st_mode & 0o777 == 0o666 & ~umask, written  # the usual mode, not mkstemp's 0600

    mimi = Mimi(mimi_path)
    clip_codes = np.load(next((data_dir / CACHE_DIR).glob("*.npy")))
    np.testing.assert_array_equal(clip_codes, mimi.encode(read_audio(data_dir / "clips" / "a.wav")))

    csm = CSM.load(str(original_dir), tokenizer=tokenizer_path, mimi=mimi_path, adapter_path=adapter)
    speech = csm.generate(TEXT, speaker=0, temperature=0)
    np.testing.assert_array_equal(speech.codes, clip_codes)

    out = tmp_path / "out.wav"
    assert cli_main([TEXT, "-o", str(out), "--temperature", "0", "--adapter-path", str(adapter), "-q",
                     "--no-watermark", *flags]) == 0  # unmarked, to compare with the clip's decoded codes
    np.testing.assert_array_equal(sf.read(out, dtype="float32")[0], mimi.decode(clip_codes))


def test_prepared_codes_are_cached_and_reused(data_dir, original_dir, tokenizer_path, mimi_path):
    from csm_mlx.finetune.data import prepare
    from csm_mlx.tokenizer import TextTokenizer

    mimi, tokenizer = Mimi(mimi_path), TextTokenizer(tokenizer_path)
    first = prepare(data_dir / "train.jsonl", mimi, tokenizer, 2048)
    cached = {p: p.stat().st_mtime_ns for p in (data_dir / CACHE_DIR).glob("*.npy")}
    assert len(cached) == 1
    again = prepare(data_dir / "train.jsonl", mimi, tokenizer, 2048)
    assert {p: p.stat().st_mtime_ns for p in (data_dir / CACHE_DIR).glob("*.npy")} == cached
    np.testing.assert_array_equal(again[0].segments[0].audio_codes, first[0].segments[0].audio_codes)
    assert again[0].segments[0].text_tokens == tokenizer.encode(TEXT, 0)
    write_voice(data_dir / "clips" / "a.wav", seconds=0.5, seed=4)  # the clip changed: encoded again
    prepare(data_dir / "train.jsonl", mimi, tokenizer, 2048)
    assert len(list((data_dir / CACHE_DIR).glob("*.npy"))) == 2


def bad_line(data_dir, line):
    (data_dir / "train.jsonl").write_text(line + "\n")


@pytest.mark.parametrize("case, expected", [
    ("missing audio", "train.jsonl:1: audio file"),
    ("unreadable audio", "train.jsonl:1: cannot read audio file"),
    ("no transcript", "train.jsonl:1: clip clips/a.wav has no transcript"),
    ("empty", "train.jsonl holds no clips"),
    ("no train.jsonl", "has no train.jsonl"),
    ("too long", "train.jsonl:1: "),
    ("bad json", "train.jsonl:1: not valid JSON"),
    ("unknown key", "train.jsonl:1: unknown key 'speaker_id'"),
])
def test_bad_data_is_a_one_line_error(case, expected, data_dir, original_dir, tokenizer_path, mimi_path, tmp_path,
                                      capsys):
    if case == "missing audio":
        bad_line(data_dir, json.dumps({"audio": "clips/missing.wav", "text": TEXT}))
    elif case == "unreadable audio":
        (data_dir / "clips" / "bad.wav").write_bytes(b"RIFF not audio")
        bad_line(data_dir, json.dumps({"audio": "clips/bad.wav", "text": TEXT}))
    elif case == "no transcript":
        bad_line(data_dir, json.dumps({"audio": "clips/a.wav", "text": " "}))
    elif case == "empty":
        bad_line(data_dir, "")
    elif case == "no train.jsonl":
        (data_dir / "train.jsonl").unlink()
    elif case == "too long":  # 170 s of noise: no pause to cut at, more than 2048 rows
        noise = np.random.default_rng(0).uniform(-0.3, 0.3, 170 * 8000).astype(np.float32)
        sf.write(data_dir / "clips" / "long.wav", noise, 8000)
        bad_line(data_dir, json.dumps({"audio": "clips/long.wav", "text": TEXT}))
    elif case == "bad json":
        bad_line(data_dir, '{"audio": "clips/a.wav", "text": ')
    elif case == "unknown key":
        bad_line(data_dir, json.dumps({"audio": "clips/a.wav", "text": TEXT, "speaker_id": 1}))
    adapter = tmp_path / "adapter"
    code = cli_main(["finetune", "--data", str(data_dir), "--adapter-path", str(adapter), "--iters", "1",
                     "--batch-size", "1", *model_flags(original_dir, tokenizer_path, mimi_path)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("csm-mlx: error: ") and expected in lines[0], err
    if case == "too long":
        assert "2048-row window" in lines[0] and "long.wav (170.0 s)" in lines[0]
    assert not (adapter / ADAPTER_FILE).exists()


def test_adapter_for_another_model_is_a_one_line_error(original_dir, tmp_path, tokenizer_path, mimi_path, capsys):
    FLAVORS["tiny-backbone-wide"] = TransformerArgs(num_layers=2, hidden_size=192, num_heads=4, num_kv_heads=2,
                                                    intermediate_size=256)
    other_args = ModelArgs.from_flavors("tiny-backbone-wide", "tiny-decoder", text_vocab_size=TINY_ARGS.text_vocab_size)
    other_dir = write_original(tmp_path / "other", random_original_state(other_args), other_args,
                               "tiny-backbone-wide", "tiny-decoder")
    other = load_model(other_dir)[0]
    prepare_model(other, "lora", -1)
    adapter = tmp_path / "adapter"
    save_config(adapter, adapter_config(other, "lora", -1))
    from csm_mlx.finetune.adapters import save_adapters
    save_adapters(other, adapter / ADAPTER_FILE)

    with pytest.raises(AdapterError, match="was made for another model"):
        load_adapters(load_model(original_dir)[0], adapter)
    out = tmp_path / "out.wav"
    code = cli_main([TEXT, "-o", str(out), "--adapter-path", str(adapter),
                     *model_flags(original_dir, tokenizer_path, mimi_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "was made for another model" in err[0] and "192" in err[0]
    assert not out.exists()


def test_grad_checkpoint_trains_the_same(original_dir, tmp_path):
    """Recomputing the blocks in the backward pass changes memory, not the result; the patch
    mlx-lm's checkpointing puts on the block class is undone after training."""
    from mlx_lm.models import llama

    block_call = llama.TransformerBlock.__call__
    trained = []
    for checkpoint in (False, True):
        mx.random.seed(0)
        model = load_model(original_dir)[0]
        prepare_model(model, "lora", -1, {"rank": 4, "scale": 1.0})
        train(model, optim.Adam(learning_rate=1e-3), tiny_examples(), None,
              TrainingArgs(batch_size=2, iters=3, grad_checkpoint=checkpoint, adapter_file=str(tmp_path / ADAPTER_FILE)),
              seed=0)
        trained.append(dict(tree_flatten(model.trainable_parameters())))
    assert llama.TransformerBlock.__call__ is block_call
    for k, v in trained[0].items():
        np.testing.assert_allclose(np.array(trained[1][k]), np.array(v), atol=1e-6, err_msg=k)
    assert np.abs(np.array(trained[0]["backbone.layers.1.mlp.down_proj.lora_b"])).max() > 0


def test_conversation_lines_mark_context_turns(data_dir):
    from csm_mlx.finetune.data import DataError, read_lines

    turn = lambda speaker, train: {"audio": "clips/a.wav", "text": f"Turn of {speaker}.", "speaker": speaker,
                                   "train": train}
    bad_line(data_dir, json.dumps({"segments": [turn(1, False), turn(0, True)]}))
    [(where, turns)] = read_lines(data_dir / "train.jsonl")
    assert where.endswith("train.jsonl:1") and [(t.speaker, t.train) for t in turns] == [(1, False), (0, True)]
    bad_line(data_dir, json.dumps({"segments": [turn(1, False)]}))
    with pytest.raises(DataError, match="train.jsonl:1: every turn is marked"):
        read_lines(data_dir / "train.jsonl")
    bad_line(data_dir, json.dumps({"segments": [turn(1, "no")]}))
    with pytest.raises(DataError, match="train.jsonl:1: turn 1: \"train\" must be true or false"):
        read_lines(data_dir / "train.jsonl")


def nan_from_step(first_nan):
    """csm_loss until step first_nan, then a NaN loss (what a diverged run gives)."""
    calls = []

    def loss(model, *batch):
        calls.append(1)
        total, backbone, depth, rows = csm_loss(model, *batch)
        return (total * float("nan") if len(calls) >= first_nan else total), backbone, depth, rows

    return loss


def test_a_nan_loss_stops_training_and_keeps_the_last_finite_save(original_dir, tmp_path):
    model = load_model(original_dir)[0]
    prepare_model(model, "lora", -1, {"rank": 4, "scale": 1.0})
    with pytest.raises(TrainingError, match=r"the loss is nan at step 3.*adapters of step 2 stay in"):
        train(model, optim.Adam(learning_rate=1e-3), tiny_examples(), None,
              TrainingArgs(batch_size=1, iters=10, steps_per_save=2, adapter_file=str(tmp_path / ADAPTER_FILE)),
              loss=nan_from_step(3))
    saved = mx.load(str(tmp_path / ADAPTER_FILE))
    assert all(np.isfinite(np.array(v)).all() for v in saved.values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["0000002_" + ADAPTER_FILE, ADAPTER_FILE]


def test_a_run_that_diverges_before_saving_leaves_nothing(data_dir, original_dir, tokenizer_path, mimi_path, tmp_path,
                                                          capsys, monkeypatch):
    import csm_mlx.cli.finetune as command

    monkeypatch.setattr(command, "train", lambda *args, **kwargs: train(*args, **kwargs, loss=nan_from_step(1)))
    adapter = tmp_path / "adapter"
    code = cli_main(["finetune", "--data", str(data_dir), "--adapter-path", str(adapter), "--iters", "3",
                     "--batch-size", "1", *model_flags(original_dir, tokenizer_path, mimi_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("csm-mlx: error: the loss is nan at step 1") and "Traceback" not in err
    assert "no adapters were saved" in err[-1] and not adapter.exists()


def test_finetune_needs_no_watermark_weights(data_dir, transformers_dir, tokenizer_path, mimi_path, tmp_path):
    """Training makes no audio: offline with an empty hub cache it runs without SilentCipher's weights."""
    import subprocess
    import sys
    from pathlib import Path

    empty = tmp_path / "empty-hub"
    empty.mkdir()
    result = subprocess.run([str(Path(sys.executable).parent / "csm-mlx"), "finetune", "--data", str(data_dir),
                             "--adapter-path", str(tmp_path / "adapter"), "--iters", "1", "--batch-size", "1",
                             *model_flags(transformers_dir, tokenizer_path, mimi_path)],
                            capture_output=True, text=True, env={**os.environ, "HF_HUB_CACHE": str(empty),
                                                                 "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "adapter" / ADAPTER_FILE).is_file()
