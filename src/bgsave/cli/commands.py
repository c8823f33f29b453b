"""The commands: ``ls``, ``latest``, ``best``, ``show``, ``prune``, ``consolidate`` read a run directory's catalog.

Which files make a committed checkpoint is :mod:`bgsave.catalog`'s to say (``Catalog.entries`` and
``Catalog.entry`` give every epoch with the reason it is not committed); which ones to delete is
:class:`~bgsave.policies.RetentionPolicy`'s. Here is only which directory a RUN_DIR means, and what
to print. Nothing is unpickled and torch is never imported, so listing an untrusted run directory
runs no code from it and ``bgsave ls`` starts in a fraction of ``import torch``'s time; only
``bench`` and ``consolidate`` import torch, when they run.

A command returns when it succeeded and raises otherwise; :func:`bgsave.cli.main` turns what it
raises into an exit code: :class:`~bgsave.errors.CheckpointNotFoundError` (nothing matched),
:class:`~bgsave.errors.InvalidArgumentError` (bad input), :class:`~bgsave.errors.CheckpointReadError`
(a file that cannot be read), anything else (a storage error).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Mapping
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from bgsave import layout
from bgsave import sidecar as sidecar_schema
from bgsave.catalog import Catalog, CheckpointInfo, Entry
from bgsave.cli import output
from bgsave.errors import CheckpointNotFoundError, CheckpointReadError, InvalidArgumentError
from bgsave.policies import RetentionPolicy
from bgsave.storage import FileFacts, Storage, open_storage

__all__ = ("bench", "best", "consolidate", "latest", "ls", "prune", "show")

_LS_HEADERS = ["epoch", "agent_step", "score", "avg_reward", "total_time", "size", "age", "committed"]


@dataclass(frozen=True, slots=True)
class _Run:
    """The checkpoint directory a RUN_DIR stands for, and its listing when it was opened."""

    storage: Storage
    catalog: Catalog
    files: Mapping[str, FileFacts]

    @property
    def shown(self) -> str:
        return self.storage.display(self.catalog.directory)

    def facts(self, epoch: int) -> FileFacts | None:
        return self.files.get(layout.data_name(epoch, self.files))


def _open(url: str, args: argparse.Namespace) -> Storage:
    return open_storage(url, dict(args.storage_option))


def _open_run(args: argparse.Namespace) -> _Run:
    """RUN_DIR/checkpoints, or RUN_DIR itself when it is a checkpoints folder (it holds checkpoint files)."""
    storage = _open(args.run_dir, args)
    directory = storage.join(layout.CHECKPOINTS)
    files = storage.list_files(directory)
    if not files:
        if storage.is_file(storage.root):
            raise InvalidArgumentError(f"{args.run_dir} is a file, not a run directory (one checkpoint: bgsave show)")
        here = storage.list_files(storage.root)
        ours = any(layout.parse(name) is not None or name == layout.TRAINER_STATE for name in here)
        if ours or layout.trainer_epochs_in(here):
            directory, files = storage.root, here
        elif not here and not storage.exists(storage.root):
            raise InvalidArgumentError(f"run directory {args.run_dir} does not exist")
    return _Run(storage, Catalog(storage, directory), files)


def _entry_record(entry: Entry) -> dict[str, Any]:
    """One epoch as JSON; an uncommitted one has only the epoch from its file name."""
    sidecar = entry.info.sidecar if entry.info else {"epoch": entry.epoch}
    size, mtime = (entry.pt.size, entry.pt.mtime) if entry.pt else (0, None)
    trainer = entry.info is not None and entry.info.has_trainer_state
    return output.record(sidecar, entry.path, size, entry.info is not None, mtime, trainer_state=trainer)


def _info_record(run: _Run, info: CheckpointInfo) -> dict[str, Any]:
    facts = run.facts(info.epoch)
    mtime = facts.mtime if facts else None
    return output.record(info.sidecar, info.path, info.size, True, mtime, trainer_state=info.has_trainer_state)


# ---- ls -----------------------------------------------------------------------------------------
def _tiers(run: _Run, args: argparse.Namespace) -> tuple[list[Entry], dict[int, tuple[str, ...]]]:
    """The entries of RUN_DIR, merged with the mirror's (``--mirror URL``), and the tiers that commit each."""
    entries = run.catalog.entries()
    if not getattr(args, "mirror", None):
        return entries, {}
    storage = _open(args.mirror, args)
    tiers = {"local": {entry.epoch: entry for entry in entries}}
    tiers["mirror"] = {entry.epoch: entry for entry in Catalog(storage, storage.join(layout.CHECKPOINTS)).entries()}
    where = {
        epoch: tuple(name for name, tier in tiers.items() if epoch in tier and tier[epoch].info)
        for epoch in sorted(tiers["local"] | tiers["mirror"])
    }
    # The local entry where the local tier commits it, or where only it names the epoch; else the mirror's.
    merged = [
        tiers["local" if "local" in held or epoch not in tiers["mirror"] else "mirror"][epoch]
        for epoch, held in where.items()
    ]
    return merged, where


