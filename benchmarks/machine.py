"""gamestream's processes in the benchmarks, started as on a machine installed from the runtime pins.

This checkout's venv holds the test pins too, and one of them changes what a runtime process does: pyarrow
imports pandas whenever it is installed — at `pyarrow.dataset`'s import, and at the first conversion from
Python objects (`pa.array`, a compute function given a Python scalar) — 0.15-0.17 s of CPU in every process
that does either, such as each of `gamestream load`'s worker processes at its first chunk. The runtime pins
(`requirements.lock`) have no pandas. And this checkout is an editable install with PYTHONDONTWRITEBYTECODE set,
so every process would compile gamestream's modules again (0.08 s of CPU each), where pip compiles a wheel's
modules once when it installs it. `installed_like_a_machine` undoes both for the processes it is given to.
"""

from __future__ import annotations

import compileall
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_ONLY = ("pandas",)  # test pins that runtime modules import when present (`requirements.lock` has none)

# Hides the test pins from a child process: imported as `sitecustomize` at its start (PYTHONPATH).
_RUNTIME_ONLY = '''"""Written by benchmarks/machine.py: the test pins are not importable here, as on a machine with the
runtime pins only."""
import sys


class _TestPinsHidden:
    names = {TEST_ONLY!r}

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {{name!r}} (a test pin; hidden by benchmarks/machine.py)")
        return None


sys.meta_path.insert(0, _TestPinsHidden())
'''


def installed_like_a_machine(work: Path) -> dict[str, str]:
    """The environment (to add to os.environ) in which a gamestream process starts as on a machine installed
    from the runtime pins: gamestream's bytecode compiled, the test pins (`TEST_ONLY`) hidden."""
    compileall.compile_dir(str(ROOT / "src" / "gamestream"), quiet=1)
    site = work / "runtime-site"
    site.mkdir(parents=True, exist_ok=True)
    (site / "sitecustomize.py").write_text(_RUNTIME_ONLY.format(TEST_ONLY=set(TEST_ONLY)))
    return {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
