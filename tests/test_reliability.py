"""The user-facing contract under bad input, signals and failing disks.

Every bad input ends in one line on stderr naming the problem, exit code 2, no traceback, no
file left behind and the inputs untouched; Ctrl-C (130) and SIGTERM (143) stop at any moment
without leftovers; a rejected API call changes nothing for the calls after it.
"""

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import rustymimi
import soundfile as sf

from csm_mlx import CSM, Segment
from csm_mlx.audio import AudioError, AudioWriter
from csm_mlx.cli.main import main as cli_main
from csm_mlx.codec import Mimi
from csm_mlx.convert.convert import main as convert_main
from csm_mlx.hub import HubError
from csm_mlx.options import OptionError

from speech_fixtures import interruptible, write_voice

PYTHON = sys.executable
CLI = str(Path(sys.executable).parent / "csm-mlx")
CONVERT = str(Path(sys.executable).parent / "csm-mlx-convert")
SHORT = ["--max-audio-length-ms", "400"]


@pytest.fixture(scope="module")
def csm(hub_cache):
    return CSM.load(watermark=False)  # test_watermark.py tests the mark


@pytest.fixture
def ws(tmp_path, original_dir):
    """A workspace of the user's own files: text, scripts, recordings, and some bad ones."""
    (tmp_path / "lines.txt").write_text("Good morning.\nSee you.\n")
    (tmp_path / "script.txt").write_text("[0] Hello.\n[1] Hi.\n")
    (tmp_path / "bad_script.txt").write_text("Hello without a speaker.\n")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 cr\xe8me\n".encode("latin-1"))
    write_voice(tmp_path / "voice.wav")
    (tmp_path / "turn.json").write_text(json.dumps([{"speaker": 0, "text": "Hi.", "audio": "voice.wav"},
                                                   {"speaker": 1, "text": "Hello."}]))
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00garbage")
    sf.write(tmp_path / "nan.wav", np.full(4800, np.nan, np.float32), 24_000, subtype="FLOAT")
    sf.write(tmp_path / "long.wav", np.zeros(170 * 8000, np.int16), 8000)  # 170 s: more than the window
    (tmp_path / "a_dir").mkdir()
    (tmp_path / "a_file").write_text("not a directory")
    (tmp_path / "existing.wav").write_bytes(b"the user's own file")
    huge = tmp_path / "huge_model"
    huge.mkdir()
    config = json.loads((original_dir / "config.json").read_text())
    (huge / "config.json").write_text(json.dumps({
        "model_type": "csm_mlx", "dtype": "float32", "quantization": None,
        "model": {"backbone": {"num_layers": 1_000_000, "hidden_size": 2048, "num_heads": 32, "num_kv_heads": 8,
                               "intermediate_size": 8192},
                  "decoder": {"num_layers": 4, "hidden_size": 1024, "num_heads": 8, "num_kv_heads": 2,
                              "intermediate_size": 8192},
                  "text_vocab_size": config["text_vocab_size"]}}))
    write_user_files(tmp_path, config["text_vocab_size"])
    return tmp_path


# Fine-tuning configs (YAML), each with one mistake a user makes.
CONFIGS = {
    "iters_bool": "iters: true\n",
    "checkpoint_maybe": "grad_checkpoint: maybe\n",
    "lr_string": 'learning_rate: "1e-4x"\n',
    "lora_string": 'lora_parameters: "r8"\n',
    "layers_all": "num_layers: all\n",
    "seed_string": 'seed: "7"\n',
    "schedule_name": "lr_schedule: {name: warm_restarts, arguments: [1.0e-4, 100]}\n",
    "schedule_arity": "lr_schedule: {name: cosine_decay, arguments: [1.0e-4]}\n",
    "schedule_argument": "lr_schedule: {name: cosine_decay, arguments: [fast, 100]}\n",
    "qlora": "fine_tune_type: qlora\n",
    "typo": "learning_rat: 1e-4\n",
    "syntax": "iters: 10\n  batch_size: [\n",
    "a_list": "- iters\n- 10\n",
    "rank_0": "lora_parameters: {rank: 0}\n",
    "lora_typo": "lora_parameters: {rnk: 8}\n",
    "iters_0": "iters: 0\n",
}


def adapter_config_json(**change):
    config = {"fine_tune_type": "lora", "num_layers": -1, "lora_parameters": {"rank": 8, "scale": 1.0, "dropout": 0.0},
              "model": {"backbone": [2, 128, 4, 2, 32, 256], "decoder": [2, 64, 4, 2, 16, 128], "text_vocab_size": 128,
                        "audio_vocab_size": 2051, "audio_num_codebooks": 32}}
    return json.dumps({k: v for k, v in {**config, **change}.items() if v is not None})