def ls(args: argparse.Namespace) -> None:
    """A table (or JSON array) of every checkpoint, committed or not, and trainer states; ``--mirror``: both tiers."""
    run = _open_run(args)
    entries, tiers = _tiers(run, args)
    if args.json:
        records = [_entry_record(entry) for entry in entries]
        for record, entry in zip(records, entries, strict=True) if tiers else ():
            record["local"], record["mirrored"] = "local" in tiers[entry.epoch], "mirror" in tiers[entry.epoch]
        output.print_json(records)
        return
    now = time.time()
    rows = []
    notes = []
    for entry in entries:
        info = entry.info
        # No sidecar is a save in progress (or a killed one): ordinary. A sidecar that did not
        # commit the epoch is worth a note saying why.
        odd = info is None and layout.checkpoint_name(entry.epoch, layout.YAML) in run.files
        if odd:
            first, _, more = entry.problem.partition("\n")  # a YAML error's detail is on stderr already
            notes.append(f"* epoch {entry.epoch}: {first}{' ...' if more else ''}")
        rows.append(
            [
                str(entry.epoch),
                output.fmt(info.sidecar.get("agent_step")) if info else "-",
                output.fmt(info.sidecar.get("score")) if info else "-",
                output.fmt(info.sidecar.get("avg_reward")) if info else "-",
                output.fmt_duration(info.sidecar.get("total_time")) if info else "-",
                output.fmt_size(entry.pt.size if entry.pt else 0),
                output.fmt_age(entry.pt.mtime if entry.pt else None, now),
                "yes" if info else "no*" if odd else "no",
                *(["+".join(tiers[entry.epoch]) or "-"] if tiers else []),
            ]
        )
    if not entries:
        notes.append("no checkpoints")
    with_trainer = sum(1 for entry in entries if entry.info is not None and entry.info.has_trainer_state)
    if with_trainer:
        resumable, passed = run.catalog.resumable()
        committed = sum(entry.info is not None for entry in entries)
        skipped = f", passing over {', '.join(map(str, passed))}" if passed else ""
        notes.append(
            f"trainer states: {with_trainer} of {committed} committed epochs; "
            f"a resume continues from epoch {resumable.epoch if resumable else '-'}{skipped}"
        )
    legacy = run.files.get(layout.TRAINER_STATE)
    if legacy is not None:
        notes.append(
            f"trainer state of an older bgsave: {layout.TRAINER_STATE}, {output.fmt_size(legacy.size)}, "
            f"{output.fmt_age(legacy.mtime, now)} old (epoch not shown: listing never unpickles)"
        )
    headers = [*_LS_HEADERS, "tiers"] if tiers else _LS_HEADERS
    output.print_table(run.shown, headers, rows, notes, right=range(7))


