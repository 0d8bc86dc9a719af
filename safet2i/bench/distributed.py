"""``safet2i bench --ray``: the bench's generation calls on a Ray cluster (``docs/scale.md``).

The driver (:func:`safet2i.bench.run_bench`) plans the work exactly as a local run does: per
stack, the prompts not yet recorded, cut into calls of ``batch_size`` prompts. Here each call is
a task of a :class:`BenchWorker` actor, which loads the pipeline once (``pipe_factory``), keeps the
last stack applied until a call of another stack arrives, and returns the images; the driver
writes every image and record as it arrives (so an interrupted run resumes like a local one),
then judges and reports locally. The calls and the per-image seeds are those of a local run, so
the images are too (given the same device, dtype and thread count).

Ray restarts an actor that dies (``max_restarts``) and retries its call (``max_task_retries``);
:class:`ray.util.ActorPool` hands a call to an idle actor only, so the calls in flight are at
most one per worker (backpressure).
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Any

import numpy as np

from ..errors import SafeT2IError

#: Fault-injection hook of the tests: the first worker call made while this names a file that
#: does not exist yet creates it and kills its own process (os._exit).
ENV_DIE_ONCE = "SAFET2I_BENCH_TEST_DIE_ONCE"
#: Restarts of a dead worker, and retries of the call it was running.
RETRIES = 3


class BenchWorker:
    """A Ray actor holding one pipeline (loaded once) and the stack last applied to it."""

    def __init__(self, pipe_factory, providers=None):
        from ..raycluster import actor_cpu_threads  # noqa: PLC0415

        actor_cpu_threads()
        self.pipe = pipe_factory()
        self.providers = providers
        self._key: str | None = None
        self._layers: contextlib.ExitStack | None = None
        self._generate = None

    def identity(self) -> dict[str, Any]:
        from .harness import pipeline_identity  # noqa: PLC0415

        return pipeline_identity(self.pipe)

    def run(self, job: int, run_key: str, stack, texts: list[str], seeds: list[int], pipe_kwargs: dict):
        """One generation call of ``stack``: ``(job, uint8 images, infos, seconds)``."""
        from ..raycluster import fault_injection  # noqa: PLC0415
        from .stack import apply_stack  # noqa: PLC0415

        fault_injection(ENV_DIE_ONCE)
        if run_key != self._key:
            self.close()
            layers = contextlib.ExitStack()
            try:
                self._generate = layers.enter_context(apply_stack(self.pipe, stack, providers=self.providers))
            except BaseException:
                layers.close()
                raise
            self._layers, self._key = layers, run_key
        t0 = time.perf_counter()
        images, infos = self._generate(texts, seeds, **pipe_kwargs)
        return job, np.asarray(images), infos, time.perf_counter() - t0

    def close(self) -> None:
        """Undo the applied stack."""
        layers, self._layers, self._key, self._generate = self._layers, None, None, None
        if layers is not None:
            layers.close()


class RayGenerator:
    """``with RayGenerator("auto", factory) as gen:`` workers started and their (common)
    pipeline identity in ``gen.identity``; ``gen.generate(works, ...)`` runs the calls."""

    def __init__(self, address: str, pipe_factory, workers: int | None = None, providers=None):
        self.address, self.pipe_factory, self.workers, self.providers = address, pipe_factory, workers, providers
        self.actors: list = []
        self.identity: dict[str, Any] | None = None
        self._cm = None

    def __enter__(self) -> RayGenerator:
        from ..raycluster import connected, default_workers, error_cause  # noqa: PLC0415

        self._cm = connected("safet2i bench --ray", self.address, self.workers)
        ray = self.ray = self._cm.__enter__()
        try:
            n, gpu = default_workers(ray, self.workers)
            actor = ray.remote(BenchWorker).options(num_cpus=1, num_gpus=1 if gpu else 0,
                                                    max_restarts=RETRIES, max_task_retries=RETRIES)
            self.actors = [actor.remote(self.pipe_factory, self.providers) for _ in range(n)]
            try:
                idents = ray.get([a.identity.remote() for a in self.actors])
            except ray.exceptions.RayError as exc:
                raise SafeT2IError(f"a bench worker could not load the pipeline: {error_cause(exc)}") from None
            if any(i != idents[0] for i in idents[1:]):
                raise SafeT2IError("the bench workers loaded different pipelines (their weights or configs differ: "
                                   "is --model the same file on every node?)")
            self.identity = idents[0]
        except BaseException:
            self.__exit__(*sys.exc_info())
            raise
        return self

    def __exit__(self, *exc) -> None:
        cm, self._cm = self._cm, None
        self.actors = []
        if cm is not None:
            cm.__exit__(*exc)

    def generate(self, works: list, batch_size: int, bar, pipe_kwargs: dict) -> None:
        """Every call of every work (stack), written by the driver as it comes back."""
        from ray.util import ActorPool  # noqa: PLC0415

        from ..raycluster import error_cause  # noqa: PLC0415

        ray = self.ray
        jobs = [(w, chunk) for w in works for chunk in w.chunks(batch_size)]   # stack by stack
        pool = ActorPool(self.actors)
        for j, (w, chunk) in enumerate(jobs):
            pool.submit(lambda a, v: a.run.remote(*v),
                        (j, w.run_key, w.stack, [p.text for p, _ in chunk], [p.seed for p, _ in chunk], pipe_kwargs))
        try:
            for _ in jobs:
                try:
                    j, images, infos, seconds = pool.get_next_unordered()
                except ray.exceptions.RayError as exc:
                    raise SafeT2IError(f"a bench worker failed: {error_cause(exc)} (run the same command again to resume)") \
                        from None
                w, chunk = jobs[j]
                w.write(chunk, images, infos, seconds)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            for w in works:
                w.close()
