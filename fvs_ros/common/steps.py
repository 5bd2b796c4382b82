"""Step generators: work done in pieces (a prefix build pauses between chunks), its result the
generator's return value."""

from typing import Generator, TypeVar

T = TypeVar("T")


def drain(steps: Generator[object, None, T]) -> T:
    """Run `steps` to its end without pausing; its return value."""
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value
