"""In-process SIGKILL traps for the fault suite (``tests/test_faults.py``).

Python imports ``sitecustomize`` at start-up from any folder on ``PYTHONPATH``, so putting
this folder there arms the traps inside the real ``srlm run`` process. Nothing happens
unless ``SRLM_FAULT`` is set, as ``EVENT:STAGE:N`` — kill this process with SIGKILL at the
``N``-th occurrence of ``EVENT`` in stage folder ``STAGE`` (``01``, ``02``, ...):

* ``gen``: a batch of candidate responses was sampled, before it is judged;
* ``judge``: the LLM judge sampled its judgements, before they are parsed;
* ``torn-candidates`` / ``torn-pairs``: an append to that JSONL file reached the disk,
  but its last line is cut in half first (a write torn by the crash);
* ``ckpt-write``: a checkpoint's temporary folder is complete, before it is renamed;
* ``ckpt-swap``: the old checkpoint folder was moved aside and the new one is not yet
  renamed into place (no ``checkpoint/`` folder exists at this instant);
* ``state``: ``state.json`` recording stage ``STAGE`` as finished is about to be renamed
  into place (the stage's checkpoint is written, the commit is not).

``SRLM_FAULT_RUN`` is the run folder (it tells which stage ``gen``/``judge`` are in: the
newest stage folder). The traps wrap ``os.replace``, ``os.fsync`` and, once imported,
``pipeline.preference.generate_text`` and ``LLMJudge._generate``; they never change what is written
except for ``torn-*``, which models a partial write.
"""

from __future__ import annotations

import importlib.abc
import os
import signal
import sys
from pathlib import Path

_SPEC = os.environ.get("SRLM_FAULT", "")


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _stage_of(path: Path) -> str:
    return path.name[:2]


def _current_stage() -> str:
    run = Path(os.environ.get("SRLM_FAULT_RUN", "."))
    stages = sorted(p.name for p in run.glob("[0-9][0-9]-*") if p.is_dir())
    return stages[-1][:2] if stages else ""


class _Trap:
    def __init__(self, spec: str) -> None:
        event, stage, n = spec.split(":")
        self.event, self.stage, self.n = event, stage, int(n)
        self.count = 0
        self.last_replace: tuple[str, str] = ("", "")

    def hit(self, event: str, stage: str) -> bool:
        """Count an occurrence; True when it is the one to kill at."""
        if event != self.event or stage != self.stage:
            return False
        self.count += 1
        return self.count == self.n


def _install(trap: _Trap) -> None:
    real_replace, real_fsync = os.replace, os.fsync

    def replace(src, dst, *args, **kwargs):  # type: ignore[no-untyped-def]
        s, d = Path(os.fsdecode(src)), Path(os.fsdecode(dst))
        previous, trap.last_replace = trap.last_replace, (s.name, d.name)
        if d.name == "state.json" and trap.event == "state":
            try:
                import json

                finished = [r["stage"][:2] for r in json.loads(s.read_text())["finished"]]
            except (OSError, ValueError, KeyError):
                finished = []
            if trap.stage in finished and trap.hit("state", trap.stage):
                _kill()
        elif s.name.startswith(".checkpoint.tmp-") and d.name == "checkpoint":
            swapping = previous[1].startswith(".checkpoint.old-")
            stage = _stage_of(d.parent)
            if swapping and trap.hit("ckpt-swap", stage):
                _kill()
            if not swapping and trap.hit("ckpt-write", stage):
                _kill()
        elif s.name == "checkpoint" and d.name.startswith(".checkpoint.old-"):
            if trap.hit("ckpt-write", _stage_of(d.parent)):
                _kill()
        return real_replace(src, dst, *args, **kwargs)

    def fsync(fd):  # type: ignore[no-untyped-def]
        result = real_fsync(fd)
        if trap.event.startswith("torn-"):
            try:
                path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                return result
            if path.name == trap.event[len("torn-") :] + ".jsonl" and trap.hit(
                trap.event, _stage_of(path.parent)
            ):
                data = path.read_bytes()
                start = data.rfind(b"\n", 0, len(data) - 1) + 1
                os.truncate(path, start + max(1, (len(data) - start) // 2))
                _kill()
        return result

    os.replace, os.fsync = replace, fsync

    def patch_pipeline(module) -> None:  # type: ignore[no-untyped-def]
        real = module.generate_text

        def generate_text(*args, **kwargs):  # type: ignore[no-untyped-def]
            out = real(*args, **kwargs)
            if trap.hit("gen", _current_stage()):
                _kill()
            return out

        module.generate_text = generate_text

    def patch_judge(module) -> None:  # type: ignore[no-untyped-def]
        real = module.LLMJudge._generate

        def _generate(self, *args, **kwargs):  # type: ignore[no-untyped-def]
            out = real(self, *args, **kwargs)
            if trap.hit("judge", _current_stage()):
                _kill()
            return out

        module.LLMJudge._generate = _generate

    patches = {
        "self_rewarding_lm_pytorch.pipeline.preference": patch_pipeline,
        "self_rewarding_lm_pytorch.judge": patch_judge,
    }

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
            if name not in patches:
                return None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(name, path, target)
                if spec is not None and spec.loader is not None:
                    real_exec = spec.loader.exec_module

                    def exec_module(module, _real=real_exec, _patch=patches[name]):  # type: ignore[no-untyped-def]
                        _real(module)
                        _patch(module)

                    spec.loader.exec_module = exec_module  # type: ignore[method-assign]
                    return spec
            return None

    sys.meta_path.insert(0, Hook())


if _SPEC:
    _install(_Trap(_SPEC))
