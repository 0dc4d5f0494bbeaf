"""One method's sequential run, measured on a Dask worker process, one job at a time: quality at several edit
counts, time, memory.

The result for each edit count N comes from one run of max(counts) edits: right after edit N the first N
requests are evaluated, which is EasyEdit's "final" evaluation of an N-edit run. Edits never look ahead,
so this equals a separate N-edit run (tests/test_bench.py checks it) at a fraction of the cost, and the
time of each of those evaluations is the evaluation-cost curve.

Jobs fan out as Prefect tasks on a Dask cluster (``run_jobs``): single-threaded worker processes, so a
process runs one job at a time. Memory: ``ru_maxrss`` cannot be used here, because it keeps the process's
peak over its whole life (an earlier job's, or a spawned child's parent's); the peak is VmHWM of
/proc/self/status, restarted just before the model is loaded, over the RSS at that moment, after the
memory an earlier job on the same worker freed has been handed back to the OS (``release_freed_memory``).
A worker's first job also pays the process's one-time costs (lazy imports, allocator pools), which later jobs
on that worker do not: run as many workers as jobs (``--jobs``) where peaks are compared across methods.

A long run (``Job.checkpoint_every``) saves itself every N edits under ``<out>/<method>.run``: the edited model
and editor state (:func:`kdpo.editing.save_checkpoint`), the baseline probe and the scores measured so far.
The same job started again continues from there; its memory peaks are then those of the resumed part.
"""
from __future__ import annotations

import ctypes
import gc
import hashlib
import json
import logging
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry call (an ERROR when offline)

import torch
from distributed import get_worker
from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.futures import as_completed
from prefect.server.api.server import SubprocessASGIServer
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_dask import DaskTaskRunner

import kdpo
from kdpo.editing import (
    EditRecord, SequentialResult, latest_checkpoint, load_checkpoint, make_config, run_sequential, save_checkpoint,
)
from kdpo.evaluation import Probe, RequestScores, evaluate, probe
from kdpo.layers import find_module
from kdpo.loaders import load_requests
from kdpo.modeling import load_model
from kdpo.world import model_corpus

MB = 2**20
QUALITY = ("edit_success", "generalization", "locality")  # what run_jobs prints of a finished run
PEAK_FORMULA = ("peak RSS (VmHWM) of the job's worker process, one job at a time, minus its RSS at the job's start, "
                "before the model was loaded (an earlier job's freed memory handed back to the OS first)")
BUDGET_FORMULA = (
    "bytes of the model's parameters and buffers + 4 x the trained float32 deltas "
    "(their values, gradients and Adam's two moments)"
)


@dataclass(frozen=True)
class Job:
    """What one method's process runs: the world, the method and its settings, the edit counts to report."""

    world: str
    method: str
    counts: tuple[int, ...]
    overrides: dict = field(default_factory=dict)
    device: str = "cpu"
    dtype: str = "float32"
    fluency_tokens: int = 24
    out: str | None = None  # write the full result (per-edit records) here as <method>.json
    progress: bool = False
    threads: int = 0  # torch threads of the run's process (0: torch's default)
    checkpoint_every: int = 0  # with ``out``: save the run every N edits and resume it from there (0: never)