ADAPTERS = {
    "no_layers": adapter_config_json(num_layers=None),
    "layers_string": adapter_config_json(num_layers="all"),
    "rank_string": adapter_config_json(lora_parameters={"rank": "8", "scale": 1.0}),
    "qlora": adapter_config_json(fine_tune_type="qlora"),
    "unknown_key": adapter_config_json(lora_alpha=16),
    "sizes_string": adapter_config_json(model={"backbone": "1b", "decoder": [2, 64, 4, 2, 16, 128],
                                               "text_vocab_size": 128, "audio_vocab_size": 2051,
                                               "audio_num_codebooks": 32}),
    "lora_without_parameters": adapter_config_json(lora_parameters=None),
    "bad_json": '{"fine_tune_type": "lora",\n "num_layers": }\n',
}


def write_user_files(ws: Path, text_vocab_size: int) -> None:
    """Training data, fine-tuning configs, adapters, model configs and special files with mistakes."""
    (ws / "data").mkdir()
    (ws / "data" / "train.jsonl").write_text(json.dumps({"audio": "../voice.wav", "text": "Hi.", "speaker": 0}) + "\n")
    (ws / "cfg").mkdir()
    for name, text in CONFIGS.items():
        (ws / "cfg" / f"{name}.yaml").write_text(text)
    (ws / "adapters").mkdir()
    for name, text in ADAPTERS.items():
        (ws / "adapters" / name).mkdir()
        (ws / "adapters" / name / "adapter_config.json").write_text(text)
    stack = {"num_layers": 2, "hidden_size": 128, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256}
    for name, rope in (("rope_string", {"rope_scaling": "llama3"}), ("rope_theta_string", {"rope_theta": "500k"}),
                       ("rope_factor", {"rope_scaling": {"rope_type": "llama3", "factor": "x"}})):
        (ws / name).mkdir()
        (ws / name / "config.json").write_text(json.dumps({
            "model_type": "csm_mlx", "dtype": "float32", "quantization": None,
            "model": {"backbone": {**stack, **rope}, "decoder": stack, "text_vocab_size": text_vocab_size}}))
    os.mkfifo(ws / "fifo")
    sf.write(ws / "one_hz.wav", np.zeros(100, np.float32), 1)


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(root.rglob("*"))}


