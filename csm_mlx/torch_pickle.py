"""Reading PyTorch checkpoints (`torch.save` zip files of tensors) without torch and without
running anything they contain.

A torch checkpoint is a pickle, and unpickling can call any importable function. This reader
rebuilds tensors only: its unpickler resolves exactly the globals a state dict of tensors needs
(the tensor rebuild function, OrderedDict, the storage types) and refuses every other one before
it is called; tensor data is read from the zip entries as NumPy arrays.
"""

import collections
import os
import pickle
import zipfile
from typing import Dict

import numpy as np


class TorchCheckpointError(ValueError):
    """A file that is not a plain torch checkpoint of tensors; the message says why."""


# torch storage classes -> the NumPy dtype of their elements
STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


def _rebuild_tensor(storage: np.ndarray, offset: int, size, stride, *_):
    """torch._utils._rebuild_tensor_v2: a strided view of a storage, here copied out contiguous."""
    if not size:
        return np.array(storage[offset])
    itemsize = storage.itemsize
    end = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or end > storage.size or min(stride) < 0:
        raise TorchCheckpointError("a tensor reaches outside its storage")
    return np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride)).copy()


class _TensorUnpickler(pickle.Unpickler):
    ALLOWED = {("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor, ("collections", "OrderedDict"): collections.OrderedDict}

    def __init__(self, file, archive: zipfile.ZipFile, prefix: str, byteorder: str, name: str):
        super().__init__(file)
        self.archive, self.prefix, self.byteorder, self.name = archive, prefix, byteorder, name
        self.storages: Dict[str, np.ndarray] = {}

    def find_class(self, module, name):
        if module == "torch" and name in STORAGE_DTYPES:
            return np.dtype(STORAGE_DTYPES[name])
        if (module, name) in self.ALLOWED:
            return self.ALLOWED[(module, name)]
        raise TorchCheckpointError(f"{self.name} refers to {module}.{name}, which a checkpoint of tensors never "
                                   "needs: refusing to load it (it may run code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], np.dtype)):
            raise TorchCheckpointError(f"{self.name} holds an unknown storage reference {pid!r:.80}")
        _, dtype, key, _location, numel = pid
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.prefix}data/{key}")
            except KeyError:
                raise TorchCheckpointError(f"{self.name} lacks the data of storage {key}") from None
            storage = np.frombuffer(raw, dtype.newbyteorder("<" if self.byteorder == "little" else ">"))
            if storage.size < numel:
                raise TorchCheckpointError(f"{self.name}: storage {key} is shorter than it says")
            self.storages[key] = storage.astype(dtype, copy=False)
        return self.storages[key]


def load_torch_checkpoint(path: os.PathLike) -> Dict[str, np.ndarray]:
    """The tensors of a torch.save'd state dict, as NumPy arrays by name."""
    name = os.fspath(path)
    try:
        with zipfile.ZipFile(path) as archive:
            pickles = [n for n in archive.namelist() if n == "data.pkl" or n.endswith("/data.pkl")]
            if len(pickles) != 1:
                raise TorchCheckpointError(f"{name} is not a torch checkpoint (no single data.pkl inside)")
            prefix = pickles[0][: -len("data.pkl")]
            try:
                byteorder = archive.read(f"{prefix}byteorder").decode().strip()
            except KeyError:
                byteorder = "little"
            with archive.open(pickles[0]) as f:
                state = _TensorUnpickler(f, archive, prefix, byteorder, name).load()
    except TorchCheckpointError:
        raise
    except FileNotFoundError:
        raise TorchCheckpointError(f"{name} does not exist") from None
    except (zipfile.BadZipFile, EOFError, pickle.UnpicklingError, OSError, TypeError, ValueError, IndexError,
            KeyError, AttributeError) as e:
        raise TorchCheckpointError(f"{name} is not a readable torch checkpoint ({e}): is it truncated? "
                                   "download it again") from None
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in state.items()):
        raise TorchCheckpointError(f"{name} is not a state dict of tensors")
    return dict(state)