# ---- latest, best -------------------------------------------------------------------------------
def latest(args: argparse.Namespace) -> None:
    """The newest committed checkpoint's path (reads its sidecar only)."""
    run = _open_run(args)
    info = run.catalog.latest()
    if info is None:
        raise CheckpointNotFoundError(f"no committed checkpoint in {run.shown}")
    _print_found(run, info, args)


def best(args: argparse.Namespace) -> None:
    """The best committed checkpoint's path by ``--metric`` and ``--mode``."""
    run = _open_run(args)
    info = run.catalog.best(args.metric, args.mode)
    if info is None:
        raise CheckpointNotFoundError(f"no committed checkpoint in {run.shown} has a finite {args.metric!r}")
    _print_found(run, info, args)


def _print_found(run: _Run, info: CheckpointInfo, args: argparse.Namespace) -> None:
    if args.json:
        output.print_json(_info_record(run, info))
    else:
        print(info.path)  # the user's RUN_DIR and a name of bgsave's: nothing from the files themselves


# ---- show ---------------------------------------------------------------------------------------
def show(args: argparse.Namespace) -> None:
    """The sidecar and file facts of one checkpoint, given as its ``.pt`` (or ``.dcp``) or its ``.yaml``."""
    storage = _open(args.path, args)
    stem, _, suffix = storage.root.rstrip("/").rpartition(".")
    if not stem or suffix not in (layout.PT, layout.YAML, layout.DCP):
        raise InvalidArgumentError(
            f"{args.path} is not a checkpoint: expected a model_N.pt, model_N.dcp or model_N.yaml"
        )
    directory, _, base = stem.rpartition("/")
    directory = directory or "/"
    pt = Storage.join_dir(directory, f"{base}.{layout.DCP if suffix == layout.DCP else layout.PT}")
    yml = Storage.join_dir(directory, f"{base}.{layout.YAML}")
    sidecar = _read_sidecar(storage, yml)  # first: an unreadable one is an error here, not a skipped epoch
    parsed = layout.parse(f"{base}.{layout.PT}")
    shown = storage.display(pt)
    if parsed is not None:
        entry = Catalog(storage, directory).entry(parsed.epoch)
        facts, info, problem, shown = entry.pt, entry.info, entry.problem, entry.path
    else:  # trainer_state.pt, model_00005.pt: no checkpoint's name, so never committed
        facts, info = storage.facts(pt), None
        problem = "no sidecar" if sidecar is None else "not a model_N.pt name"
    if facts is None and sidecar is None:
        raise InvalidArgumentError(f"{shown} does not exist (nor its sidecar)")
    size, mtime = (facts.size, facts.mtime) if facts else (0, None)
    if args.json:
        fallback = {"epoch": parsed.epoch} if parsed else {}
        trainer = info is not None and info.has_trainer_state
        output.print_json(
            output.record(sidecar or fallback, shown, size, info is not None, mtime, trainer_state=trainer)
        )
        return
    lines = [
        ["path", shown],
        ["committed", "yes" if info else f"no ({problem})"],
        ["size", output.fmt_size(size) if facts else "-"],
        ["age", output.fmt_age(mtime, time.time())],
        ["sidecar", storage.display(yml) if sidecar is not None else "-"],
    ]
    lines += [[str(key), output.fmt(value)] for key, value in (sidecar or {}).items()]
    output.print_table(shown, ["key", "value"], lines, [], right=())


def _read_sidecar(storage: Storage, path: str) -> dict[str, Any] | None:
    """The sidecar at ``path`` parsed (to show it; whether it commits is the catalog's to say), None if missing."""
    data = storage.read_many([path])[path]
    if isinstance(data, FileNotFoundError):
        return None
    shown = storage.display(path)
    if isinstance(data, Exception):
        raise CheckpointReadError(f"cannot read {shown}: {type(data).__name__}: {data}", path=shown)
    try:
        return sidecar_schema.loads(data, source=shown)
    except ValueError as exc:
        raise CheckpointReadError(str(exc), path=shown) from exc


