"""The per-host change stamps (``pipelines.feature_stamps``): what a reader notes, what a writer's
bump does to it, across real processes sharing the file."""
from __future__ import annotations

import multiprocessing
import os
import struct

import pytest

from core.schemas import DataError
from pipelines.feature_stamps import FIRST_SLOT, GLOBAL, ChangeStamps


def test_a_bump_changes_what_readers_noted_and_only_for_that_slot(tmp_path) -> None:
    reader = ChangeStamps(tmp_path / "stamps", slots=1024)
    writer = ChangeStamps(tmp_path / "stamps", slots=1024)  # a second mapping of the same file
    a, b = reader.slot("alice"), reader.slot("bob")
    assert a != b and FIRST_SLOT <= min(a, b) and max(a, b) < FIRST_SLOT + 1024
    assert writer.slot("alice") == a                 # the slot is a function of the id alone
    (slot_a, *noted_a), (slot_b, *noted_b) = reader.note("alice"), reader.note("bob")
    assert (slot_a, slot_b) == (a, b)
    assert reader.unchanged(a, *noted_a) and reader.unchanged(b, *noted_b)
    after = writer.bump({a: noted_a[0]}, noted_a[1])
    assert after == {a: noted_a[0] + 1}              # undisturbed: the writer may cache with this
    assert not reader.unchanged(a, *noted_a)          # seen through the other mapping at once
    assert reader.unchanged(b, *noted_b)
    assert reader.unchanged(a, after[a], noted_a[1])
    writer.bump_all()                                 # materialisation: every user changed
    assert not reader.unchanged(b, *noted_b) and not reader.unchanged(a, after[a], noted_a[1])
    assert not reader.unchanged(FIRST_SLOT + 5000, 0, 0)  # a slot of a bigger, replaced file: changed


def test_bump_reports_a_write_that_came_between(tmp_path) -> None:
    """A writer that noted a counter, read, and wrote must not cache its value if another writer
    bumped the slot (or the global counter) meanwhile: its write may not be the newest."""
    mine, other = ChangeStamps(tmp_path / "s", slots=64), ChangeStamps(tmp_path / "s", slots=64)
    s, noted, global_noted = mine.note("u1")
    other.bump({s: noted}, global_noted)
    assert mine.bump({s: noted}, global_noted) == {s: None}
    assert mine.note("u1")[1] == noted + 2             # both increments kept
    s, noted, global_noted = mine.note("u1")
    other.bump_all()
    assert mine.bump({s: noted}, global_noted) == {s: None}


def test_the_file_keeps_its_slot_count_and_a_foreign_file_is_refused(tmp_path) -> None:
    path = tmp_path / "stamps"
    ChangeStamps(path, slots=16)
    assert ChangeStamps(path, slots=1 << 20).slots == 16  # every process on the host must agree
    assert path.stat().st_size == 4 * (FIRST_SLOT + 16)
    bad = tmp_path / "not-stamps"
    bad.write_bytes(b"hello world, not a table" * 10)
    with pytest.raises(DataError, match="not a change-stamp table.*delete it"):
        ChangeStamps(bad)
    truncated = tmp_path / "truncated"
    truncated.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(DataError, match="not a change-stamp table"):
        ChangeStamps(truncated)
    with pytest.raises(ValueError, match="at least one slot"):
        ChangeStamps(tmp_path / "zero", slots=0)


def test_a_replaced_file_is_noticed_and_remapped(tmp_path) -> None:
    path = tmp_path / "stamps"
    serving = ChangeStamps(path, slots=32)
    assert not serving.replaced()
    path.unlink()
    assert serving.replaced()
    ChangeStamps(path, slots=32).bump_all()           # a new writer made a new file
    serving.reattach()
    assert not serving.replaced() and serving.note("x")[2] == 1


def _bump_many(path: str, user: str, times: int) -> None:
    stamps = ChangeStamps(path)
    slot = stamps.slot(user)
    for _ in range(times):
        stamps.bump({slot: 0}, 0)
        stamps.bump_all()


def test_concurrent_writers_in_processes_lose_no_increment(tmp_path) -> None:
    """Four processes create the file at once (one file results) and bump the same slot: the
    counter ends at the total, so no reader can miss a write through a lost increment."""
    path = str(tmp_path / "stamps")
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_bump_many, args=(path, "shared-user", 500)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    stamps = ChangeStamps(path)
    assert stamps.note("shared-user")[1:] == (2000, 2000)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]  # no temporary file left behind
    magic, version, slots, _ = struct.unpack("<4I", open(path, "rb").read(16))
    assert (version, slots) == (1, 1 << 20) and GLOBAL == FIRST_SLOT - 1


def _hold_write_lock(path: str, user: str, held, release) -> None:
    stamps = ChangeStamps(path, slots=1024)
    with stamps.writing([user]):
        held.set()
        release.wait(60)


def test_a_users_write_lock_excludes_other_processes_for_that_user_only(tmp_path) -> None:
    """While another process holds alice's write lock, alice's slot cannot be locked here and
    bob's can; once it lets go, alice's can too."""
    import fcntl

    path = str(tmp_path / "stamps")
    stamps = ChangeStamps(path, slots=1024)
    ctx = multiprocessing.get_context("spawn")
    held, release = ctx.Event(), ctx.Event()
    proc = ctx.Process(target=_hold_write_lock, args=(path, "alice", held, release))
    proc.start()
    try:
        assert held.wait(60)
        fd = os.open(path, os.O_RDWR)
        try:
            def try_lock(user: str) -> bool:
                try:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 4, 4 * stamps.slot(user), os.SEEK_SET)
                except OSError:
                    return False
                fcntl.lockf(fd, fcntl.LOCK_UN, 4, 4 * stamps.slot(user), os.SEEK_SET)
                return True

            assert not try_lock("alice") and try_lock("bob")
            release.set()
            proc.join(60)
            assert proc.exitcode == 0 and try_lock("alice")
        finally:
            os.close(fd)
    finally:
        release.set()
        proc.join(60)
    with stamps.writing(["alice", "bob", "alice"]):  # this process: both slots, each once, then released
        with pytest.raises(RuntimeError, match="inside another one"):  # would deadlock, or free the outer
            with ChangeStamps(path, slots=1024).writing(["carol"]):
                pass
    with stamps.writing(["alice"]):  # released: usable again
        pass
