"""The benchmarks' job runner: a log of finished runs and a process scheduler.

- `read_log` / `append_log`: `runs.jsonl`, one JSON object per finished run,
  appended in one write (parallel jobs do not interleave) and read back
  skipping a line cut short (a process killed while writing), so an
  interrupted benchmark resumes where it stopped.
- `run_parallel`: runs `Job`s in at most `workers` processes at once, each
  starting once the jobs it needs are logged, within a deadline.
- `fingerprint`: which network a run started from, logged with it so that
  runs pair only with runs from the same network (a network trained again
  on another machine is another network).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np


def read_log(path: str) -> list[dict]:
    """The rows of the JSON-lines log `path` (none if it does not exist)."""
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # cut short: that run is not finished
    return rows


def fingerprint(model) -> str:
    """A short hash of a Keras model's weights."""
    digest = hashlib.sha256()
    for weight in model.get_weights():
        digest.update(np.ascontiguousarray(weight).tobytes())
    return digest.hexdigest()[:16]


def append_log(path: str, row: dict) -> None:
    """Appends `row` to the log `path` as one line, in one write."""
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def launch_module(module: str, job_flags: Sequence[str], key: str, log):
    """Starts `python -m module *job_flags --job=key`, writing to `log`."""
    command = [sys.executable, "-m", module, *job_flags, f"--job={key}"]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)


@dataclasses.dataclass(frozen=True)
class Job:
    """One job: its `key` (the log's), the keys it `needs` logged before it
    starts, its `group` (jobs of a group share duration estimates) and the
    caller's `spec` of it (printed for jobs that cannot start)."""

    key: str
    needs: tuple[str, ...] = ()
    group: str = ""
    spec: Any = None


@dataclasses.dataclass
class Outcome:
    """What `run_parallel` did not finish: `failed` and `late` job keys."""

    failed: set = dataclasses.field(default_factory=set)
    late: set = dataclasses.field(default_factory=set)


def run_parallel(
    jobs: Sequence[Job],
    *,
    done: Mapping[str, Any],
    reload: Callable[[], Mapping[str, Any]],
    launch: Callable[[str, Any], Any],
    workers: int,
    deadline_s: float,
    log_dir: str,
    durations: dict[str, list[float]],
    prepare: Callable[[Job], Any] = lambda job: None,
    describe: Callable[[Any], str] = lambda row: "done",
    poll_s: float = 1.0,
) -> Outcome:
    """Runs `jobs` (in priority order) in `workers` processes at once.

    A job starts once every key it needs is in the log (`done`, refreshed by
    `reload()` after each process ends), and only if the median of its
    group's `durations` (seconds; seeded by the caller, extended here) says
    it ends within `deadline_s` of the start; else it is late, and so are the
    jobs that need it. A job whose process ends without logging it failed:
    the end of its log is printed and the jobs that need it are dropped.
    `prepare(job)` runs here just before `launch(key, log)` starts the job's
    process (a `subprocess.Popen`) writing to `log_dir/<key>.log`.
    """
    os.makedirs(log_dir, exist_ok=True)
    began = time.perf_counter()
    pending = [job for job in jobs if job.key not in done]
    running, outcome = {}, Outcome()
    failed, late = outcome.failed, outcome.late
    try:
        while pending or running:
            for key, (job, process, log, started) in list(running.items()):
                if process.poll() is None:
                    continue
                del running[key]
                log.close()
                done = reload()
                elapsed = time.perf_counter() - began
                if key in done:
                    durations.setdefault(job.group, []).append(
                        time.perf_counter() - started
                    )
                    print(
                        f"[{elapsed:5.0f} s] {key}: {describe(done[key])}, "
                        f"{len(running)} running",
                        flush=True,
                    )
                else:
                    failed.add(key)
                    with open(log.name) as f:
                        tail = f.read()[-2000:]
                    print(
                        f"{key} failed (exit {process.returncode}):\n{tail}", flush=True
                    )
            left = deadline_s - (time.perf_counter() - began)
            for job in list(pending):
                if len(running) >= workers:
                    break
                took = durations.get(job.group)
                if (took and np.median(took) > left) or any(
                    n in late for n in job.needs
                ):
                    pending.remove(job)
                    late.add(job.key)
                    continue
                if any(n in failed for n in job.needs):
                    pending.remove(job)
                    failed.add(job.key)
                    print(f"{job.key} dropped: {list(job.needs)} failed", flush=True)
                    continue
                if not all(n in done for n in job.needs):
                    continue
                pending.remove(job)
                try:
                    prepare(job)
                    path = os.path.join(log_dir, job.key.replace("/", "_") + ".log")
                    log = open(path, "w")  # noqa: SIM115 - closed when it ends
                    process = launch(job.key, log)
                    running[job.key] = (job, process, log, time.perf_counter())
                except Exception as error:  # noqa: BLE001 - reported, job dropped
                    failed.add(job.key)
                    print(f"{job.key} failed to start: {error!r}", flush=True)
            if pending and not running:  # what is left waits for nothing that runs
                specs = [job.spec for job in pending]
                print(f"Not started (their needs did not run): {specs}", flush=True)
                break
            time.sleep(poll_s)
    finally:
        # After an exception here: no worker runs on unwatched.
        for _, process, log, _ in running.values():
            process.terminate()
            process.wait()
            log.close()
    return outcome