def source_digest() -> str:
    """Digest of the kdpo package's sources, to tell whether every method of a benchmark ran the same code."""
    digest = hashlib.sha256()
    for path in sorted(Path(kdpo.__file__).parent.rglob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def proc_status_bytes(name: str) -> int | None:
    """A memory field of /proc/self/status (``VmRSS``, ``VmHWM``) in bytes; None without /proc."""
    try:
        with open("/proc/self/status") as status:
            lines = status.read().splitlines()
    except OSError:
        return None
    values = [line.split()[1] for line in lines if line.startswith(name + ":")]
    if not values:
        raise ValueError(f"/proc/self/status has no field {name!r}")
    return int(values[0]) * 1024


def reset_peak_rss() -> None:
    """Restart VmHWM at the current RSS (Linux >= 4.0); a no-op without /proc."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass


def release_freed_memory() -> None:
    """Collect garbage and hand the allocator's freed pages back to the OS (glibc ``malloc_trim``), so that an
    earlier job's freed memory neither counts in the RSS at a job's start nor absorbs the next job's peak."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def parameter_bytes(model: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def trained_delta_bytes(model: torch.nn.Module, modules: tuple[str, ...]) -> int:
    """Bytes of the deltas one edit trains: a float32 matrix the size of each edited module's weight."""
    return sum(find_module(model, name).weight.numel() for name in modules) * 4


class MemoryTrace:
    """RSS at named moments and the peak RSS (VmHWM) of each phase between them, in bytes (None without
    /proc); on a GPU also the peak CUDA allocation of each phase."""

    def __init__(self) -> None:
        self.rss: dict[str, int | None] = {}
        self.peaks: dict[str, int | None] = {}
        self.cuda_peaks: dict[str, int] = {}

    def mark(self, name: str) -> None:
        self.rss[name] = proc_status_bytes("VmRSS")

    def end_phase(self, name: str) -> None:
        """Record the peak since the last phase ended (or since ``reset_peak_rss``); start the next phase."""
        self.peaks[name] = proc_status_bytes("VmHWM")
        reset_peak_rss()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            self.cuda_peaks[name] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()


def memory_report(trace: MemoryTrace, model: torch.nn.Module, modules: tuple[str, ...]) -> dict:
    """Peak memory of this process over the run against model + training-state bytes (``BUDGET_FORMULA``);
    what the editor's setup and first edit added to the RSS before editing, and what the following edits
    added to the RSS after that (a second copy of the model would add model_mb)."""
    budget = parameter_bytes(model) + 4 * trained_delta_bytes(model, modules)
    report = {"model_mb": parameter_bytes(model) / MB, "trained_delta_mb": trained_delta_bytes(model, modules) / MB,
              "budget_mb": budget / MB}
    if None not in (*trace.rss.values(), *trace.peaks.values()):
        peak, before = max(trace.peaks.values()), trace.rss["before_load"]
        report |= {f"rss_{name}_mb": value / MB for name, value in trace.rss.items()}
        report |= {f"peak_{name}_mb": value / MB for name, value in trace.peaks.items()}
        report |= {"peak_rss_mb": peak / MB, "peak_over_baseline_mb": (peak - before) / MB, "ratio": (peak - before) / budget,
                   "setup_over_start_mb": (trace.peaks["setup"] - trace.rss["before_editing"]) / MB}
        if "edits" in trace.peaks:
            report["edits_over_start_mb"] = (trace.peaks["edits"] - trace.rss["after_setup"]) / MB
    if trace.cuda_peaks:
        allocated = max(trace.cuda_peaks.values())
        report |= {f"cuda_peak_{name}_mb": value / MB for name, value in trace.cuda_peaks.items()}
        report |= {"cuda_peak_allocated_mb": allocated / MB, "cuda_ratio": allocated / budget}
    return report


def edit_seconds_by_window(records: list[EditRecord], counts: tuple[int, ...]) -> dict[str, float]:
    """Mean editor seconds of the edits between consecutive counts, e.g. ``{"1-25": 0.2, "26-50": 0.21}``."""
    windows, start = {}, 0
    for count in counts:
        window = records[start:count]
        windows[f"{start + 1}-{count}"] = sum(r.seconds for r in window) / len(window)
        start = count
    return windows


def prefix_summary(result: SequentialResult, count: int, final: list) -> dict:
    """The summary of the first ``count`` edits of ``result``, with ``final`` scored right after edit ``count``."""
    memory = result.memory if count == len(result.records) else None  # the memory is only known after the last edit
    return SequentialResult(result.method, result.config, result.records[:count], final, result.baseline[:count],
                            memory=memory).summary()


def measure_method(job: Job) -> dict:
    """Run ``job.method`` for max(counts) sequential edits; quality at every count, time and peak memory."""
    counts = tuple(sorted(set(job.counts)))
    if job.threads:
        torch.set_num_threads(job.threads)
    source = source_digest()
    release_freed_memory()
    trace = MemoryTrace()
    trace.mark("before_load")
    reset_peak_rss()
    requests = load_requests(Path(job.world) / "edits.jsonl", limit=counts[-1]).requests
    if len(requests) < counts[-1]:
        raise ValueError(f"--edits asks for {counts[-1]} edits, but the world has {len(requests)} edit requests")
    config = make_config(job.method, overrides=job.overrides)
    run_dir = Path(job.out) / f"{job.method}.run" if job.out and job.checkpoint_every else None
    saved = saved_run(run_dir, job_identity(job, source)) if run_dir else None
    if saved:
        model, tokenizer, resume = load_checkpoint(saved["checkpoint"], job.device, job.dtype)
        baseline = saved["baseline"]
    else:
        model, tokenizer = load_model(job.world, job.device, job.dtype)
        resume, baseline = None, probe(model, tokenizer, requests, job.fluency_tokens)
        if run_dir:
            start_run_dir(run_dir, job_identity(job, source), baseline)
    if next(model.parameters()).device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    trace.end_phase("load_and_probe")
    trace.mark("before_editing")
    if resume:
        trace.end_phase("setup")
        trace.mark("after_setup")
    # count -> final scores, wall and CPU seconds of its evaluation
    checkpoints: dict[int, tuple[list, float, float]] = saved["checkpoints"] if saved else {}
    last_edit = [0.0]
    # CPU seconds, all threads: insensitive to other processes
    cpu = {"since": time.process_time(), "edits_after_first": saved["cpu_edits_after_first"] if saved else 0.0}
    wall_before = saved["wall_seconds"] if saved else 0.0

    def on_edit(record: EditRecord) -> None:
        count = record.index + 1
        if count > 1:  # the first edit's CPU time also holds the editor's setup (protection)
            cpu["edits_after_first"] += time.process_time() - cpu["since"]
        if count == 1:
            trace.end_phase("setup")  # the editor's setup (protection) and the first edit
            trace.mark("after_setup")
        elif count == counts[0]:
            trace.end_phase("edits")  # edits 2..counts[0] with their immediate evaluations, before any other
        if count in counts[:-1]:
            started, cpu_started = time.perf_counter(), time.process_time()
            final = evaluate(model, tokenizer, requests[:count], baseline.locality_predictions[:count], job.fluency_tokens,
                             baseline_generations=baseline.locality_generations[:count])
            checkpoints[count] = (final, time.perf_counter() - started, time.process_time() - cpu_started)
        last_edit[0], cpu["since"] = time.perf_counter(), time.process_time()

    def on_checkpoint(state) -> None:
        (run_dir / f"measured-{state.next_edit:06d}.json").write_text(json.dumps({
            "checkpoints": {count: [[asdict(score) for score in final], *seconds]
                            for count, (final, *seconds) in checkpoints.items()},
            "cpu_edits_after_first": cpu["edits_after_first"],
            "wall_seconds": wall_before + time.perf_counter() - started}))
        save_checkpoint(run_dir, model, tokenizer, state)
        for stale in run_dir.glob("measured-*.json"):
            if stale.name != f"measured-{state.next_edit:06d}.json":
                stale.unlink()

    started = time.perf_counter()
    result = run_sequential(model, tokenizer, requests, job.method, config, model_corpus(job.world), baseline,
                            job.fluency_tokens, progress=job.progress, on_edit=on_edit, resume=resume,
                            checkpoint_every=job.checkpoint_every or 1, on_checkpoint=on_checkpoint if run_dir else None)
    checkpoints[counts[-1]] = (  # run_sequential's own final evaluation
        result.final, time.perf_counter() - last_edit[0], time.process_time() - cpu["since"])
    wall = wall_before + time.perf_counter() - started
    trace.end_phase("rest")
    if job.out:
        result.write_json(Path(job.out) / f"{job.method}.json")
    by_count = [  # one summary per edit count, ascending; each has "edits": its count
        prefix_summary(result, count, final) | {"final_eval_seconds": seconds, "final_eval_cpu_seconds": cpu_seconds}
        for count, (final, seconds, cpu_seconds) in sorted(checkpoints.items())
    ]
    return {
        "method": job.method,
        "config": result.config,
        "summary": by_count[-1],  # the largest count's, the headline (what `kdpo report` draws)
        "by_count": by_count,
        "edit_seconds_by_window": edit_seconds_by_window(result.records, counts),
        "wall_seconds": wall,
        "resumed_at": resume.next_edit if resume else None,  # edits done by an earlier, interrupted process
        # edits 2..N, each with its immediate evaluation of one request, without the checkpoint evaluations
        "cpu_seconds_per_edit": cpu["edits_after_first"] / (counts[-1] - 1) if counts[-1] > 1 else None,
        "torch_threads": torch.get_num_threads(),
        "kdpo_source": source,
        "memory": memory_report(trace, model, config.edited_modules),
        "load_average": os.getloadavg(),  # other processes on the machine skew the timings
    }


def start_run_dir(run_dir: Path, identity: dict, baseline: Probe) -> None:
    """A fresh ``run_dir`` for a resumable run: the job's identity and its baseline probe."""
    if run_dir.exists():
        shutil.rmtree(run_dir)  # another job's (code, settings) or an unreadable one: not resumable
    run_dir.mkdir(parents=True)
    (run_dir / "baseline.json").write_text(json.dumps(baseline.to_dict()))
    (run_dir / "job.json").write_text(json.dumps(identity))


def saved_run(run_dir: Path, identity: dict) -> dict | None:
    """The latest checkpoint of the same job in ``run_dir`` with the baseline probe and the scores measured up to
    it, or None (no checkpoint, or another job's)."""
    job_file = run_dir / "job.json"
    if not job_file.exists() or json.loads(job_file.read_text()) != identity:
        return None
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return None
    measured_file = run_dir / f"measured-{checkpoint.name.removeprefix('checkpoint-')}.json"
    if not measured_file.exists():  # killed between the two writes: the checkpoint before it is gone
        return None
    measured = json.loads(measured_file.read_text())
    checkpoints = {int(count): ([RequestScores(**score) for score in final], *seconds)
                   for count, (final, *seconds) in measured["checkpoints"].items()}
    return {"checkpoint": checkpoint, "baseline": Probe.from_dict(json.loads((run_dir / "baseline.json").read_text())),
            "checkpoints": checkpoints, "cpu_edits_after_first": measured["cpu_edits_after_first"],
            "wall_seconds": measured["wall_seconds"]}


def threads_per_job(parallel: int) -> int:
    """Torch threads for each of ``parallel`` jobs sharing this machine's cores (0: torch's default, for one job)."""
    return max(1, (os.cpu_count() or 1) // parallel) if parallel > 1 else 0


@task(name="measure-method", task_run_name="{job.method} {job.out}", cache_policy=NO_CACHE)
def measure_task(job: Job) -> dict:
    """``measure_method`` on a Dask worker, which must run one task at a time (its memory peak is the job's)."""
    if get_worker().state.nthreads != 1:
        raise RuntimeError("bench jobs need single-threaded Dask workers (dask worker --nthreads 1)")
    return measure_method(job)


@flow(name="benchmark-jobs", validate_parameters=False)
def measure_flow(jobs: list[Job], identities: list[dict], quiet: bool) -> list[dict]:
    """Every job as a task; each finished job's summary is written as soon as it is in."""
    futures = [measure_task.submit(job) for job in jobs]
    index = {future.task_run_id: i for i, future in enumerate(futures)}
    results: list[dict] = [{}] * len(jobs)
    for future in as_completed(futures):
        i = index[future.task_run_id]
        job, results[i] = jobs[i], future.result()
        (Path(job.out) / f"{job.method}.summary.json").write_text(json.dumps({"job": identities[i], "result": results[i]}))
        if not quiet:
            final = results[i]["by_count"][-1]["final"]
            print(f"{job.out} {job.method}: " + ", ".join(f"{k} {final[k]:.3f}" for k in QUALITY if final[k] is not None))
    return results


@contextmanager
def shared_prefect_api(quiet: bool):
    """The configured Prefect API, else this process's temporary server, for the flow and (through the task
    context) its Dask workers, which would otherwise each start a server of their own; Prefect's INFO lines
    held back when ``quiet``."""
    logger = logging.getLogger("prefect")
    level = logger.level
    if quiet:
        logger.setLevel(logging.WARNING)
    try:
        if PREFECT_API_URL.value():
            yield
        else:
            server = SubprocessASGIServer()  # the one Prefect's own client would start
            server.start()
            with temporary_settings({PREFECT_API_URL: server.api_url}):
                yield
    finally:
        logger.setLevel(level)


def run_jobs(jobs: list[Job], parallel: int = 1, quiet: bool = True, address: str | None = None) -> list[dict]:
    """``measure_method`` of every job as a Prefect task on a Dask cluster: a local one of ``parallel``
    single-threaded worker processes (no memory limit), or the scheduler at ``address``; results in the jobs'
    order. A job whose summary is already on disk (``<out>/<method>.summary.json``) for the same world,
    method, settings, counts and source is reused, so an interrupted benchmark resumes."""
    source = source_digest()
    identities = [job_identity(job, source) for job in jobs]
    results: list[dict | None] = [None] * len(jobs)
    pending = []
    for index, job in enumerate(jobs):
        saved = Path(job.out) / f"{job.method}.summary.json"
        summary = json.loads(saved.read_text()) if saved.exists() else {}
        if summary.get("job") == identities[index]:
            results[index] = summary["result"]
        else:
            pending.append(index)
    if pending:
        cluster = {"n_workers": max(1, parallel), "threads_per_worker": 1, "processes": True, "memory_limit": 0,
                   "dashboard_address": None}
        runner = DaskTaskRunner(address=address) if address else DaskTaskRunner(cluster_kwargs=cluster)
        with shared_prefect_api(quiet):
            measured = measure_flow.with_options(task_runner=runner)(
                [jobs[i] for i in pending], [identities[i] for i in pending], quiet)
        for index, result in zip(pending, measured):
            results[index] = result
    return results


def job_identity(job: Job, source: str) -> dict:
    """What makes two runs the same: the world's key, the method, its settings, the edit counts and the
    ``kdpo`` source digest."""
    world_info = json.loads((Path(job.world) / "world.json").read_text())
    return {"world": world_info.get("key"), "method": job.method, "overrides": job.overrides,
            "counts": list(job.counts), "device": job.device, "dtype": job.dtype, "source": source}
