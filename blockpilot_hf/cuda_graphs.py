"""Replay a decoding step as one CUDA graph instead of hundreds of small kernel launches.

A small target spends most of an eager forward on a GPU launching kernels, whether it reads 1 token or 32. A step
whose inputs and outputs live in fixed tensors can be captured once and replayed for the cost of the kernels alone. `StepGraph` does that for the two steps of the decoding loop (draft and verify); the
loop writes each step's inputs into the step's tensors in place and reads its outputs from the tensors the capture
returned.
"""

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)


class StepGraph:
    """Calls `step()`, a function of no arguments that reads and writes tensors whose addresses never change.

    With `enabled=True` (CUDA only) the first call runs `step` twice on a side stream (CUDA graphs must not capture
    first-use work such as cuBLAS workspace allocation), captures it, and replays it; later calls only replay. If
    capture fails (an op that synchronises with the host, an unsupported kernel), the step runs eagerly from then on,
    with a warning: outputs are identical either way, only slower.

    Args:
        step (`Callable[[], Any]`): the step; it must be idempotent (running it twice on the same inputs gives the same
            outputs and leaves the same state), since warm-up runs it before capture.
        enabled (`bool`): capture on CUDA; `False` runs `step` eagerly every time.
        pool: a CUDA graph memory pool shared with the other steps of the same loop.
    """

    def __init__(self, step, enabled: bool, pool=None):
        self.step = step
        self.enabled = enabled and torch.cuda.is_available()
        self.pool = pool
        self.graph = None
        self.outputs = None

    def __call__(self):
        if not self.enabled:
            return self.step()
        if self.graph is None:
            try:
                self._capture()
            except Exception as error:  # noqa: BLE001 - any capture failure means "run eagerly"
                logger.warning(
                    f"CUDA graph capture failed ({type(error).__name__}: {error}); running this step eagerly."
                )
                self.enabled, self.graph = False, None
                torch.cuda.synchronize()
                return self.step()
        self.graph.replay()
        return self.outputs

    def _capture(self) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.outputs = self.step()
        self.graph = graph
