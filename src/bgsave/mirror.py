"""Mirror: the second tier. Each committed local checkpoint is uploaded to a bucket, in the background.

::

    worker, lane 1     local commit: model_N.pt, trainer_N.pt, model_N.yaml (sidecar last)
    worker, lane 2     Mirror.committed(N): due (every n-th)? then queued; never waits for the bucket
    uploader thread    the newest queued epoch first: the mirror's old sidecar of N deleted (a
                       re-save; no request where the mirror has none), model_N.pt and
                       trainer_N.pt uploaded from the local files (parallel parts), the
                       sidecar last; then the mirror's retention (sidecar first)

The mirror is a run directory of its own (same layout, same writer lock): bgsave reads it as any.
A checkpoint due for the mirror is kept by local retention until its mirrored sidecar exists
(:meth:`Mirror.unmirrored`). A lone trainer state or a sidecar edit of a mirrored epoch is re-synced
(only the changed files). If uploads fall behind, a newly committed epoch supersedes the queued older ones the
mirror's retention would not keep (one WARNING); with a mirror that keeps everything, nothing is
skipped and the backlog is reported once. A final failure is a :class:`~bgsave.errors.MirrorError`
naming the URL and epoch, raised at the caller's next ``save_*`` / ``wait()`` / ``close()``; the
local commit stands. At the first write (:meth:`Mirror.claim`) the writer takes the mirror's lock,
aborts the unfinished multipart uploads a killed writer left, deletes mirror files that have no
sidecar, and queues every local committed checkpoint newer than the mirror's newest (newest first).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from bgsave import layout
from bgsave import sidecar as sidecar_schema
from bgsave.catalog import Catalog
from bgsave.errors import CheckpointError, InvalidArgumentError, MirrorError, WorkerTimeoutError
from bgsave.lock import WriterLock
from bgsave.policies import EveryNth, RetentionPolicy
from bgsave.storage import FileFacts, RetryPolicy, Storage, open_storage
from bgsave.storage.local import LocalStorage
from bgsave.storage.object_store import ObjectStorage
from bgsave.storage.retry import describe

__all__ = ("Mirror", "mirror_retention", "open_mirror")

logger = logging.getLogger(__name__)

_BACKLOG_WARNING = 3  # queued uploads (nothing skippable) at which the backlog is reported, once


def mirror_retention(keep_last: int | None, keep_best: int, metric: str, mode: str) -> RetentionPolicy:
    """The mirror's own retention, its errors naming ``mirror_keep_last`` / ``mirror_keep_best``."""
    try:
        return RetentionPolicy(keep_last=keep_last, keep_best=keep_best, metric=metric, mode=mode)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(str(exc).replace("keep_", "mirror_keep_")) from None


