"""The log file: rotation names, and fd-level output of children captured line by line."""

from __future__ import annotations

import logging
import logging.handlers
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

from llm_server.common.logs import setup_child_logging
from llm_server.supervisor.log_file import LogHub, StreamPump, make_file_handler, rotated_name


def test_rotated_name_has_a_dash_not_a_dot() -> None:
    assert rotated_name("/var/log/llm.log.20261126") == "/var/log/llm.log-20261126"


def test_forced_rollover_produces_name_dash_date(tmp_path: Path) -> None:
    path = tmp_path / "daemon.log"
    handler = make_file_handler(path)
    logger = logging.getLogger("test.rollover")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("before")
        handler.doRollover()
        logger.warning("after")
    finally:
        logger.removeHandler(handler)
        handler.close()
    rotated = sorted(p.name for p in tmp_path.iterdir() if p.name != "daemon.log")
    assert len(rotated) == 1 and rotated[0].startswith("daemon.log-") and rotated[0][-8:].isdigit()
    assert "before" in (tmp_path / rotated[0]).read_text()
    assert "after" in path.read_text() and "before" not in path.read_text()


def _child(queue: object, output: object) -> None:
    setup_child_logging(queue, "info", output)
    logging.getLogger("child").info("a record through the queue")
    queue.close()  # flush the queue's feeder thread: os._exit below skips it
    queue.join_thread()
    os.write(2, b"native stderr line one\nline two\n")
    os.write(1, b"stdout too\n")
    os._exit(7)  # dies hard: nothing is flushed by Python


def test_child_output_at_fd_level_reaches_the_log(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    hub = LogHub(tmp_path / "d.log", "info", ctx.Queue())
    hub.start()
    reader, writer = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(hub.queue, writer), name="kid")
    process.start()
    writer.close()
    pump = StreamPump(reader, "kid[1]")
    pump.start()
    process.join(30)
    pump.join(10)
    time.sleep(0.2)
    hub.stop()
    # Stopped, the hub no longer feeds records to a queue nobody reads (that hung exit once).
    assert not any(isinstance(h, logging.handlers.QueueHandler) for h in logging.getLogger().handlers)
    text = (tmp_path / "d.log").read_text()
    assert process.exitcode == 7
    assert "INFO kid[" in text and "a record through the queue" in text
    for line in ("kid[1]: native stderr line one", "kid[1]: line two", "kid[1]: stdout too"):
        assert line in text


def _chatty_child(queue: object) -> None:
    setup_child_logging(queue, "info", None)
    for n in range(300):
        logging.getLogger("child").info("child record %d", n)


def test_log_order_follows_cause_and_effect_across_processes(tmp_path: Path) -> None:
    """The supervisor's line written before it starts a child precedes the child's lines, and
    after the child exits and ``flush`` returns, all of them precede the supervisor's next line."""
    ctx = multiprocessing.get_context("spawn")
    hub = LogHub(tmp_path / "o.log", "info", ctx.Queue())
    hub.start()
    try:
        logging.getLogger("supervisor").info("supervisor before")
        process = ctx.Process(target=_chatty_child, args=(hub.queue,))
        process.start()
        process.join(30)
        assert hub.flush()
        logging.getLogger("supervisor").info("supervisor after")
    finally:
        hub.stop()
    lines = (tmp_path / "o.log").read_text().splitlines()
    assert "supervisor before" in lines[0] and "supervisor after" in lines[-1]
    assert [line.rsplit(" ", 1)[1] for line in lines[1:-1]] == [str(n) for n in range(300)]


KILLED_WRITER = """
import logging, multiprocessing, os, signal, sys, time
from pathlib import Path
from llm_server.supervisor.log_file import LogHub

def dies_holding_the_write_lock(queue):
    queue._wlock.acquire()  # as a child's feeder thread does for each record it sends
    os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    ctx = multiprocessing.get_context("spawn")
    hub = LogHub(Path(sys.argv[1]), "info", ctx.Queue())
    hub.start()
    child = ctx.Process(target=dies_holding_the_write_lock, args=(hub.queue,))
    child.start()
    child.join(30)
    logging.getLogger("supervisor").info("child gone with code %s", child.exitcode)
    started = time.monotonic()
    hub.stop(timeout=1.0)
    print(f"stopped in {time.monotonic() - started:.1f} s")
"""


def test_a_child_killed_while_writing_does_not_hang_the_stop(tmp_path: Path) -> None:
    """A child SIGKILLed while it holds the log queue's cross-process write lock (it was sending a
    record) leaves that lock held for good, so nothing can be sent through the queue again, the
    listener's stop marker included. The supervisor's stop still ends within its bound, logs why,
    and the process exits (the queue's feeder thread is not waited for)."""
    script = tmp_path / "killed_writer.py"
    script.write_text(KILLED_WRITER)
    log = tmp_path / "k.log"
    done = subprocess.run([sys.executable, str(script), str(log)], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[1])  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "stopped in 1." in done.stdout, done.stdout
    text = log.read_text()
    assert "child gone with code -9" in text and "the log queue did not drain" in text
