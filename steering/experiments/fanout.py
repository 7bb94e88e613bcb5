"""Experiment units fanned out as Ray tasks (issue 21), still resumable and equal to the serial run.

    python -m steering.experiments groups --workers 2                      # a local Ray, 2 workers
    python -m steering.experiments groups --workers 16 --ray-address auto  # an existing cluster

A `Job` names a unit, its settings and a module-level function ``fn(bundle, **kwargs) -> dict``.
Units already on disk with the same settings are read, as in the serial run (`common.Units`).
With ``workers=0`` the rest run here, one after another, on the loaded bundle. With ``workers``
> 0 each Ray worker is an actor that loads the preset once (model + SAEs) and runs jobs in turn;
the driver writes every unit file as results come back (in submission order), so a run killed
midway resumes where it stopped, and the summary is built from the same unit results as the
serial run. Ray is an optional extra (`pip install ray`): only this module imports it.

On a cluster every node needs this project installed (and the preset's assets); locally the
workers find the package through PYTHONPATH. Each worker uses one CPU thread (one Ray CPU), so
two local workers on a 2-core machine use both cores, as one serial process does with two
threads.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from .common import Units

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Job:
    """One resumable unit: ``fn(bundle, **kwargs)`` must be a module-level function (Ray sends it
    by reference) and return a JSON-ready dict."""

    name: str
    settings: dict
    fn: Callable[..., dict]
    kwargs: dict = field(default_factory=dict)


class _Worker:
    """A Ray actor holding one loaded bundle."""

    def __init__(self, preset: str, device: str | None):
        import torch

        from ..bundle import Bundle

        torch.set_num_threads(1)
        self.bundle = Bundle.load(preset, device=device)

    def run(self, fn: Callable[..., dict], kwargs: dict) -> dict:
        return fn(self.bundle, **kwargs)


def run_jobs(units: Units, jobs: list[Job], bundle=None, workers: int = 0, preset: str | None = None,
             device: str | None = None, address: str | None = None,
             prepare: Callable[[], None] | None = None,
             progress: Callable[[Iterable], Iterable] | None = None) -> dict[str, dict]:
    """Results of every job by name: cached units read, the rest computed serially on ``bundle``
    (``workers=0``) or on ``workers`` Ray actors loading ``preset`` (``address``: an existing
    cluster, e.g. ``auto``; default a local Ray started here and shut down after). ``prepare``:
    called once before the first job that runs serially (state the jobs share on ``bundle``, e.g.
    fitted match tables; a Ray job prepares its own worker's bundle through its kwargs).
    ``progress``: wraps the iteration over the units computed (a tqdm bar, `common.progress`).

    Raises:
        ValueError: ``workers`` < 0, or > 0 without ``preset``.
        ImportError: ``workers`` > 0 and Ray is not installed (with the install command).
    """
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    out = {j.name: units.cached(j.name, j.settings) for j in jobs}
    todo = [j for j in jobs if out[j.name] is None]
    if not todo:
        return out
    if workers == 0:
        if prepare is not None:
            prepare()
        for j in (progress or iter)(todo):
            out[j.name] = units.put(j.name, j.settings, j.fn(bundle, **j.kwargs))
        return out
    if not preset:
        raise ValueError("fanning out needs the preset (name or preset.json path) the workers load")
    try:
        import ray
        from ray.util import ActorPool
    except ImportError as e:
        raise ImportError("--workers needs Ray, an optional extra: pip install 'ray==2.60.0'") from e
    started = not ray.is_initialized()
    if started:
        env = {"PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
        # the judge's key and server too: a worker must score with the driver's judge
        for key in ("FFP_CACHE", "HF_HUB_OFFLINE", "HF_HOME", "OPENAI_API_KEY", "OPENAI_BASE_URL"):
            if key in os.environ:
                env[key] = os.environ[key]
        ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": env})
    try:
        actor = ray.remote(num_cpus=1)(_Worker)
        where = Path(preset)  # a preset.json path must resolve in the workers too
        name = str(where.resolve()) if where.suffix == ".json" or where.is_dir() else str(preset)
        pool = ActorPool([actor.remote(name, device) for _ in range(min(workers, len(todo)))])
        log.info("fanning %d units out to %d Ray workers", len(todo), min(workers, len(todo)))
        results = pool.map(lambda a, j: a.run.remote(j.fn, j.kwargs), todo)
        for j, result in (progress or iter)(zip(todo, results)):
            out[j.name] = units.put(j.name, j.settings, result)
    finally:
        if started:
            ray.shutdown()
    return out
