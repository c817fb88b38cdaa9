"""The protocol every study follows, and the harness that runs it.

A study is one module of ``studies/`` (run from the repository root as
``python -m studies.<module>``) that defines one subclass of :class:`Study` and ends with
``main = <Subclass>().main`` and ``if __name__ == "__main__": main()``; ``make <target>``
launches its documented command. The protocol:

- **Arms** (:attr:`Study.arms`): named configurations, each a set of command-line flags of an
  example script (:class:`Config`, or a study's own type with a ``name``); ``--arms`` runs a
  subset. Every run is checked against the drop rates its arm names, from what the DropGrad
  callback logged (:func:`expected_rate_logs`, :func:`check_rates`).
- **Runs** (:meth:`Study.jobs`): one :class:`Job` per (arm, seed, and whatever else the study
  varies), seed-major so that a study cut short stays paired; each trains once and returns its
  row.
- **A resumable results file** (:meth:`Study.store`, :class:`ResultStore`): one row per run in
  ``results.csv`` (and, when rows carry nested data such as learning curves, ``results.json``),
  in the study's folder (``--out``, default :attr:`Study.out` under ``docs/study/``), written
  atomically under a lock after every run, so parallel workers never lose each other's rows and
  an interrupted study resumes where it stopped (the same command trains only the missing runs).
  ``study_meta.json`` beside it records the settings (a relaunch with other settings is refused;
  :attr:`Study.growable` ones, such as more seeds, may grow), the launching command and the
  machine (torch version, CPU count).
- **Summary and plots** (:meth:`Study.report`): ``summary.md`` and the plots are computed from
  the results file and ``study_meta.json`` alone, so ``python -m studies.<module> --report``
  rebuilds them from the committed data, byte for byte, without training.
- **Workers** (:func:`add_pool_arguments`, :func:`run_study`): ``--workers N`` re-runs the
  study's own module as N processes; each claims the next free run with a pid file (a claim of
  a process that no longer runs is taken over) and trains it in-process. A study whose later
  runs depend on earlier ones (``study_speed`` chooses rates from its grid) waits for the runs
  other live workers still hold (:meth:`ResultStore.wait_for`) instead of leaving the rest to
  one worker.
- **Statistics** (:func:`mean_sd`, :func:`mean_se`, :func:`paired`, :func:`fmt`): seeds are
  paired across arms, so arms are compared seed by seed.

A study loads the example it trains with :func:`load_example` (the examples are scripts, not a
package) and runs it in-process with :func:`run_example`.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import importlib.util
import io
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import IO, Any, NamedTuple

ROOT = Path(__file__).resolve().parent.parent

#: The examples run offline; every study sets these before training.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def set_offline() -> None:
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def slug(name: str) -> str:
    """A file-name-safe version of an arm's name."""
    return "".join(c if c.isalnum() else "_" for c in name).strip("_")


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (once per process), without touching
    ``sys.path`` (the examples find their own helpers)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while building the class
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


class ExampleRun(NamedTuple):
    """What one in-process run of an example leaves: its trainer's log history, what ``read``
    took from its output folder (before the folder was removed), and its wall and CPU seconds
    (training, reading and cleaning up)."""

    history: list[dict]
    result: Any
    seconds: float
    cpu_seconds: float


def run_example(name: str, argv: Callable[[Path], list[str]],
                read: Callable[[Path, list[dict]], Any], log: IO[str],
                scratch: str | None = None, prefix: str = "run_") -> ExampleRun:
    """Run ``examples/<name>.py``'s ``main(argv(output_dir))`` in this process, in a fresh
    folder under ``scratch``, its standard output (the example's final table) written to ``log``;
    ``read(output_dir, log_history)`` checks and scores the saved run; the folder (the model's
    weights, tens to hundreds of MB) is removed whatever happens."""
    example = load_example(name)
    output_dir = Path(tempfile.mkdtemp(prefix=prefix, dir=scratch))
    start, cpu = time.time(), time.process_time()
    try:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            example.main(argv(output_dir))
        log.write(buffer.getvalue())
        history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
        result = read(output_dir, history)
    finally:
        shutil.rmtree(output_dir, ignore_errors=True)
    return ExampleRun(history, result, time.time() - start, time.process_time() - cpu)


