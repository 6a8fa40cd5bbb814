"""Mimi's codes of the user's turn, made while the MLX thread transcribes it.

CSM's context holds the user's turn as Mimi codes. Encoding it on the MLX thread after the
transcript would add its time to the way to the first audio (~0.9 s for 3.6 s of speech on a
2-core x86 VM); here it runs on a thread and a Mimi instance of its own (rustymimi runs no MLX,
so Metal's one-thread rule does not bind it, and it lets go of the GIL while it works), started
when the turn ends, so the turn waits for the longer of the two, not their sum.

Not encoded while the user speaks: a streaming encoder's state cannot be rewound for the next turn
(rustymimi's reset() keeps the positions its attention has used, and the codes change), and a
fresh instance per turn holds the GIL while it loads (~0.5 s here), which would stall the audio
threads.
"""

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from ..codec import Mimi


class TurnEncoder:
    """encode(audio) -> a Future of Mimi.encode(audio), made on the encoder's own thread."""

    def __init__(self, mimi_path, num_codebooks: int):
        self._mimi = Mimi(mimi_path, num_codebooks)
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="csm-mlx turn encoder")

    def encode(self, audio: np.ndarray) -> "Future[np.ndarray]":
        return self._thread.submit(self._mimi.encode, np.array(audio, np.float32))

    def close(self) -> None:
        self._thread.shutdown()
