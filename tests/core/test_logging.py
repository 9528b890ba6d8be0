"""Log lines: batched per turn of the event loop, never split, never lost, formatted as before."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import pytest

from keel.core.observability import PIPE_BUF, LoopBatchedHandler, TextFormatter, _chunks


class RecordingStream:
    """A stream that remembers what each flush sent: one entry per write(2) a real one makes."""

    def __init__(self) -> None:
        self.pending = ""
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.pending += text
        return len(text)

    def flush(self) -> None:
        if self.pending:
            self.writes.append(self.pending)
            self.pending = ""


@pytest.fixture
def stream() -> Iterator[RecordingStream]:
    yield RecordingStream()


@pytest.fixture
def logger(stream: RecordingStream) -> Iterator[logging.Logger]:
    handler = LoopBatchedHandler(stream)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    log = logging.getLogger(f"keel.test.batched.{id(stream)}")
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    yield log
    log.handlers.clear()


async def _end_of_this_turn() -> None:
    """Callbacks run in the order they were scheduled: when this one has run, so has the
    handler's, which was scheduled by the first line of this turn."""
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, None)
    await done


async def test_lines_logged_in_one_turn_are_written_together(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    for n in range(3):
        logger.info("request %d", n)
    assert stream.writes == []
    await _end_of_this_turn()
    assert stream.writes == ["INFO request 0\nINFO request 1\nINFO request 2\n"]
    logger.info("next turn")
    await _end_of_this_turn()
    assert stream.writes[1:] == ["INFO next turn\n"]


async def test_a_warning_goes_out_at_once_with_what_came_before(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    logger.info("before")
    logger.warning("trouble")
    assert stream.writes == ["INFO before\nWARNING trouble\n"]
    await _end_of_this_turn()
    assert stream.writes == ["INFO before\nWARNING trouble\n"]


async def test_flush_writes_what_is_buffered(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    """logging.shutdown() flushes every handler at exit: nothing buffered is lost."""
    logger.info("last words")
    logger.handlers[0].flush()
    assert stream.writes == ["INFO last words\n"]


def test_lines_from_a_thread_without_a_loop_go_out_at_once(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    thread = threading.Thread(target=logger.info, args=("from a thread",))
    thread.start()
    thread.join()
    assert stream.writes == ["INFO from a thread\n"]


async def test_a_thread_s_line_does_not_wait_for_the_loop_s_turn(
    logger: logging.Logger, stream: RecordingStream
) -> None:
    logger.info("on the loop")  # schedules the end-of-turn write
    thread = threading.Thread(target=logger.info, args=("from a thread",))
    thread.start()
    thread.join()
    assert stream.writes == ["INFO on the loop\nINFO from a thread\n"]


def test_chunks_stay_within_pipe_buf_and_end_at_a_line() -> None:
    lines = [f"{'é' * (n % 7)}line {n} {'x' * (n % 300)}\n" for n in range(500)]
    lines.append("y" * (PIPE_BUF * 2) + "\n")  # longer than PIPE_BUF: goes out alone
    chunks = list(_chunks(lines))
    assert "".join(chunks) == "".join(lines)
    assert len(chunks) > 1
    for chunk in chunks:
        assert chunk.endswith("\n")
        assert len(chunk.encode()) <= PIPE_BUF or chunk.count("\n") == 1


def test_the_text_formatter_writes_what_logging_would() -> None:
    ours = TextFormatter()
    standard = logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s")
    for created in (1_795_000_000.001, 1_795_000_000.999, 1_795_000_001.5, 1_795_003_600.25):
        record = logging.LogRecord("keel.access", logging.INFO, "", 0, "GET / %d", (200,), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        record.request_id = "abc"
        assert ours.format(record) == standard.format(record)