# (argv, fragment of the one error line); {ws} is the workspace. All fail before a model is
# loaded or a file or directory is made.
CLI_CASES = [
    (["   ", "-o", "{ws}/out.wav"], "text is empty"),
    (["Hi"], "nowhere to put the audio"),
    (["Hi", "-o", "{ws}/out.mp3"], "must end in .wav or .flac"),
    (["Hi", "-o", "{ws}/a_dir"], "must end in .wav"),
    (["Hi", "-o", "{ws}/no/such/dir/out.wav"], "directory {ws}/no/such/dir does not exist"),
    (["Hi", "-o", "{ws}/a_file/out.wav"], "is not a directory"),
    (["Hi", "-o", "{ws}/out.wav", "--temperature", "nan"], "--temperature must be a finite number"),
    (["Hi", "-o", "{ws}/out.wav", "--temperature", "inf"], "--temperature must be a finite number"),
    (["Hi", "-o", "{ws}/out.wav", "--temperature", "-1"], "--temperature must be at least 0"),
    (["Hi", "-o", "{ws}/out.wav", "--top-k", "5000"], "--top-k must be at most 2048"),
    (["Hi", "-o", "{ws}/out.wav", "--top-k", "-3"], "--top-k must be at least 0"),
    (["Hi", "-o", "{ws}/out.wav", "--top-p", "1.5"], "--top-p must be at most 1"),
    (["Hi", "-o", "{ws}/out.wav", "--min-p", "nan"], "--min-p must be a finite number"),
    (["Hi", "-o", "{ws}/out.wav", "--seed", "-1"], "--seed must be at least 0"),
    (["Hi", "-o", "{ws}/out.wav", "--seed", str(2**64)], "--seed must be at most"),
    (["Hi", "-o", "{ws}/out.wav", "--seed", "1.5"], "invalid int value"),
    (["Hi", "-o", "{ws}/out.wav", "--max-audio-length-ms", "10"], "--max-audio-length-ms must be at least 80 ms"),
    (["Hi", "-o", "{ws}/out.wav", "--max-audio-length-ms", "inf"], "--max-audio-length-ms must be a finite number"),
    (["Hi", "-o", "{ws}/out.wav", "--max-audio-length-ms", "1e9"], "--max-audio-length-ms must be at most 163840 ms"),
    (["Hi", "-o", "{ws}/out.wav", "--stop-after-repeats", "0"], "--stop-after-repeats must be at least 1"),
    (["Hi", "-o", "{ws}/out.wav", "--chunk-chars", "-5"], "--chunk-chars must be at least 0"),
    (["Hi", "--play", "--stream-chunk-frames", "0"], "--stream-chunk-frames must be at least 1"),
    (["Hi", "-o", "{ws}/out.wav", "--speaker", "-1"], "must be a non-negative integer"),
    (["Hi", "-o", "{ws}/out.wav", "--voice", "nobody"], "--voice 'nobody' is not a voice preset of this model"),
    (["Hi\udcff", "-o", "{ws}/out.wav"], "text is not valid UTF-8"),
    (["Hi", "-o", "{ws}/out.wav", "--context-audio", "{ws}/missing.wav", "--context-text", "x"], "missing.wav does not exist"),
    (["Hi", "-o", "{ws}/out.wav", "--context-audio", "{ws}/corrupt.wav", "--context-text", "x"], "cannot read audio file"),
    (["Hi", "-o", "{ws}/out.wav", "--context-audio", "{ws}/nan.wav", "--context-text", "x"], "NaN or infinite samples"),
    (["Hi", "-o", "{ws}/out.wav", "--context-audio", "{ws}/long.wav", "--context-text", "x"], "is 170 s long"),
    (["Hi", "-o", "{ws}/out.wav", "--context-audio", "{ws}/a_dir", "--context-text", "x"], "a_dir is a directory"),
    (["Hi", "-o", "{ws}/out.wav", "--context-audio", "{ws}/voice.wav"], "whisper-large-v3-turbo is not in the local hub cache"),
    (["Hi", "-o", "{ws}/voice.wav", "--context-audio", "{ws}/voice.wav", "--context-text", "x"], "is also an input"),
    (["Hi", "-o", "{ws}/voice.wav", "--conversation", "{ws}/turn.json"], "is also an input"),
    (["Hi", "-o", "{ws}/out.wav", "--conversation", "{ws}/latin1.txt"], "is not UTF-8"),
    (["Hi", "-o", "{ws}/out.wav", "--model", "{ws}/no_model"], "model directory {ws}/no_model does not exist"),
    (["Hi", "-o", "{ws}/out.wav", "--model", "{ws}/a_file"], "is a file, not a model directory"),
    (["Hi", "-o", "{ws}/out.wav", "--model", "{ws}/huge_model"], "num_layers is 1000000"),
    (["Hi", "-o", "{ws}/out.wav", "--tokenizer", "{ws}/missing.json"], "missing.json does not exist"),
    (["dialogue", "{ws}/missing.txt", "-o", "{ws}/out.wav"], "missing.txt does not exist"),
    (["dialogue", "{ws}/bad_script.txt", "-o", "{ws}/out.wav"], "expected '[speaker] text'"),
    (["dialogue", "{ws}/latin1.txt", "-o", "{ws}/out.wav"], "is not UTF-8 text"),
    (["dialogue", "{ws}/script.txt", "-o", "{ws}/out.wav", "--pause-ms", "-1000", "--turns-dir", "{ws}/turns"],
     "--pause-ms must be at least 0"),
    (["dialogue", "{ws}/script.txt", "-o", "{ws}/out.wav", "--turns-dir", "{ws}/a_file"], "is not a directory"),
    (["dialogue", "{ws}/turn.json", "-o", "{ws}/voice.wav"], "is also an input"),
    (["dialogue", "{ws}/script.txt", "-o", "{ws}/out.wav", "--voice", "0=nobody"], "--voice 'nobody' is not a voice preset of this model"),
    (["dialogue", "{ws}/script.txt", "-o", "{ws}/out.wav", "--voice-audio", "0={ws}/voice.wav"], "needs --voice-text"),
    (["batch", "{ws}/lines.txt", "-o", "{ws}/out.wav", "--batch-size", "0"], "--batch-size must be at least 1"),
    (["batch", "{ws}/lines.txt", "-o", "{ws}/out.wav", "--batch-size", "100000"], "--batch-size must be at most 256"),
    (["batch", "{ws}/lines.txt", "--out-dir", "{ws}/a_file"], "is not a directory"),
    (["batch", "{ws}/latin1.txt", "-o", "{ws}/out.wav"], "is not UTF-8 text"),
    (["batch", "{ws}/lines.txt", "-o", "{ws}/out.wav", "--stop-after-repeats", "3"], "not supported with batch"),
    (["batch", "{ws}/lines.txt", "-o", "{ws}/voice.wav", "--context-audio", "{ws}/voice.wav", "--context-text", "x"],
     "is also an input"),
    (["batch", "{ws}/a_dir", "-o", "{ws}/out.wav"], "is a directory"),
    # the files a user hands over: fine-tuning configs, adapter configs, model configs
    *[(["finetune", "--data", "{ws}/data", "-c", f"{{ws}}/cfg/{name}.yaml"], f"config file {{ws}}/cfg/{name}.yaml" + fragment)
      for name, fragment in [
          ("iters_bool", ": iters must be a whole number, got True"),
          ("checkpoint_maybe", ": grad_checkpoint must be true or false, got 'maybe'"),
          ("lr_string", ": learning_rate must be a number, got '1e-4x'"),
          ("lora_string", ": lora_parameters must map names to values, got 'r8'"),
          ("layers_all", ": num_layers must be a whole number, got 'all'"),
          ("seed_string", ": seed must be a whole number, got '7'"),
          ("schedule_name", ": lr_schedule.name must be one of cosine_decay, exponential_decay"),
          ("schedule_argument", ": lr_schedule.arguments[0] must be a number, got 'fast'"),
          ("qlora", ": fine_tune_type must be one of lora, full, got 'qlora'"),
          ("typo", " has the unknown key 'learning_rat'"),
          ("syntax", " is not valid YAML (line 2, column 13: mapping values are not allowed here)"),
          ("a_list", " must map names to values"),
          ("rank_0", ": lora_parameters.rank must be at least 1, got 0"),
          ("lora_typo", ": lora_parameters has the unknown key 'rnk'"),
          ("iters_0", ": iters must be at least 1, got 0"),
          ("missing", " does not exist"),
      ]],
    (["finetune", "--data", "{ws}/data", "-c", "{ws}/cfg/schedule_arity.yaml"], "do not fit cosine_decay"),
    (["finetune", "--data", "{ws}/data", "-c", "{ws}/fifo"], "config file {ws}/fifo is not a regular file"),
    (["finetune", "--data", "{ws}/data", "--seed", "-1"], "--seed must be at least 0"),
    (["finetune", "--data", "{ws}/data", "--seed", str(2**64)], "--seed must be at most"),
    (["finetune", "--data", "{ws}/data", "--learning-rate", "inf"], "--learning-rate must be a finite number"),
    (["finetune", "--data", "{ws}/data", "--learning-rate", "0"], "--learning-rate must be more than 0"),
    (["finetune", "--data", "{ws}/data", "--lora-scale", "nan"], "--lora-scale must be a finite number"),
    (["finetune", "--data", "{ws}/data", "--depth-decoder-ratio", "2"], "--depth-decoder-ratio must be at most 1"),
    (["finetune", "--data", "{ws}/data", "--num-layers", "-5"], "--num-layers must be at least -1"),
    (["finetune", "--data", "{ws}/data", "--val-batches", "0"], "--val-batches must be -1 (all) or at least 1"),
    (["finetune", "--data", "{ws}/data", "--adapter-path", "{ws}/a_file"], "--adapter-path {ws}/a_file is a file"),
    (["Hi", "-o", "{ws}/out.wav", "--adapter-path", "{ws}/adapters/no_layers"], "adapter_config.json lacks the key 'num_layers'"),
    (["Hi", "-o", "{ws}/out.wav", "--adapter-path", "{ws}/adapters/qlora"], "fine_tune_type must be one of lora, full"),
    (["Hi", "-o", "{ws}/out.wav", "--adapter-path", "{ws}/adapters/bad_json"], "is not valid JSON (line 2, column 16"),
    (["Hi", "-o", "{ws}/out.wav", "--adapter-path", "{ws}/no_adapter"], "adapter directory {ws}/no_adapter does not exist"),
    (["dialogue", "{ws}/script.txt", "-o", "{ws}/out.wav", "--adapter-path", "{ws}/adapters/layers_string"],
     "adapter_config.json: num_layers must be a whole number, got 'all'"),
    (["dialogue", "{ws}/script.txt", "-o", "{ws}/out.wav", "--adapter-path", "{ws}/adapters/unknown_key"],
     "has the unknown key 'lora_alpha'"),
    (["batch", "{ws}/lines.txt", "-o", "{ws}/out.wav", "--adapter-path", "{ws}/adapters/rank_string"],
     "adapter_config.json: lora_parameters.rank must be a whole number, got '8'"),
    (["batch", "{ws}/lines.txt", "-o", "{ws}/out.wav", "--adapter-path", "{ws}/adapters/sizes_string"],
     "adapter_config.json: model.backbone must be a list, got '1b'"),
    (["batch", "{ws}/lines.txt", "-o", "{ws}/out.wav", "--adapter-path", "{ws}/adapters/lora_without_parameters"],
     "is a LoRA adapter without lora_parameters"),
    (["Hi", "-o", "{ws}/out.wav", "--model", "{ws}/rope_string"], "the backbone's RoPE scaling must map names to values"),
    (["Hi", "-o", "{ws}/out.wav", "--model", "{ws}/rope_theta_string"], "the backbone's rope_theta must be a number"),
    (["Hi", "-o", "{ws}/out.wav", "--model", "{ws}/rope_factor"], "the backbone's RoPE scaling: factor must be a number"),
    # special files: a FIFO would block the read, a 1 Hz file take minutes to resample
    (["Hi", "-o", "{ws}/out.wav", "--context-audio", "{ws}/fifo", "--context-text", "x"], "fifo is not a regular file"),
    (["verify", "{ws}/fifo"], "audio file {ws}/fifo is not a regular file"),
    (["verify", "{ws}/one_hz.wav"], "a sample rate of 1 Hz holds no speech band"),
]


