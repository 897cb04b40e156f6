"""``keep_freed_memory``: after it, a freed large tensor's pages stay in the process (and are
reused), where glibc's default returns them to the OS; ``return_freed_memory`` undoes it.
Each case runs in a fresh interpreter: the setting is process-wide."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

SCRIPT = """
import sys, torch
from open_mythos.devices import keep_freed_memory

def rss_mb():
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / 2**20

applied = keep_freed_memory() if sys.argv[1] != "default" else None
x = torch.ones(64 * 2**20 // 4)  # 64 MB, touched
held = rss_mb()
del x
if sys.argv[1] == "undone":
    from open_mythos.devices import return_freed_memory
    applied = return_freed_memory()
print(applied, held - rss_mb())
"""

# Undone: an 8 MB tensor made and freed again and again reuses the same pages, as in a
# process whose glibc has adapted its thresholds; with glibc's initial 128 KiB thresholds
# (which a mallopt freezes) each one went back to the OS and was page-faulted in again
# (~40x slower in a loop).
CYCLE = """
import resource, torch
from open_mythos.devices import keep_freed_memory, return_freed_memory
keep_freed_memory(), return_freed_memory()
x = torch.randn(512, 512)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    y = torch.empty(2 * 2**20).fill_(1.0)
    del y
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="glibc's allocator")
def test_freed_memory_stays_in_the_process_only_when_asked():
    released = {}
    for mode in ("default", "keep", "undone"):
        out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True,
                             text=True, check=True).stdout.split()
        released[mode] = float(out[1])
        if mode != "default":
            assert out[0] == "True"
    assert released["default"] > 48  # the 64 MB went back to the OS
    assert released["keep"] < 8       # ... or stayed
    assert released["undone"] > 48   # ... and went back once undone (Trainer.train's end)
    # 20 allocations of 8 MB (2,048 pages each): faulted in a few times, not 20 (41,008
    # faults with 128 KiB thresholds, ~6,000 with the adapted ones).
    faults = int(subprocess.run([sys.executable, "-c", CYCLE], capture_output=True, text=True,
                                check=True).stdout)
    assert faults < 12 * 2048


def test_trainer_keeps_freed_memory_on_the_cpu_unless_told_not_to(tmp_path, monkeypatch):
    from open_mythos.training import Trainer
    from open_mythos.training import trainer as trainer_mod
    from tests.training.conftest import tiny_config

    calls = []
    monkeypatch.setattr(trainer_mod, "keep_freed_memory", lambda: calls.append("keep") or True)
    monkeypatch.setattr(trainer_mod, "return_freed_memory",
                        lambda: calls.append("return") or True)
    Trainer(tiny_config(tmp_path / "a", run__steps=1)).train()
    assert calls == ["keep", "return"]  # not for the rest of the process (a notebook's)
    Trainer(tiny_config(tmp_path / "b", run__steps=1, run__keep_freed_memory=False)).train()
    assert calls == ["keep", "return"]
