"""The output folder of a training run (``rm train``, ``ppo``): one check before anything is written, one message.

A trainer names the entries its runs write (``run_entries``: files and folders directly under ``--output``); a
folder holding any of them holds a previous run, which a new run without ``--resume`` may replace only with
``--overwrite``. ``owns_folder``: the run's model is the folder itself (``rm train`` publishes ``config.json``,
the weights and the tokenizer files at its top level), so every entry of the folder belongs to the run and a
non-empty folder without any run entry is someone else's, never written into nor deleted; otherwise (``ppo``,
whose outputs all have run-entry names) other files are left alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

from rlhfkit.errors import RlhfkitError


def check_fresh_output(output: Path, run_entries: Sequence[str], overwrite: bool,
                       owns_folder: bool = False) -> list[str]:
    """Refuse to mix a new run into a previous one (see the module docstring); read-only. Returns the names under
    ``output`` that `prepare_fresh_output` removes (empty: nothing to replace)."""
    output = Path(output)
    if output.exists() and not output.is_dir():
        raise RlhfkitError(f"output folder {output} is a file; choose another --output")
    if not output.is_dir():
        return []
    existing = [name for name in run_entries if (output / name).exists()]
    if owns_folder and not existing:
        others = sorted(p.name for p in output.iterdir())
        if others:
            shown = ", ".join(others[:5]) + (", …" if len(others) > 5 else "")
            raise RlhfkitError(f"output folder {output} holds files of no rlhfkit run ({shown}); the run would write "
                               f"into them (--overwrite deletes only a previous run): choose another --output")
    if existing and not overwrite:
        raise RlhfkitError(f"output folder {output} already holds a run ({', '.join(existing)}); pass --resume to "
                           f"continue it, --overwrite to replace it, or choose another --output")
    return sorted(p.name for p in output.iterdir()) if owns_folder else existing


def prepare_fresh_output(output: Path, run_entries: Sequence[str], overwrite: bool,
                         owns_folder: bool = False) -> None:
    """`check_fresh_output`, then remove the previous run (its entries; ``owns_folder``: the folder's content) and
    create the folder."""
    output = Path(output)
    for name in check_fresh_output(output, run_entries, overwrite, owns_folder):
        target = output / name
        shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    output.mkdir(parents=True, exist_ok=True)
