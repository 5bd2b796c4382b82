"""The streaming engine (no ROS): frames in, Flash Memory updated, questions answered from it.

`StreamEngine` is one camera's pipeline (intake, sampler, frame worker, prefix builder, answers,
watch, persistence); `open_engine` loads a model and starts one. Several cameras on one model:
an `EngineHost` (`open_host`) owns the model and the GPU scheduler, `host.open_stream(name)` one
stream per camera. Parameters -> configs:
`settings`. The API: docs/engine.md; the threads and contracts: docs/architecture.md.
"""

from .host import EngineHost, open_host
from .stream_engine import (
    Answer,
    AnswerCancelled,
    AnswerTimeout,
    EngineConfig,
    EngineError,
    EngineStats,
    FrameError,
    QuestionError,
    StreamEngine,
    open_engine,
)

__all__ = [
    "EngineHost",
    "open_host",
    "Answer",
    "AnswerCancelled",
    "AnswerTimeout",
    "EngineConfig",
    "EngineError",
    "EngineStats",
    "FrameError",
    "QuestionError",
    "StreamEngine",
    "open_engine",
]