class Mirror:
    """The mirror tier of one manager: its catalog, lock and uploads (see the module docstring).

    Args:
        storage: The mirror's storage (opened by the manager).
        local: The local tier's catalog, whose committed files are uploaded.
        run_name: The run's name (lock, log lines).
        every_n: Which committed checkpoints are due (``mirror_every_n``).
        retention: The mirror's retention.
        report: Where a final failure goes (the worker's errors: raised at the next call).
    """

    def __init__(
        self,
        storage: Storage,
        local: Catalog,
        run_name: str,
        *,
        every_n: EveryNth,
        retention: RetentionPolicy,
        report: Callable[[CheckpointError], None],
    ) -> None:
        self.storage = storage
        self.catalog = Catalog(storage, storage.join(layout.CHECKPOINTS))
        self.url = storage.display(storage.root)
        self._local = local
        self._run_name = run_name
        self._every_n = every_n
        self._retention = retention
        self._report = report
        self.lock = WriterLock(storage, storage.root, run_name)
        self._cond = threading.Condition()
        self._pending: set[int] = set()
        self._uploading: int | None = None
        self._failed: dict[int, str] = {}
        self._sent: dict[int, dict[str, object]] = {}  # epoch -> local file name -> its tag when uploaded
        self._upload_s: dict[int, float] = {}
        self._committed = 0  # committed checkpoints seen (the after-lane only): every_n's index
        self._warned = self._closing = False
        self._thread: threading.Thread | None = None

    # ---- at construction and at the first write -------------------------------------------
    def check(self) -> None:
        """Refuse a mirror that cannot work at all (no such bucket, access denied), naming the URL.

        Raises:
            MirrorError: the mirror cannot be reached or listed.
        """
        try:
            self.storage.check_directory("mirror")
            if isinstance(self.storage, ObjectStorage):
                bucket = self.storage.root.split("/", 1)[0]
                if not self.storage.exists(bucket):
                    raise FileNotFoundError(f"bucket {bucket!r} does not exist (or is not visible)")
            self.storage.exists(self.catalog.directory)  # may it be listed: one key (S3: MaxKeys=1), not all
        except InvalidArgumentError:
            raise
        except Exception as exc:
            raise MirrorError(f"mirror {self.url} cannot be used: {describe(exc)}", url=self.url) from exc

    def claim(self) -> None:
        """The writer's first write: the mirror's lock, its debris removed, missing uploads queued.

        Raises:
            MirrorError: the lock cannot be written (access denied, no such bucket...).
            RunLockedError: another live writer holds the mirror.
        """
        if self.lock.held:
            return
        try:
            self.lock.acquire()
        except OSError as exc:
            raise MirrorError(f"cannot write to mirror {self.url}: {describe(exc)}", url=self.url) from exc
        self.storage.remove_stale_temps(self.catalog.directory)  # a killed upload's multipart uploads
        files = self.catalog.files()  # a start's: its resume asks the same listing
        pts, sidecars = layout.epochs_in(files)
        # Only this writer uploads here, so any weights or trainer state without a sidecar is a killed upload's.
        debris = [layout.checkpoint_name(e, layout.PT) for e in sorted(pts - sidecars)]
        debris += [layout.trainer_name(e) for e in sorted(layout.trainer_epochs_in(files) - sidecars)]
        if debris:
            self.catalog.delete(debris)
            logger.info("%s: removed %d file(s) a killed upload left: %s", self.url, len(debris), ", ".join(debris))
        self.catalog.holder_knows.listed(sidecars)
        newest = max(pts & sidecars, default=-1)
        missing = {e for e in self._local.epochs() if e > newest}
        if missing:
            logger.info("%s: queueing %d local checkpoint(s) missing from the mirror", self.url, len(missing))
        with self._cond:
            self._pending |= missing
            self._start()

    def _start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"bgsave-mirror-{self._run_name}", daemon=True)
            self._thread.start()
        self._cond.notify_all()

    # ---- what the writer tells it (the worker's after-lane) ---------------------------------
    def committed(self, epoch: int) -> None:
        """Epoch committed locally: queued when due, superseding older queued ones retention would not keep."""
        index, self._committed = self._committed, self._committed + 1
        if not self._every_n.due(index):
            return
        with self._cond:
            older = {e for e in self._pending if e < epoch}
        skipped = self._superseded(epoch, older) if older else set()  # may list the mirror: not under the lock
        with self._cond:
            skipped &= self._pending  # not started meanwhile
            self._pending -= skipped
            self._failed.pop(epoch, None)
            self._sent.pop(epoch, None)  # a re-save: every file goes again
            self._pending.add(epoch)
            backlog = len(self._pending)
            self._start()
        if skipped or (backlog >= _BACKLOG_WARNING and self._retention.keeps_everything):
            self._warn_once(epoch, skipped, backlog)

    def changed(self, epoch: int, name: str) -> None:
        """Epoch's ``name`` (trainer state, sidecar) changed locally: re-synced if the mirror has the epoch."""
        with self._cond:
            if epoch in self._pending:
                return  # its upload has not started: it takes the file as it is
            known = epoch in self._sent or epoch == self._uploading
        if not known:  # mirrored by an earlier manager, if at all: only this file goes again
            if self.catalog.get(epoch) is None:
                return
            files = self._local.storage.list_files(self._local.directory)
            names = [layout.checkpoint_name(epoch, layout.PT), layout.checkpoint_name(epoch, layout.YAML)]
            names.append(layout.trainer_name(epoch))
            with self._cond:
                self._sent.setdefault(epoch, {n: files[n].tag for n in names if n in files and n != name})
        with self._cond:
            self._pending.add(epoch)
            self._start()

    def _superseded(self, epoch: int, older: set[int]) -> set[int]:
        """The queued epochs older than ``epoch`` that the mirror's retention would not keep once it is there."""
        if self._retention.keeps_everything:
            return set()
        infos = {i.epoch: i for i in self.catalog.committed()}
        infos |= {i.epoch: i for i in self._local.committed() if i.epoch in older or i.epoch == epoch}
        return older - {i.epoch for i in self._retention.to_keep(infos.values())}

    def _warn_once(self, epoch: int, skipped: set[int], backlog: int) -> None:
        if self._warned:
            return
        self._warned = True
        if skipped:
            logger.warning(
                "%s: uploads to %s fell behind: epoch %d supersedes queued epoch(s) %s, which mirror retention "
                "would not keep (not uploaded; logged once)",
                self._run_name,
                self.url,
                epoch,
                ", ".join(map(str, sorted(skipped))),
            )
        else:
            logger.warning(
                "%s: uploads to %s are %d checkpoints behind; local retention keeps them until they are mirrored "
                "(mirror_keep_last lets newer checkpoints supersede queued ones; logged once)",
                self._run_name,
                self.url,
                backlog,
            )

    def unmirrored(self) -> frozenset[int]:
        """Epochs due for the mirror whose mirrored sidecar does not exist yet: local retention keeps them."""
        with self._cond:
            busy = set() if self._uploading is None else {self._uploading}
            return frozenset(self._pending | busy | set(self._failed))

    # ---- the uploader thread ------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._pending) or self._closing)
                if not self._pending:
                    return
                epoch = self._uploading = max(self._pending)  # the newest first
                self._pending.discard(epoch)
            started = time.perf_counter()
            error: MirrorError | None = None
            try:
                self._upload(epoch)
                self._prune(epoch)
            except Exception as exc:
                error = MirrorError(
                    f"mirroring epoch {epoch} to {self.url} failed (the local checkpoint stands): {describe(exc)}",
                    epoch=epoch,
                    path=self.storage.display(self.catalog.path(epoch)),
                    url=self.url,
                )
                error.__cause__ = exc
                logger.warning("%s: %s", self._run_name, error)
            with self._cond:
                self._uploading = None
                if error is None:
                    self._upload_s[epoch] = time.perf_counter() - started
                elif epoch not in self._pending:  # not re-queued meanwhile (a re-save): it failed for good
                    self._failed[epoch] = str(error)
                    self._report(error)
                self._cond.notify_all()

    def _upload(self, epoch: int) -> None:
        """Epoch's changed local files to the mirror: its old sidecar deleted first, data, then the sidecar."""
        local = self._local
        yml, pt, trainer = (
            layout.checkpoint_name(epoch, layout.YAML),
            layout.checkpoint_name(epoch, layout.PT),
            layout.trainer_name(epoch),
        )
        # Facts taken once, before anything is read: a local listing stats at each lookup, and
        # comparing two fresh stats at the end would miss a rewrite made while this ran.
        listing = local.storage.list_files(local.directory)
        files = {n: facts for n in (pt, trainer, yml) if (facts := listing.get(n)) is not None}
        data = [n for n in (pt, trainer) if n in files]
        if yml not in files or pt not in files:
            return  # no longer committed locally (re-saved or removed): its next commit queues it again
        sent = self._sent.get(epoch, {})
        changed = [n for n in data if sent.get(n) != files[n].tag]
        stale = [n for n in sent if n not in data and n != yml]  # a trainer state that is gone locally
        sidecar = local.storage.read_bytes(local.path_of(yml))
        if changed or stale:  # the data changes: readers must not pair the old sidecar with new files
            self.catalog.forget(epoch)
            if self.catalog.holder_knows.may_have_files(epoch):  # else there is none: one request fewer
                self.storage.delete(self.catalog.path_of(yml))
        for name in stale:
            self.storage.delete(self.catalog.path_of(name))
        try:
            for name in changed:
                self.storage.upload_file(local.path_of(name), self.catalog.path_of(name))
        except BaseException:  # a failed upload leaves nothing of this epoch behind it: no sidecar was written
            self._sent.pop(epoch, None)
            for name in changed:
                try:
                    self.storage.delete(self.catalog.path_of(name))
                except Exception as cleanup:
                    logger.warning("%s: could not remove %s: %s", self.url, name, describe(cleanup))
            raise
        # A local rewrite while this ran (a re-save, a late score): commit nothing mixed, and go again
        # (queued here: the writer's own re-queue may come after this upload has ended).
        now = local.storage.list_files(local.directory)
        if any(_moved(files.get(n), now.get(n)) for n in [*data, yml]):
            logger.info("%s: epoch %d changed locally while being mirrored; it goes again", self.url, epoch)
            with self._cond:
                self._pending.add(epoch)
            return
        if changed or stale or sent.get(yml) != files[yml].tag:
            self.catalog.holder_knows.writing(epoch)
            self.storage.write_bytes_atomic(self.catalog.path_of(yml), sidecar)
            self.catalog.wrote(epoch, sidecar_schema.loads(sidecar, source=local.path_of(yml)), len(sidecar))
        with self._cond:
            self._sent[epoch] = {n: files[n].tag for n in [*data, yml]}
        logger.info("%s: mirrored epoch %d to %s (%s)", self._run_name, epoch, self.url, ", ".join(changed) or yml)

    def _prune(self, epoch: int) -> None:
        if self._retention.keeps_everything:
            return
        protect = {epoch, *self.unmirrored()}
        doomed = self._retention.to_delete(self.catalog.committed(), protect=protect)
        if doomed:
            self.catalog.remove(doomed)
            with self._cond:
                for info in doomed:
                    self._sent.pop(info.epoch, None)
            logger.info("%s: pruned epochs %s", self.url, ", ".join(str(info.epoch) for info in doomed))

    # ---- waiting, status, closing -------------------------------------------------------------
    def wait(self, timeout: float | None = None) -> None:
        """Block until every queued upload has finished (or failed).

        Raises:
            WorkerTimeoutError: not within ``timeout`` seconds (the uploads go on).
        """
        with self._cond:
            if not self._cond.wait_for(lambda: not self._pending and self._uploading is None, timeout):
                raise WorkerTimeoutError(f"{self._run_name}: uploads to {self.url} did not finish within {timeout}s")

    def close(self, timeout: float | None = None) -> None:
        """Wait for the queued uploads, stop the uploader, release the mirror's lock. Idempotent."""
        try:
            self.wait(timeout)
        finally:
            with self._cond:
                self._closing = True
                self._cond.notify_all()
            done = self._thread is None or not self._thread.is_alive()
            if self._thread is not None and (timeout is None or not done):
                self._thread.join(timeout)
            if self._thread is None or not self._thread.is_alive():
                self.lock.release()

    def progress(self) -> tuple[set[int], dict[int, str], dict[int, float]]:
        """What this manager's uploads are at: epochs queued or uploading, failed ones (why), upload seconds."""
        with self._cond:
            pending = self._pending | (set() if self._uploading is None else {self._uploading})
            return pending, dict(self._failed), dict(self._upload_s)


