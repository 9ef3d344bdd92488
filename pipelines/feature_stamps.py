"""Per-host change stamps of the online store's user features: what lets a serving process keep a
user's features in memory for minutes and still never serve a value that another process on the
same host has overwritten.

Why: a per-process TTL cache alone makes a choice between two bad options. A short TTL (seconds)
sends most requests to the store through a thread hop, which measured as half of the serving
latency at half load (docs/serving.md); a long one serves a user's old history for minutes after
another worker applied their new events. With stamps, every writer on the host (a serving
worker's ``apply_events``, the materialisation job) bumps a counter in a small file that every
process maps into memory; a reader notes the counter *before* it reads the store, and a cached
entry counts as a hit only while the counter is unchanged (two memory reads, no system call).
The TTL then bounds only writes this host cannot see: those made on *other* hosts sharing the
same online store (Redis), and Redis keys expiring.

Layout: a header of four 32-bit words (magic, version, slot count, reserved), one global word
(bumped by materialisation, which rewrites every user), then one word per slot. A user's slot is
``crc32(user_id) % slots``: users that collide share a counter, which only costs a spurious
re-read, never a stale answer. Counters wrap at 2**32; only equality is ever compared.

Writers of the same user also exclude each other (:meth:`ChangeStamps.writing`): a write is a
read-modify-write of the user's state (history, counters), and two processes interleaving theirs
would lose one update. Each slot's word doubles as a POSIX byte-range lock, taken in slot order
around the whole read-modify-write, so writers of the same users queue host-wide and writers of
other users go on; a process that dies releases its locks with it.

Ordering, which is what makes a hit safe: a writer writes the store and *then* bumps; a reader
reads the counter and *then* the store. Whatever the interleaving, a reader that saw the old
counter is invalidated by the bump, and one that saw the new counter read the new value. Bumps
are made under an exclusive ``flock`` on the file, so concurrent writers never lose an
increment (readers take no lock).
"""
from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
import threading
import zlib
from pathlib import Path
from typing import Iterable, Iterator, Mapping

from core.schemas import DataError

MAGIC = 0x31534352  # b"RCS1" read as a little-endian uint32
VERSION = 1
HEADER_WORDS = 4
GLOBAL = HEADER_WORDS          # the word materialisation bumps
FIRST_SLOT = HEADER_WORDS + 1  # user slots start here
MASK = 0xFFFFFFFF


#: per stamp file, the lock the writing threads of this process take before the slots' POSIX locks
#: (those belong to the process: they do not exclude its own threads, nor its other mappings)
_PROCESS_WRITERS: dict[str, threading.Lock] = {}
_PROCESS_WRITERS_LOCK = threading.Lock()
_WRITING = threading.local()  # the stamp files this thread holds write locks of


