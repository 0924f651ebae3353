"""The process-tree sampler that `bench` reports memory and CPU seconds with."""

from __future__ import annotations

import subprocess
import sys

from denseforge.pipeline.bench.memory import TreeMemory

BURN = (
    "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
    "time.sleep(0.3)\nprint(time.process_time())"
)


def test_a_childs_cpu_seconds_and_memory_are_counted():
    with TreeMemory(interval_s=0.05) as tree:
        child = subprocess.run([sys.executable, "-c", BURN], capture_output=True, text=True, check=True)
    own = float(child.stdout)
    counted = tree.cpu_between(tree.samples[0][0], tree.samples[-1][0])
    assert own >= 0.6 and 0.9 * own <= counted <= own + 1.0  # + this process's own CPU meanwhile
    assert tree.peak > 10 * 2**20


def test_cpu_between_takes_the_nearest_samples():
    tree = TreeMemory()
    tree.samples = [(10.0, 1.0, 5), (11.0, 2.5, 9), (12.0, 4.0, 7), (13.0, 4.0, 3)]
    assert tree.cpu_between(11.0, 12.0) == 1.5
    assert tree.cpu_between(10.5, 12.0) == 1.5  # first sample at or after the start
    assert tree.cpu_between(0.0, 99.0) == 3.0  # clamped to the first and last samples


def test_peak_between_is_the_largest_sample_in_the_window():
    tree = TreeMemory()
    tree.samples = [(10.0, 1.0, 5), (11.0, 2.5, 9), (12.0, 4.0, 7), (13.0, 4.0, 3)]
    assert tree.peak_between(11.5, 13.0) == 7
    assert tree.peak_between(0.0, 10.0) == 5
    assert tree.peak_between(0.0, 99.0) == 9