@pytest.mark.parametrize("argv, fragment", CLI_CASES, ids=[" ".join(a)[:60] for a, _ in CLI_CASES])
def test_bad_cli_input_is_one_line_exit_2_and_leaves_nothing(ws, capsys, hub_cache, argv, fragment):
    before = snapshot(ws)
    argv = [a.format(ws=ws) for a in argv]
    try:
        code = cli_main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert fragment.format(ws=ws) in err, err
    assert "Traceback" not in err
    assert snapshot(ws) == before  # nothing made, nothing changed


def test_there_are_at_least_80_cases():
    assert len(CLI_CASES) >= 80


def run_cli(*argv, stdin=None, env=None, preexec_fn=interruptible):
    return subprocess.run([CLI, *map(str, argv)], input=stdin, capture_output=True, env=env,
                          preexec_fn=preexec_fn)


def test_non_utf8_standard_input(ws):
    before = snapshot(ws)
    result = run_cli("-o", ws / "out.wav", stdin=b"caf\xe9\n")
    err = result.stderr.decode()
    assert result.returncode == 2 and err.count("\n") == 1 and "standard input is not UTF-8" in err, err
    assert snapshot(ws) == before


def test_convert_errors_come_before_loading(ws, original_dir, capsys):
    """In-process: the same code as the command (its main), minus interpreter start-up."""
    cases = [
        (["--hf-path", original_dir, "--mlx-path", ws / "q3", "-q", "--q-bits", "3"], "--q-bits 3 is not supported"),
        (["--hf-path", original_dir, "--mlx-path", ws / "a_dir_full"], "already exists"),
        (["--hf-path", ws / "huge_model", "--mlx-path", ws / "out_model"], "num_layers is 1000000"),
        (["--hf-path", ws / "rope_string", "--mlx-path", ws / "out_model"], "RoPE scaling must map names to values"),
        (["--hf-path", original_dir, "--mlx-path", ws / "out_model", "--adapter-path", ws / "adapters" / "no_layers"],
         "lacks the key 'num_layers'"),
        (["--hf-path", original_dir, "--mlx-path", ws / "out_model", "--adapter-path", ws / "adapters" / "bad_json"],
         "is not valid JSON (line 2, column 16"),
    ]
    (ws / "a_dir_full").mkdir()
    (ws / "a_dir_full" / "keep").write_text("mine")
    for argv, fragment in cases:
        before = snapshot(ws)
        code = convert_main([str(a) for a in argv])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and fragment in err, err
        assert snapshot(ws) == before


