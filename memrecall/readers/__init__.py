"""Every way a question reads a document, one registered `Reader` each (see `base`).

Built in: the method's `gate`, `all`, `topk` (`method`), MemAgent's `memagent`
(`memagent`), the context baselines `full` and `rag` (`context`).
"""

# Registered in this order (`names`): the method's modes, MemAgent, the context baselines.
from memrecall.readers import method  # noqa: F401  pylint: disable=g-bad-import-order
from memrecall.readers import memagent  # noqa: F401
from memrecall.readers import context  # noqa: F401
from memrecall.readers.base import (BaselineConfig, BatchError, Reader, UnknownReaderError,
                                    check, chunked, describe, get, names, reader_class,
                                    register, rows_on, unregister)
from memrecall.readers.trajectory import TurnBatch, turn_logprobs

__all__ = ["BaselineConfig", "BatchError", "Reader", "TurnBatch", "UnknownReaderError", "check",
           "chunked", "describe", "get", "names", "reader_class", "register", "rows_on",
           "turn_logprobs", "unregister"]
