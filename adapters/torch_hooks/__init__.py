"""The reference backend: plain forward hooks on any ``torch.nn.Module``.

Every other backend is held to this one, so it is kept simple and obviously correct:
one forward pass (or one greedy ``generate`` call) per run, in dependency order, with a
hook per touched module that applies the run's ops in the order they were written.

Generation: an op applies on the prompt pass and on every generated step. Its positions
are absolute: non-negative positions count from the start of the prompt, negative ones
from the end of the prompt; ``pos=None`` touches every position, generated ones included.
Reads in a generating run see every position fed to the model (prompt plus generated
tokens but the last), concatenated along the position axis.
"""

from .backend import TorchHooksBackend

__all__ = ["TorchHooksBackend"]