def test_converted_model_and_outputs_get_normal_permissions(hub_cache, ws, transformers_dir):
    old = os.umask(0o022)
    try:
        assert run_cli("Hi", "-q", "-o", ws / "out.wav", *SHORT).returncode == 0
        result = subprocess.run([CONVERT, "--hf-path", str(transformers_dir), "--mlx-path", str(ws / "model"),
                                 "--dtype", "float32"], capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    finally:
        os.umask(old)
    assert (ws / "out.wav").stat().st_mode & 0o777 == 0o644
    assert (ws / "model").stat().st_mode & 0o777 == 0o755
    assert (ws / "model" / "model.safetensors").stat().st_mode & 0o777 == 0o644


def tmpfs(path: Path, size: str, readonly: bool = False) -> bool:
    """Mount a small tmpfs at path if this process may (root on Linux); False otherwise."""
    path.mkdir()
    options = f"size={size}" + (",ro" if readonly else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True).returncode == 0


def limit_file_size():
    interruptible()
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))


def test_full_disk_is_one_line_and_leaves_no_part_file(hub_cache, ws):
    disk = ws / "disk"
    mounted = tmpfs(disk, "64k")  # else the same failure as the writer sees it: a file-size limit
    try:
        result = run_cli("Hello there.", "-o", disk / "out.wav", "--max-audio-length-ms", "2000", "--temperature", "0",
                         preexec_fn=interruptible if mounted else limit_file_size)
        err = result.stderr.decode()
        listing = sorted(p.name for p in disk.iterdir())
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)])
    assert result.returncode == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert f"cannot write {disk / 'out.wav'}: " + ("no space left on device" if mounted else "file too large") in err
    assert listing == []


