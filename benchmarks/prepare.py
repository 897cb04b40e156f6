"""``openmythos prepare`` benchmark: throughput, training start-up on the shards, peak memory.

    python benchmarks/prepare.py                # a 200 MB synthetic text corpus
    python benchmarks/prepare.py --mb 50        # smaller, on a busy machine
    python benchmarks/prepare.py --no-baseline  # skip the in-memory baseline

Writes a synthetic corpus (English-like words with some multi-byte characters, in 50 files,
one document each) into a temporary directory, then runs, each in a fresh process:

- ``openmythos prepare CORPUS --out SHARDS`` (byte tokenizer): wall time including the
  interpreter start, MB/s of input, peak RSS;
- training start-up on the shards: ``build_data_source(data.prepared=SHARDS)`` plus the
  first training and validation batch (the shards are memory-mapped, not read);
- the baseline, measured in the same run: start-up of ``data.text=CORPUS``, which tokenises
  the whole corpus into memory.

Targets (issue 14): >= 5 MB/s, start-up < 2 s, prepare peak RSS < 1 GB. On a shared
machine, other busy processes slow every row: the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from open_mythos.commands.argtypes import positive_float

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the of and to in is was for on that with as by at from his her it an were are which "
         "this be or has had not but one their all also new first can after two its more most "
         "loop depth model token recurrent transformer café naïve über façade 東京 数据 ✓ → ").split()
N_FILES = 50

STARTUP = """
import json, sys, time
t0 = time.perf_counter()
from open_mythos.training import DataConfig
from open_mythos.training.data import TRAIN, VAL, build_data_source
t1 = time.perf_counter()
cfg = DataConfig(**json.loads(sys.argv[1]))
src = build_data_source(cfg, seed=0)
src.batch(TRAIN, 0), src.batch(TRAIN, 10_000), src.batch(VAL, 0)
print(json.dumps({"startup_s": time.perf_counter() - t1, "import_s": t1 - t0}))
"""


def write_corpus(root: Path, total_bytes: int, seed: int = 0) -> int:
    """``N_FILES`` text files of about ``total_bytes`` in all; returns their exact size."""
    rng = np.random.default_rng(seed)
    words = np.array(WORDS)
    pool = []  # ~4 MB of lines, sliced at random offsets into every file
    for _ in range(40_000):
        line = " ".join(words[rng.integers(0, len(words), rng.integers(5, 30))])
        pool.append(line.capitalize() + ".\n")
    text = "".join(pool).encode()
    starts = np.flatnonzero(np.frombuffer(text, np.uint8) == ord("\n")) + 1  # line starts
    starts = starts[starts < len(text) // 2]
    root.mkdir(parents=True, exist_ok=True)
    written, per_file = 0, total_bytes // N_FILES
    for i in range(N_FILES):
        with open(root / f"doc{i:03d}.txt", "wb") as fh:
            left = per_file
            while left > 0:
                start = int(starts[rng.integers(0, len(starts))])
                piece = text[start:start + min(left, len(text) - start)]
                cut = piece.rfind(b"\n") + 1  # whole lines: valid UTF-8
                if cut == 0:  # the last few bytes of the file: no whole line fits
                    piece, cut = b"." * (left - 1) + b"\n", left
                fh.write(piece[:cut])
                left -= cut
                written += cut
    return written


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of ``cmd`` in a fresh process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS
        seconds = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0), err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{err.read().decode()[-3000:]}")
        return seconds, usage.ru_maxrss / 1024, out.read().decode()  # ru_maxrss: KB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=positive_float, default=200.0, help="corpus size in MB (default 200)")
    parser.add_argument("--no-baseline", action="store_true",
                        help="skip the in-memory start-up baseline")
    parser.add_argument("--dir", help="an existing directory to make the temporary work "
                        "directory in (default: the system's temporary directory); the work "
                        "directory is removed at the end")
    args = parser.parse_args()
    if args.dir is not None and not Path(args.dir).is_dir():
        parser.error(f"--dir {args.dir}: "
                     f"{'not a directory' if Path(args.dir).exists() else 'no such directory'}")
    try:
        work = tempfile.TemporaryDirectory(dir=args.dir)
    except OSError as err:
        parser.error(f"--dir {args.dir}: cannot make a directory in it ({err.strerror})")

    with work as tmp:
        corpus, shards = Path(tmp) / "corpus", Path(tmp) / "shards"
        t0 = time.perf_counter()
        size = write_corpus(corpus, int(args.mb * 1e6))
        print(f"corpus: {size / 1e6:.1f} MB in {N_FILES} files, written in "
              f"{time.perf_counter() - t0:.1f} s; load average {os.getloadavg()[0]:.2f} "
              f"on {os.cpu_count()} CPUs")

        prep_s, prep_rss, _ = run_measured(
            [sys.executable, "-m", "open_mythos", "prepare", str(corpus), "--out", str(shards),
             "--no-progress"])
        manifest = json.loads((shards / "manifest.json").read_text())
        startup_s, _, out = run_measured(
            [sys.executable, "-c", STARTUP, json.dumps({"prepared": str(shards)})])
        mapped = json.loads(out)
        rows = [("prepare (byte tokenizer)", f"{size / 1e6 / prep_s:.1f} MB/s",
                 f"{prep_s:.1f} s wall", f"peak RSS {prep_rss:.0f} MB"),
                ("start-up, data.prepared", f"{mapped['startup_s']:.3f} s",
                 f"(+{mapped['import_s']:.1f} s import)", "")]
        if not args.no_baseline:
            _, base_rss, out = run_measured(
                [sys.executable, "-c", STARTUP, json.dumps({"text": [str(corpus)]})])
            memory = json.loads(out)
            rows.append(("start-up, data.text (in memory)", f"{memory['startup_s']:.3f} s",
                         f"(+{memory['import_s']:.1f} s import)", f"peak RSS {base_rss:.0f} MB"))
        print(f"shards: {manifest['tokens']:,} tokens ({manifest['dtype']}) in "
              f"{len(manifest['shards'])} file(s)\n")
        width = max(len(r[0]) for r in rows)
        for row in rows:
            print(f"{row[0]:<{width}}  {row[1]:>12}  {row[2]:<22} {row[3]}")
        if not args.no_baseline:
            print(f"\nstart-up speed-up over in-memory tokenisation: "
                  f"{memory['startup_s'] / mapped['startup_s']:.0f}x")
        ok = [size / 1e6 / prep_s >= 5, mapped["startup_s"] < 2, prep_rss < 1024]
        print(f"targets: >= 5 MB/s {'met' if ok[0] else 'NOT met'}; start-up < 2 s "
              f"{'met' if ok[1] else 'NOT met'}; peak RSS < 1 GB {'met' if ok[2] else 'NOT met'}"
              f"; load average now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