# ---------------------------------------------------------------- rate checks


@dataclass(frozen=True)
class Config:
    """One arm of a study: a name, the DropGrad flags, and what to plot it against."""

    name: str
    flags: tuple[str, ...] = ()
    rate: float = 0.0
    where: str = "none"
    full_update_drop: bool = False


def expected_rate_logs(config: Config) -> dict[str, float]:
    """The `dropgrad_rate*` entries the DropGrad callback must log for this configuration."""
    from hf_dropgrad.training_args import parse_module_rates

    flags = {
        flag: value
        for flag, value in zip(config.flags, [*config.flags[1:], "--"])
        if flag.startswith("--") and not value.startswith("--")
    }
    module_rates = parse_module_rates(flags.get("--dropgrad_module_rates"))
    if module_rates:
        return {f"dropgrad_rate/{name}": rate for name, rate in module_rates.items() if rate}
    rate = float(flags.get("--dropgrad_rate", "nan"))
    return {"dropgrad_rate": rate} if rate else {}


def check_rates(config: Config, log_history: list[dict], run_dir: Path) -> None:
    """Fail loudly when a run trained with other drop rates than its configuration says."""
    logged: dict[str, set[float]] = {}
    for entry in log_history:
        for key, value in entry.items():
            if key.startswith("dropgrad_rate"):
                logged.setdefault(key, set()).add(value)
    logged = {key: values for key, values in logged.items() if values != {0.0}}  # p=0: a no-op
    expected = expected_rate_logs(config)
    if logged != {key: {rate} for key, rate in expected.items()}:
        raise RuntimeError(
            f"{run_dir}: configuration {config.name!r} expects the logged drop rates "
            f"{expected or 'to be absent (no DropGrad)'}, the run logged {logged}"
        )


# ---------------------------------------------------------------- results on disk


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _parse_bool(text: str) -> bool:
    if text not in ("True", "False"):
        raise ValueError(f"not a bool: {text!r}")
    return text == "True"


_PARSERS: dict[type, Callable[[str], Any]] = {int: int, float: float, bool: _parse_bool, str: str}


