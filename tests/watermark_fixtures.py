"""Random SilentCipher weights in the true layout, made with SilentCipher's own modules and
saved with torch.save as the hub's .ckpt files are, and the reference model built on them."""

import warnings
from pathlib import Path

import torch
import yaml

from csm_mlx.watermark import CHECKPOINTS, HPARAMS

# hparams.yaml of the 44.1 kHz model (the keys this port checks, and the reference's default SDR)
REFERENCE_HPARAMS = {**HPARAMS, "message_sdr": 47, "model_type": "44.1k"}


def reference_modules():
    """SilentCipher's carrier encoder, carrier decoder and message decoder (the classes the
    hub checkpoints were saved from), sized as its Model builds them for the 44.1 kHz config."""
    from argparse import Namespace

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydub: no ffmpeg (not needed here)
        from silentcipher.model import CarrierDecoder, Encoder, MsgDecoder

    config = Namespace(**REFERENCE_HPARAMS)
    return {
        "encoder": Encoder(n_layers=3, message_dim=5, out_dim=32, message_band_size=1024, n_fft=4096),
        "decoder": CarrierDecoder(config, conv_dim=96, n_layers=4, message_band_size=1024),
        "message_decoder": MsgDecoder(message_dim=5, message_band_size=1024),
    }


def write_silentcipher(directory: Path, seed: int = 0, prefix_module: bool = True) -> Path:
    """enc_c.ckpt, dec_c.ckpt, dec_m_0.ckpt and hparams.yaml with random weights. BatchNorm's
    affine parameters and running statistics are random too (training-mode BatchNorm must not
    use the running ones). prefix_module saves the message decoder with DataParallel's
    "module." prefix, which the reference strips."""
    torch.manual_seed(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for name, module in reference_modules().items():
        for key, tensor in module.state_dict().items():
            if key.endswith("bn.weight"):
                tensor.uniform_(0.5, 1.5)
            elif key.endswith(("bn.bias", "running_mean")):
                tensor.normal_(0, 0.3)
            elif key.endswith("running_var"):
                tensor.uniform_(0.5, 2.0)
            elif key.endswith("num_batches_tracked"):
                tensor.fill_(73999)
        state = module.state_dict()
        if prefix_module and name == "message_decoder":
            state = type(state)((f"module.{k}", v) for k, v in state.items())
        torch.save(state, directory / CHECKPOINTS[name])
    (directory / "hparams.yaml").write_text(yaml.safe_dump(REFERENCE_HPARAMS))
    return directory


def reference_model(directory: Path):
    """SilentCipher's own Model (server.py) on the weights in directory, on the CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import silentcipher

        return silentcipher.get_model(model_type="44.1k", ckpt_path=str(directory),
                                      config_path=str(directory / "hparams.yaml"), device="cpu")