# ---- prune --------------------------------------------------------------------------------------
def prune(args: argparse.Namespace) -> None:
    """Delete committed checkpoints the retention policy does not keep (each sidecar first)."""
    policy = RetentionPolicy(keep_last=args.keep_last, keep_best=args.keep_best, metric=args.metric, mode=args.mode)
    run = _open_run(args)
    entries = run.catalog.entries()
    doomed = policy.to_delete([entry.info for entry in entries if entry.info])
    if not args.dry_run:
        run.catalog.remove(doomed)
    deleted = {info.epoch for info in doomed}
    committed = [entry for entry in entries if entry.info]
    if args.json:
        output.print_json(
            {
                "dry_run": args.dry_run,
                "deleted": [_entry_record(entry) for entry in committed if entry.epoch in deleted],
                "kept": [_entry_record(entry) for entry in committed if entry.epoch not in deleted],
            }
        )
        return
    verb = "would delete" if args.dry_run else "deleted"
    for info in doomed:
        print(
            output.clean(
                f"{verb} epoch {info.epoch} ({args.metric} {output.fmt(info.sidecar.get(args.metric))}): {info.path}"
            )
        )
    kept = [str(entry.epoch) for entry in committed if entry.epoch not in deleted]
    print(f"{verb} {len(deleted)} checkpoint(s); kept epochs: {', '.join(kept) or 'none'}")
    uncommitted = len(entries) - len(committed)
    if uncommitted:
        print(f"left {uncommitted} uncommitted .pt file(s) alone (a save in progress or a crash's leftover)")


# ---- consolidate ----------------------------------------------------------------------------------
def consolidate(args: argparse.Namespace) -> None:
    """A sharded (DCP) checkpoint as one plain state-dict ``.pt``, written atomically; imports torch."""
    run = _open_run(args)
    info = run.catalog.get(args.epoch)
    if info is None:
        raise CheckpointNotFoundError(f"{run.shown} has no committed checkpoint for epoch {args.epoch}")
    if not info.sharded:
        raise InvalidArgumentError(f"epoch {args.epoch} is a whole-agent .pt already ({info.path}): load it as it is")
    out = args.out or run.storage.join_dir(run.catalog.directory, f"model_{args.epoch:04d}.state_dict.pt")
    out = os.path.abspath(out)
    temp = os.path.join(os.path.dirname(out), layout.temp_name(os.path.basename(out)))
    from bgsave.shards import consolidate as dcp_to_torch_save  # torch, only here

    try:
        dcp_to_torch_save(run.catalog.path(args.epoch, layout.DCP), temp)
        os.replace(temp, out)
    finally:
        with suppress(FileNotFoundError):
            os.remove(temp)
    if args.json:
        output.print_json({"epoch": args.epoch, "dcp": info.path, "path": out})
    else:
        print(output.clean(out))


# ---- bench --------------------------------------------------------------------------------------
def bench(args: argparse.Namespace) -> None:
    """Measure save latency on a target; the one command that imports torch (and CheckpointManager)."""
    from bgsave.cli import bench as benchmark

    with benchmark.progress(benchmark.steps(args.sizes, args.repeats, args.max_pending)) as step:
        report = benchmark.run(
            args.run_dir,
            sizes=args.sizes,
            repeats=args.repeats,
            max_pending=args.max_pending,
            storage_options=dict(args.storage_option),
            on_step=step,
        )
    if args.json:
        output.print_json(report.to_json())
        return
    headers, rows, notes = benchmark.table(report)
    output.print_table(f"bgsave bench: {report.target}", headers, rows, notes, right=(0, 2, 3, 4, 5, 6))