class ResultStore:
    """The rows of one study in a folder, one per run, identified by ``key_fields``.

    With ``keep_json`` the rows (nested data included) live in ``results.json`` and
    ``results.csv`` is their flat view (``csv_fields``); without it ``results.csv`` is the
    store itself and ``field_types`` tells how to read its columns back.
    """

    def __init__(self, out: Path, key_fields: Sequence[str], csv_fields: Sequence[str],
                 sort_key: Callable[[dict], Any] | None = None, keep_json: bool = True,
                 field_types: Mapping[str, type] | None = None) -> None:
        self.out = Path(out)
        self.key_fields = tuple(key_fields)
        self.csv_fields = list(csv_fields)
        self.sort_key = sort_key
        self.keep_json = keep_json
        self.field_types = dict(field_types or {})

    def key(self, row: Mapping[str, Any]) -> tuple:
        return tuple(row[name] for name in self.key_fields)

    def load(self) -> list[dict]:
        if self.keep_json:
            path = self.out / "results.json"
            return json.loads(path.read_text()) if path.exists() else []
        return read_csv(self.out / "results.csv", self.field_types)

    def save(self, rows: list[dict]) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.keep_json:
            atomic_write(self.out / "results.json", json.dumps(rows, indent=1))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=self.csv_fields, extrasaction="ignore",
                                lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(self.out / "results.csv", buffer.getvalue())

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Serialise the read-append-write of the results between parallel workers."""
        import fcntl

        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / ".results.lock", "w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def append(self, row: dict) -> list[dict]:
        """Add one finished run (re-read under the lock, so other workers' rows stay)."""
        with self.lock():
            rows = [r for r in self.load() if self.key(r) != self.key(row)]
            rows.append(row)
            if self.sort_key is not None:
                rows.sort(key=self.sort_key)
            self.save(rows)
        return rows

    def _claim_path(self, key: tuple) -> Path:
        return self.out / "claims" / slug("_".join(str(part) for part in key))

    @staticmethod
    def _held_by_live_process(path: Path) -> bool:
        try:
            os.kill(int(path.read_text()), 0)
        except (FileNotFoundError, ValueError, ProcessLookupError):
            return False
        return True

    def claim(self, key: tuple) -> Path | None:
        """Reserve the run ``key`` for this process; None when it is finished or another live
        worker holds it. A claim of a process that no longer runs is taken over."""
        path = self._claim_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock():
            if any(self.key(r) == key for r in self.load()):
                return None
            if self._held_by_live_process(path):
                return None  # a live worker trains it
            path.write_text(str(os.getpid()))
        return path

    def wait_for(self, keys: Iterable[tuple], poll_seconds: float = 20.0) -> None:
        """Return once none of ``keys`` is still being trained by another live worker: each is
        finished, or unclaimed (then the caller sees it missing). A phase that needs all of
        them (a choice among runs) waits for the other workers instead of giving up."""
        pending = set(keys)
        while True:
            pending -= {self.key(r) for r in self.load()}
            if not any(self._held_by_live_process(self._claim_path(key)) for key in pending):
                return
            time.sleep(poll_seconds)


def read_csv(path: Path, field_types: Mapping[str, type]) -> list[dict]:
    """The rows of a results CSV, columns named in ``field_types`` parsed back to their type
    (an empty cell reads as None)."""
    if not path.exists():
        return []
    rows = []
    with open(path, newline="") as handle:
        for raw in csv.DictReader(handle):
            row: dict[str, Any] = {}
            for name, text in raw.items():
                kind = field_types.get(name, str)
                row[name] = None if text == "" and kind is not str else _PARSERS[kind](text)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- meta data of a study


def read_meta(out: Path) -> dict:
    """``out/study_meta.json`` ({} before the first launch)."""
    path = out / "study_meta.json"
    return json.loads(path.read_text()) if path.exists() else {}


def machine() -> dict[str, Any]:
    """What the launching machine is, for the summary: torch version and CPU count."""
    import torch

    return {"torch": torch.__version__, "cpu_count": os.cpu_count()}


def check_meta(out: Path, settings: dict, has_rows: bool, command: str | None,
               extra: dict | None = None) -> dict:
    """Refuse to mix runs of other settings into ``out``; record the launching command.

    ``command`` is None in a worker (its launcher already wrote the record). ``extra`` holds
    what may grow between launches (more seeds, more learning rates): merged by the caller.
    """
    path = out / "study_meta.json"
    meta = read_meta(out)
    if has_rows and meta.get("settings") not in (None, settings):
        raise SystemExit(f"{out} holds runs with other settings ({meta['settings']}); "
                         "use another --out or the same settings")
    if command is not None:
        meta = {"settings": settings, **(extra or {}), "command": command}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(path, json.dumps(meta, indent=1))
    return meta


# ---------------------------------------------------------------- the worker pool


class Job(NamedTuple):
    """One run of a study: its key in the store, a label for the log, and how to train it
    (called with the worker's log file; returns the row)."""

    key: tuple
    label: str
    train: Callable[[IO[str]], dict]


def add_pool_arguments(parser: argparse.ArgumentParser,
                       budget_minutes: float = math.inf) -> None:
    parser.add_argument("--budget_minutes", type=float, default=budget_minutes,
                        help="launch no new run after this; finished runs are kept")
    parser.add_argument("--workers", type=int, default=1,
                        help="train this many runs at once, in worker processes that each take "
                        "the next free run; with --threads 1 this uses a shared, busy machine "
                        "better than one process whose threads wait for each other")
    parser.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per run (default: torch's own choice)")
    parser.add_argument("--scratch", type=Path, default=None,
                        help="where runs write their output directories (deleted after)")


def run_study(args: argparse.Namespace, argv: Sequence[str], module: str,
              store: ResultStore, jobs: Iterable[Job], describe: Callable[[dict], str],
              report: Callable[[], str]) -> list[dict]:
    """Train every job not yet in ``store``, in this process or in ``args.workers`` workers
    (``python -m module`` with the same arguments), then (in the launching process) print
    ``report()``. Returns the rows on disk."""
    if args.workers > 1 and args.worker is None:
        procs = [subprocess.Popen([sys.executable, "-m", module, *argv, "--worker", str(k)])
                 for k in range(args.workers)]
        codes = [proc.wait() for proc in procs]
        print(report())
        if any(codes):
            raise SystemExit(f"a worker failed (exit codes {codes}); rerun to resume")
        return store.load()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    done = {store.key(r) for r in store.load()}
    start = time.time()
    log_name = "study.log" if args.worker is None else f"study.worker{args.worker}.log"
    with open(store.out / log_name, "a") as log:
        for job in jobs:
            if job.key in done:
                continue
            if (time.time() - start) / 60 > args.budget_minutes:
                print("time budget reached; rerun the same command to resume", flush=True)
                break
            held = store.claim(job.key)  # workers take the next free run
            if held is None:
                continue
            try:
                row = job.train(log)
                store.append(row)
            finally:
                held.unlink(missing_ok=True)
            print(f"[{(time.time() - start) / 60:5.1f} min] {job.label}: {describe(row)}",
                  flush=True)
    if args.worker is None:
        print(report())
    return store.load()


# ---------------------------------------------------------------- the protocol


class Study:
    """One study: subclass it, set the class attributes, and write :meth:`store`, :meth:`jobs`,
    :meth:`describe` and :meth:`report`; :meth:`main` is the command line (see the module
    docstring for the protocol).

    The command line: the study's own settings (:meth:`add_arguments`; by default one flag per
    key of :attr:`defaults`, typed as its default), ``--arms`` (when :attr:`arms` is set),
    ``--report``, ``--out`` and the worker pool's flags (:func:`add_pool_arguments`).
    """

    #: The module that ``python -m`` runs, e.g. ``"studies.study_tuned"``: the recorded
    #: command names it, and worker processes run it.
    module: str = ""
    #: The documented study's folder, relative to the repository root (``--out``'s default).
    out: str = ""
    #: The documented study's settings: the command line's defaults (``seeds`` among them).
    defaults: Mapping[str, Any] = {}
    #: Settings that may grow between launches of one study; the others must stay the same.
    growable: tuple[str, ...] = ("seeds",)
    #: The arms, in the order of the tables (objects with a ``name``); ``--arms`` picks some.
    arms: Sequence[Any] = ()
    #: ``--budget_minutes``'s default: launch no new run after this many minutes.
    budget_minutes: float = math.inf

    # ------------------------------------------------------------ what a study writes

    def store(self, out: Path) -> ResultStore:
        """The study's results file in ``out``: which fields identify a run, the CSV columns."""
        raise NotImplementedError

    def jobs(self, args: argparse.Namespace) -> Iterable[Job]:
        """Every run of the study, seed-major; the finished ones are skipped."""
        raise NotImplementedError

    def describe(self, row: dict) -> str:
        """One line of the log for a finished run."""
        raise NotImplementedError

    def report(self, out: Path, meta: Mapping[str, Any]) -> str:
        """Write ``out/summary.md`` (and the plots) from the results file and ``meta`` (the
        study's ``study_meta.json``) alone; return the summary's text."""
        raise NotImplementedError

    # ------------------------------------------------------------ what a study may change

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """The study's own settings; by default one flag per key of :attr:`defaults`."""
        for key, value in self.defaults.items():
            if isinstance(value, list):
                parser.add_argument(f"--{key}", type=type(value[0]), nargs="+", default=value)
            else:
                parser.add_argument(f"--{key}", type=type(value), default=value)

    def check_arguments(self, args: argparse.Namespace) -> None:
        """Refuse bad settings (``SystemExit`` naming the flag) before anything trains."""

    def settings(self, args: argparse.Namespace) -> dict[str, Any]:
        """The settings every run of one study folder must share (``study_meta.json``)."""
        return {key: getattr(args, key) for key in self.defaults if key not in self.growable}

    def grown(self, args: argparse.Namespace, old: Mapping[str, Any]) -> dict[str, Any]:
        """What this launch records of the :attr:`growable` settings (``old``: the previous
        ``study_meta.json``); by default the most seeds any launch asked for."""
        return {"seeds": max(args.seeds, old.get("seeds", 0))}

    def command(self, argv: Sequence[str]) -> str:
        """The launching command as ``study_meta.json`` records it."""
        return shlex.join(["python", "-m", self.module, *argv])

    def selected_arms(self, args: argparse.Namespace) -> list[Any]:
        """The arms ``--arms`` names, in :attr:`arms`' order (all of them by default)."""
        if not getattr(args, "arms", None):
            return list(self.arms)
        return [arm for arm in self.arms if arm.name in args.arms]

    # ------------------------------------------------------------ the command line

    def main(self, argv: Sequence[str] | None = None) -> list[dict]:
        """Train the runs not yet in the results file (``--report``: none), then write the
        summary and the plots. Returns the rows on disk."""
        parser = argparse.ArgumentParser(
            prog=f"python -m {self.module}", description=sys.modules[type(self).__module__].__doc__,
            formatter_class=argparse.RawTextHelpFormatter,
        )
        self.add_arguments(parser)
        if self.arms:
            parser.add_argument("--arms", nargs="+", default=None,
                                choices=list(dict.fromkeys(arm.name for arm in self.arms)),
                                metavar="ARM", help="only these arms (names as in the tables)")
        parser.add_argument("--report", action="store_true",
                            help="only rebuild summary.md and the plots from the results file")
        parser.add_argument("--out", type=Path, default=ROOT / self.out)
        add_pool_arguments(parser, self.budget_minutes)
        argv = list(sys.argv[1:] if argv is None else argv)
        args = parser.parse_args(argv)
        self.check_arguments(args)
        args.out.mkdir(parents=True, exist_ok=True)
        set_offline()

        results = self.store(args.out)
        old = read_meta(args.out)
        if args.report:
            print(self.report(args.out, old))
            return results.load()
        # the command as launched (how many workers does not matter); workers only check
        command = self.command(argv) if args.worker is None else None
        meta = check_meta(args.out, self.settings(args), bool(results.load()), command,
                          {**self.grown(args, old), "machine": machine()})
        return run_study(args, argv, self.module, results, self.jobs(args), self.describe,
                         lambda: self.report(args.out, meta))


# ---------------------------------------------------------------- statistics


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation; the deviation of fewer than two values is
    undefined (nan, shown as "—"), not 0: one run says nothing about the spread."""
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else math.nan


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (nan below two values)."""
    m, sd = mean_sd(values)
    return m, sd / math.sqrt(len(values)) if len(values) > 1 else math.nan


class Paired(NamedTuple):
    """Per-seed differences ``arm - reference``: their mean and standard error, in how many
    seeds the arm was better or worse, and how many seeds both have."""

    mean: float
    se: float
    better: int
    worse: int
    n: int


def paired(values: Mapping[Any, float], reference: Mapping[Any, float],
           lower_is_better: bool = False) -> Paired:
    """Compare two arms seed by seed: ``values`` and ``reference`` map a seed to a result;
    seeds missing from either are left out."""
    diffs = [value - reference[seed] for seed, value in values.items()
             if seed in reference and value is not None and reference[seed] is not None]
    m, se = mean_se(diffs)
    better = sum(1 for d in diffs if (d < 0 if lower_is_better else d > 0))
    worse = sum(1 for d in diffs if (d > 0 if lower_is_better else d < 0))
    return Paired(m, se, better, worse, len(diffs))


def fmt(value: float, digits: int = 1, sign: bool = False) -> str:
    """A number for a table; nan (undefined) as "—"."""
    if value is None or math.isnan(value):
        return "—"
    return f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


# ---------------------------------------------------------------- plots


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` on the file-only Agg backend (studies run headless, in workers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 110) -> Path:
    """Lay a figure out, write it to ``path`` and close it (``--report`` rebuilds every plot, so
    none may stay open)."""
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def learning_rate_axis(ax: Any, learning_rates: Iterable[float]) -> None:
    """A log x axis ticked at exactly the grid's learning rates."""
    grid = sorted(learning_rates)
    ax.set_xscale("log")
    ax.set_xticks(grid, [f"{rate:g}" for rate in grid])
    ax.minorticks_off()
    ax.set_xlabel("learning rate (AdamW peak)")