class ChangeStamps:
    """One host's table of change counters, memory-mapped from ``path`` (created on first use).

    ``slots`` applies when this call creates the file; an existing file keeps its own count
    (every process on the host must agree on it), whatever ``slots`` says.
    """

    def __init__(self, path: Path | str, *, slots: int = 1 << 20):
        if slots < 1:
            raise ValueError(f"change stamps need at least one slot, got {slots}")
        self.path = Path(path)
        self._writers_key = str(self.path.resolve())  # one per-process writers' lock per file, however named
        self._lock = threading.Lock()  # writers' threads in this process queue here (see _locked)
        self._attach(slots)

    # ---- the file -----------------------------------------------------------------------------
    def _create(self, slots: int) -> None:
        """Create the file whole, or not at all: it is written beside its final name and linked
        into place (``link`` never replaces), so a process never maps a half-written header and two
        processes creating it at once end up sharing one."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            f.write(struct.pack("<4I", MAGIC, VERSION, slots, 0))
            f.truncate(4 * (FIRST_SLOT + slots))
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)

    def _attach(self, slots: int) -> None:
        if not self.path.exists():
            self._create(slots)
        file = open(self.path, "r+b")  # noqa: SIM115 - kept open for flock, closed with this object
        try:
            size = os.fstat(file.fileno()).st_size
            head = os.pread(file.fileno(), 4 * HEADER_WORDS, 0)
            magic, version, count, _ = struct.unpack("<4I", head) if len(head) == 4 * HEADER_WORDS else (0, 0, 0, 0)
            if magic != MAGIC or version != VERSION or count < 1 or size != 4 * (FIRST_SLOT + count):
                raise DataError(f"{self.path} is not a change-stamp table (magic {magic:#x}, version {version}, "
                                f"{count} slots, {size} bytes); delete it and the serving processes recreate it")
            mapped = mmap.mmap(file.fileno(), size)
        except BaseException:
            file.close()
            raise
        self._file, self._inode = file, os.fstat(file.fileno()).st_ino  # the mapping lives as long as its view
        # the words and their slot count in one attribute: a reader on another thread during a
        # reattach uses the old table or the new one, never one's count with the other's words
        self._table: tuple[memoryview, int] = (memoryview(mapped).cast("I"), count)

    @property
    def slots(self) -> int:
        return self._table[1]

    def replaced(self) -> bool:
        """Whether the file at ``path`` is no longer the one mapped (deleted or recreated): the
        stamps this process reads would then never move again. Cheap (one ``stat``)."""
        try:
            return os.stat(self.path).st_ino != self._inode
        except FileNotFoundError:
            return True

    def reattach(self) -> None:
        """Map the file now at ``path`` (creating it if it is gone). Every stamp noted before is
        then meaningless: the caller drops what it cached with them. The old mapping is not closed
        here (a request on another thread may be reading it this instant): it goes with its last
        reference."""
        self._attach(self.slots)

    # ---- reads (no lock, no system call) --------------------------------------------------------
    @staticmethod
    def _slot_of(user_id: str, slots: int) -> int:
        return FIRST_SLOT + zlib.crc32(user_id.encode()) % slots

    def slot(self, user_id: str) -> int:
        """The word that holds ``user_id``'s counter."""
        return self._slot_of(user_id, self._table[1])

    def note(self, user_id: str) -> tuple[int, int, int]:
        """(slot, its counter, the global counter) now: what a reader keeps with what it reads next."""
        words, slots = self._table
        slot = self._slot_of(user_id, slots)
        return slot, words[slot], words[GLOBAL]

    def unchanged(self, slot: int, user_stamp: int, global_stamp: int) -> bool:
        """No write of this slot's users, and no materialisation, since those counters were noted."""
        words = self._table[0]
        try:
            return words[slot] == user_stamp and words[GLOBAL] == global_stamp
        except IndexError:  # noted in a replaced file with more slots: changed, by definition
            return False

    # ---- writes (after the store write has completed) -----------------------------------------
    def bump(self, noted: Mapping[int, int], global_noted: int) -> dict[int, int | None]:
        """Advance each slot's counter by one, after the store write.

        ``noted``: each written slot's counter as this writer noted it (``note``) before it read
        the state it then wrote, and ``global_noted`` the global counter then. The answer gives,
        per slot, the counter after the bump when neither it nor the global one had moved since:
        no other writer touched those users in between, so the value just written is the store's
        newest and the writer may cache it with that counter. Else None: another write came
        between, and the writer must not cache what it wrote."""
        out: dict[int, int | None] = {}
        with self._locked() as words:
            undisturbed = words[GLOBAL] == global_noted
            for s, stamp in noted.items():
                if s >= len(words):  # noted in a bigger file since replaced: its readers dropped their entries
                    out[s] = None
                    continue
                before = words[s]
                words[s] = after = (before + 1) & MASK
                out[s] = after if undisturbed and before == stamp else None
        return out

    def bump_all(self) -> None:
        """Invalidate every user on this host (materialisation rewrote the store)."""
        with self._locked() as words:
            words[GLOBAL] = (words[GLOBAL] + 1) & MASK

    @contextlib.contextmanager
    def writing(self, user_ids: Iterable[str]) -> Iterator[None]:
        """Hold the write locks of these users' slots, host-wide, for a read-modify-write of their
        state: other writers of any of them (another process or thread) wait; writers of other
        users do not. Slots are locked in ascending order (no deadlock between writers of
        overlapping user sets); a process that dies releases its locks. POSIX semantics: closing
        any descriptor of the file in this process releases them, so nothing else here opens it
        while a write is in flight (the file is opened once per mapping, at attach)."""
        key = self._writers_key
        holding = _WRITING.__dict__.setdefault("paths", set())
        if key in holding:  # POSIX locks do not nest: an inner release would free the outer write
            raise RuntimeError(f"a write to {self.path}'s users started inside another one on the same thread")
        with _PROCESS_WRITERS_LOCK:
            mine = _PROCESS_WRITERS.setdefault(key, threading.Lock())
        with mine:
            holding.add(key)
            file, slots = self._file, self._table[1]  # one file for lock and unlock, even across a reattach
            held: list[int] = []
            try:
                for slot in sorted({self._slot_of(u, slots) for u in user_ids}):
                    fcntl.lockf(file.fileno(), fcntl.LOCK_EX, 4, 4 * slot, os.SEEK_SET)
                    held.append(slot)
                yield
            finally:
                for slot in reversed(held):
                    fcntl.lockf(file.fileno(), fcntl.LOCK_UN, 4, 4 * slot, os.SEEK_SET)
                holding.discard(key)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[memoryview]:
        """The table's words, with this process's thread lock and an exclusive ``flock`` on the
        file held: one writer on the host at a time (flock alone is per open file, not per thread)."""
        with self._lock:
            fd = self._file.fileno()
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                yield self._table[0]
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