def full_disk(ws: Path, run):
    """run(disk, preexec_fn) on a 64 KiB disk (or under a 64 KiB file-size limit where nothing can be
    mounted): (its result, what the disk holds afterwards, the reason the write fails)."""
    disk = ws / "disk"
    mounted = tmpfs(disk, "64k")
    try:
        result = run(disk, interruptible if mounted else limit_file_size)
        listing = sorted(p.name for p in disk.iterdir())
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)])
    return result, listing, "no space left on device" if mounted else "file too large"


def test_full_disk_while_converting_is_one_line_and_leaves_nothing(ws, transformers_dir):
    result, listing, reason = full_disk(ws, lambda disk, preexec_fn: subprocess.run(
        [CONVERT, "--hf-path", str(transformers_dir), "--mlx-path", str(disk / "model"), "--dtype", "float32"],
        capture_output=True, text=True, preexec_fn=preexec_fn))
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"cannot write {ws / 'disk' / 'model'}: {reason}" in result.stderr, result.stderr
    assert listing == []


def test_full_disk_while_saving_adapters_is_one_line_and_leaves_nothing(ws, transformers_dir, tokenizer_path, mimi_path):
    result, listing, reason = full_disk(ws, lambda disk, preexec_fn: subprocess.run(
        [CLI, "finetune", "--data", str(ws / "data"), "--adapter-path", str(disk / "adapter"), "--iters", "1",
         "--batch-size", "1", "--lora-rank", "64", "--model", str(transformers_dir), "--tokenizer", str(tokenizer_path),
         "--mimi", str(mimi_path)], capture_output=True, text=True, preexec_fn=preexec_fn))
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert result.returncode == 2 and len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert f"cannot write {ws / 'disk' / 'adapter' / 'adapters.safetensors'}: {reason}" in errors[0]
    assert listing == []  # not even the adapter's config: a run that saved nothing leaves nothing