def _moved(before: FileFacts | None, after: FileFacts | None) -> bool:
    return before is None or after is None or before.tag != after.tag


def open_mirror(
    url: str | os.PathLike[str] | None,
    storage_options: Mapping[str, Any] | None,
    *,
    local: Catalog,
    run_name: str,
    retry: RetryPolicy | None,
    max_concurrency: int,
    every_n: int,
    keep_last: int | None,
    keep_best: int,
    metric: str,
    mode: str,
    sharding: str,
    report: Callable[[CheckpointError], None],
) -> Mirror | None:
    """The manager's ``mirror=`` and its options, checked (nothing is touched yet); None without a mirror.

    Raises:
        InvalidArgumentError: naming the ``mirror*`` argument, or a run_dir that is not on local disk.
    """
    due = EveryNth(every_n, argument="mirror_every_n")
    retention = mirror_retention(keep_last, keep_best, metric, mode)
    if url is None:
        if storage_options is not None:
            raise InvalidArgumentError("mirror_storage_options needs mirror= (a bucket URL)")
        return None
    if not isinstance(local.storage, LocalStorage):
        raise InvalidArgumentError(
            f"mirror= needs a run_dir on local disk (the fast tier), got {local.storage.display(local.storage.root)}"
        )
    if sharding != "full":
        raise InvalidArgumentError("mirror= mirrors .pt checkpoints: it needs sharding='full', got 'dcp'")
    storage = open_storage(url, storage_options, retry=retry, max_concurrency=max_concurrency, argument="mirror")
    if isinstance(storage, LocalStorage) and os.path.realpath(storage.root) == os.path.realpath(local.storage.root):
        raise InvalidArgumentError(f"mirror must be another place than run_dir, got {storage.root} for both")
    return Mirror(storage, local, run_name, every_n=due, retention=retention, report=report)
