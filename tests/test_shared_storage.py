"""Locks that work across the nodes of a shared file system (issue 14, "Shared storage")."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

from saekit.runlock import FileLock, RunFolderBusy


def other_hosts_lock(path, age_s: float = 0.0) -> None:
    path.write_text(json.dumps({"pid": 4242, "host": "node-17", "started": "earlier", "command": "build cache abc"}))
    if age_s:
        past = time.time() - age_s
        os.utime(path, (past, past))


def test_a_lock_on_another_node_with_a_live_heartbeat_is_waited_for(tmp_path):
    lock = tmp_path / ".abc.lock"
    other_hosts_lock(lock, age_s=5)
    with pytest.raises(RunFolderBusy, match="pid 4242 on node-17"):
        FileLock(lock, "me", wait_s=0.5, heartbeat_s=1, stale_after_s=60).acquire()
    assert json.loads(lock.read_text())["host"] == "node-17"  # still theirs


def test_a_lock_on_another_node_whose_heartbeat_stopped_is_taken_over(tmp_path):
    lock = tmp_path / ".abc.lock"
    other_hosts_lock(lock, age_s=120)
    taker = FileLock(lock, "me", wait_s=5, heartbeat_s=1, stale_after_s=60)
    taker.acquire()
    try:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    finally:
        taker.release()
    assert not lock.exists()


def test_without_a_heartbeat_another_nodes_lock_is_never_called_stale(tmp_path):
    lock = tmp_path / ".saekit.lock"
    other_hosts_lock(lock, age_s=10_000)
    with pytest.raises(RunFolderBusy):
        FileLock(lock, "me", wait_s=0.3).acquire()


def test_the_holder_keeps_its_lock_fresh_and_a_waiter_gets_it_when_released(tmp_path):
    lock = tmp_path / ".abc.lock"
    holder = FileLock(lock, "builder", heartbeat_s=0.1, stale_after_s=0.5)
    holder.acquire()
    past = time.time() - 100
    os.utime(lock, (past, past))
    time.sleep(0.5)
    assert time.time() - lock.stat().st_mtime < 1  # the heartbeat touched it again
    got = []
    waiter = threading.Thread(target=lambda: got.append(FileLock(lock, "reader", wait_s=10).acquire()))
    waiter.start()
    time.sleep(0.5)
    assert waiter.is_alive()  # a live holder on this host: the waiter waits
    holder.release()
    waiter.join(timeout=10)
    assert got == [None] and json.loads(lock.read_text())["command"] == "reader"