def test_nan_adapters_are_refused_when_loaded_or_fused(hub_cache, ws, transformers_dir, capsys):
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from csm_mlx import load_model
    from csm_mlx.finetune.adapters import adapter_config, prepare_model, save_adapters, save_config

    model = load_model(transformers_dir)[0]
    prepare_model(model, "lora", -1)
    name = next(k for k, _ in tree_flatten(model.trainable_parameters()) if k.endswith("lora_b"))
    model.load_weights([(name, mx.full(dict(tree_flatten(model.parameters()))[name].shape, float("nan")))], strict=False)
    adapter = ws / "nan_adapter"
    save_config(adapter, adapter_config(model, "lora", -1))
    save_adapters(model, adapter / "adapters.safetensors")
    before = snapshot(ws)
    assert cli_main(["Hi", "-o", str(ws / "out.wav"), "--adapter-path", str(adapter)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "holds NaN or infinite values" in err and name in err, err
    result = subprocess.run([CONVERT, "--hf-path", str(transformers_dir), "--mlx-path", str(ws / "fused"),
                             "--adapter-path", str(adapter)], capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "holds NaN or infinite values" in result.stderr
    assert snapshot(ws) == before


def test_read_only_directory(ws):
    target = ws / "ro"
    if not tmpfs(target, "64k", readonly=True):
        if os.geteuid() == 0:
            pytest.skip("root without mount: permissions do not bind root")
        target.chmod(0o500)
    try:
        result = run_cli("Hi", "-o", target / "out.wav")
    finally:
        subprocess.run(["umount", str(target)], capture_output=True)
    err = result.stderr.decode()
    assert result.returncode == 2 and err.count("\n") == 1 and "permission denied" in err, err


def wait_for_handler(pid: int, sig: int) -> None:
    """Until the process catches sig (Linux: /proc); elsewhere a pause long enough for start-up."""
    status = Path(f"/proc/{pid}/status")
    if not status.exists():
        time.sleep(1.0)
        return
    for _ in range(500):
        caught = next(line for line in status.read_text().splitlines() if line.startswith("SigCgt:"))
        if int(caught.split()[1], 16) >> (sig - 1) & 1:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never caught signal {sig}")


@pytest.mark.parametrize("sig, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_during_start_up(ws, sig, code, word):
    proc = subprocess.Popen([CLI, "Hi", "-o", str(ws / "out.wav")], stderr=subprocess.PIPE, text=True,
                            preexec_fn=interruptible)
    # the CLI catches SIGTERM from its first line on; MLX then takes seconds to load
    wait_for_handler(proc.pid, signal.SIGTERM)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code and err == f"csm-mlx: {word}\n", err
    assert not list(ws.glob(".*.part")) and not (ws / "out.wav").exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_generation_keeps_a_whole_file(hub_cache, ws, sig, code):
    out = ws / "existing.wav"
    proc = subprocess.Popen([CLI, "Hello there.", "-v", "-o", str(out), "--max-audio-length-ms", "150000"],
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    for line in proc.stderr:
        if "first audio after" in line:
            break
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "generated so far" in err and "Traceback" not in err
    info = sf.info(out)  # a whole, readable file replaced the old one
    assert info.frames > 0 and info.frames % 1920 == 0
    assert not list(ws.glob(".*.part"))


WRITE_FOREVER = """
import sys, numpy as np
from csm_mlx.audio import AudioWriter
from csm_mlx.cli.main import guarded

def body():
    with AudioWriter(sys.argv[1]) as writer:
        print("writing", flush=True)
        while True:
            writer.write(np.zeros(1920, np.float32))
    return 0

sys.exit(guarded("writer", body))
"""


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_a_write_leaves_the_old_file_and_no_part(ws, sig, code):
    out = ws / "existing.wav"
    proc = subprocess.Popen([PYTHON, "-c", WRITE_FOREVER, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=interruptible)
    assert proc.stdout.readline() == "writing\n"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert out.read_bytes() == b"the user's own file"
    assert not list(ws.glob(".*.part"))


def test_sigterm_during_batch_keeps_the_finished_lines(hub_cache, ws):
    # the third line is 20 chunks of 25 frames: the signal comes while it is being generated
    (ws / "many.txt").write_text("One.\nTwo.\n" + "A much longer third line. " * 20 + "\n")
    proc = subprocess.Popen([CLI, "batch", str(ws / "many.txt"), "-o", str(ws / "all.wav"), "--out-dir",
                             str(ws / "clips"), "--batch-size", "1", "--chunk-chars", "26", "--temperature", "0",
                             "--max-audio-length-ms", "2000"],
                            stderr=subprocess.PIPE, text=True, preexec_fn=interruptible)
    for line in proc.stderr:
        if line.startswith("line 2/3"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "wrote the 2 finished line(s)" in err
    assert sorted(p.name for p in (ws / "clips").iterdir()) == ["line_001.wav", "line_002.wav"]
    assert not list(ws.rglob(".*.part"))


API_CASES = [
    (lambda c: c.generate(""), OptionError, "text is empty"),
    (lambda c: c.generate(b"bytes"), OptionError, "text must be a string"),
    (lambda c: c.generate("Hi", top_k=5000), OptionError, "top_k must be at most 2048"),
    (lambda c: c.generate("Hi", temperature=float("nan")), OptionError, "temperature must be a finite number"),
    (lambda c: c.generate("Hi", speaker=True), OptionError, "speaker must be a whole number"),
    (lambda c: c.generate("Hi", seed=-1), OptionError, "seed must be at least 0"),
    (lambda c: c.generate("Hi", max_audio_length_ms=0), OptionError, "max_audio_length_ms must be at least 80"),
    (lambda c: c.generate("Hi", stop_after_repeats=0), OptionError, "stop_after_repeats must be at least 1"),
    (lambda c: c.generate("Hi", nonsense=1), TypeError, "nonsense"),
    (lambda c: list(c.stream("Hi", chunk_frames=0)), OptionError, "chunk_frames must be at least 1"),
    (lambda c: list(c.generate_many("a string")), OptionError, "texts must be a list of strings"),
    (lambda c: list(c.generate_many(["ok", " "])), OptionError, "texts[1] is empty"),
    (lambda c: list(c.generate_many(["ok"], batch_size=0)), OptionError, "batch_size must be at least 1"),
    (lambda c: c.generate_batch(["ok"], stop_after_repeats=0), OptionError, "stop_after_repeats must be at least 1"),
    (lambda c: c.generate("Hi", context=[Segment(0, "x", np.full(4800, np.nan))]), AudioError, "NaN or infinite"),
    (lambda c: c.generate("Hi", context=[Segment(0, "x", np.zeros((2, 4800)))]), AudioError, "mono"),
    (lambda c: c.generate("Hi", context=[Segment(0, "x", np.zeros(24_000 * 200))]), AudioError, "200 s long"),
    (lambda c: c.generate("Hi", context=[Segment(-1, "x")]), OptionError, "speaker must be at least 0"),
    (lambda c: c.generate("Hi", context="a voice"), OptionError, "context must be a list of Segments, got str"),
    (lambda c: c.generate("Hi", context=[(0, "x")]), OptionError, "context[0] must be a Segment, got tuple"),
    (lambda c: list(c.stream("Hi", context=Segment(0, "x"))), OptionError, "context must be a list of Segments"),
    (lambda c: c.generate_batch(["ok"], context=[{"speaker": 0}]), OptionError, "context[0] must be a Segment"),
    (lambda c: c.conversation([None]), OptionError, "context[0] must be a Segment, got NoneType"),
    (lambda c: c.dialogue(["Hi."]), OptionError, "turns[0] must be a Segment, got str"),
    (lambda c: c.dialogue([Segment(0, "Hi.")], voices=[0]), OptionError, "voices[0] must be a Segment, got int"),
    (lambda c: CSM.load(Path("/missing/model")), HubError, "model directory /missing/model does not exist"),
    (lambda c: CSM.load(42), OptionError, "model must be a hub id or a directory, got int"),
]

FRESH = """
import sys, numpy as np
from csm_mlx import CSM
csm = CSM.load(watermark=False)
greedy = csm.generate("Hello there.", max_audio_length_ms=480, temperature=0).codes
seeded = csm.generate("Hello there.", max_audio_length_ms=480, seed=7).codes
np.save(sys.argv[1], np.stack([greedy, seeded]))
"""


def test_rejected_api_calls_change_nothing_for_the_next_one(csm, hub_cache, tmp_path):
    for call, error, fragment in API_CASES:
        with pytest.raises(error) as raised:
            call(csm)
        assert fragment in str(raised.value)
    greedy = csm.generate("Hello there.", max_audio_length_ms=480, temperature=0).codes
    seeded = csm.generate("Hello there.", max_audio_length_ms=480, seed=7).codes
    subprocess.run([PYTHON, "-c", FRESH, str(tmp_path / "fresh.npy")], check=True)
    fresh = np.load(tmp_path / "fresh.npy")
    np.testing.assert_array_equal(greedy, fresh[0])
    np.testing.assert_array_equal(seeded, fresh[1])


def test_one_frame_cap(csm):
    assert csm.generate("Hi", max_audio_length_ms=80, temperature=0).codes.shape == (32, 1)


def test_writer_discards_on_error_and_keeps_the_old_file(tmp_path):
    out = tmp_path / "mine.wav"
    out.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with AudioWriter(out) as writer:
            writer.write(np.zeros(1920, np.float32))
            raise RuntimeError("a bug in the caller")
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["mine.wav"]


def test_streaming_decoder_restarts_past_its_positions(mimi_path):
    """A stream longer than the decoder's positions restarts with warm-up frames; small limits
    here (the real one, 4096 frames, is in benchmarks/long_audio.py)."""
    codes = np.random.default_rng(3).integers(0, 2048, (32, 20))
    limited = Mimi(mimi_path, stream_frames=8, warmup_frames=3)
    audio = limited.decode(codes)
    assert audio.shape == (20 * 1920,)
    plain = Mimi(mimi_path).decode(codes[:, :8])
    assert np.abs(audio[: 8 * 1920] - plain).max() <= 1e-5  # before the limit: the plain stream
    # frames 8..12 come from a fresh state fed frames 5..7 first
    fresh = Mimi(mimi_path)
    warmed = fresh.decode(codes[:, 5:13])[3 * 1920 :]
    assert np.abs(audio[8 * 1920 : 13 * 1920] - warmed).max() <= 1e-5
    assert np.abs(audio[8 * 1920 : 13 * 1920] - Mimi(mimi_path).decode(codes[:, 8:13])).max() > 1e-3


def test_one_pass_and_stepped_encode_give_the_same_codes(mimi_path):
    rng = np.random.default_rng(4)
    audio = (0.3 * np.sin(np.arange(130 * 1920 - 700) / 7) + 0.05 * rng.standard_normal(130 * 1920 - 700))
    mimi = Mimi(mimi_path)
    stepped = mimi.encode(audio)  # 130 frames: longer than ONE_PASS_ENCODE_FRAMES, stepped
    assert stepped.shape == (32, 130)
    one_pass = rustymimi.Tokenizer(str(mimi_path), num_codebooks=32).encode(
        np.ascontiguousarray(audio, np.float32).reshape(1, 1, -1))[0]
    np.testing.assert_array_equal(stepped, one_pass)


def test_memory_is_flat_over_100_generations(csm):
    import mlx.core as mx

    sizes = []
    for n in range(100):
        csm.generate("Hi.", max_audio_length_ms=160, temperature=0.9, seed=n)
        sizes.append(mx.get_active_memory())
    assert max(sizes[50:]) <= sizes[10] * 1.05 + 1e6
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for n in range(20):
        csm.generate("Hi.", max_audio_length_ms=160, temperature=0.9, seed=n)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss <= rss * 1.05
