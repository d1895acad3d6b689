"""What a GPU benchmark needs, checked in seconds before it spends its budget: the Python packages, a CUDA
device, and what `torch.compile` needs to build its kernels (Triton, a C compiler, the Python headers).

    python benchmarks/check_environment.py [--cpu-ok] [--json environment.json]

A plain script (it imports torch, not resnet_lit or Lightning), so that it answers in a few seconds.

Exit status: 0 when everything is there; 3 when only `torch.compile` cannot work (the eager measurements
can still run; benchmarks/gpu_suite.sh then skips its compile step); 2 when the benchmark cannot run at all.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

PACKAGES = ("lightning", "torchvision", "jsonargparse", "docstring_parser", "typeshed_client")
OK, COMPILE_UNAVAILABLE, FATAL = 0, 3, 2


@dataclass
class Environment:
    """The findings: ``fatal`` problems stop the benchmark, ``compile_problems`` only its compile steps."""

    fatal: list[str] = field(default_factory=list)
    compile_problems: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def exit_code(self) -> int:
        return FATAL if self.fatal else COMPILE_UNAVAILABLE if self.compile_problems else OK


def c_compiler() -> str | None:
    """The C compiler Triton will use to build its launcher: ``$CC``, else gcc, else clang (Triton's order)."""
    configured = os.environ.get("CC")
    if configured:
        return shutil.which(configured) or (configured if os.path.isfile(configured) else None)
    return shutil.which("gcc") or shutil.which("clang")


def python_include_dir() -> str:
    """The folder Triton takes Python.h from (sysconfig's include path of the default scheme)."""
    scheme = sysconfig.get_default_scheme()
    return sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]


def compile_toolchain_problems(need_triton: bool) -> tuple[list[str], dict[str, Any]]:
    """Why `torch.compile` could not build kernels here (empty when it can), and what was found."""
    problems = []
    compiler = c_compiler()
    include = python_include_dir()
    header = os.path.join(include, "Python.h")
    info: dict[str, Any] = {"c_compiler": compiler, "python_include": include}
    if need_triton and importlib.util.find_spec("triton") is None:
        problems.append("Triton is not installed (torch.compile's GPU kernels need it): pip install triton")
    if compiler is None:
        cc = os.environ.get("CC")
        problems.append(
            f"no C compiler for torch.compile: CC={cc!r} is not an executable" if cc
            else "no C compiler for torch.compile: CC is unset and neither gcc nor clang is on PATH "
            "(install gcc, e.g. apt-get install gcc, or set CC)"
        )  # fmt: skip
    if not os.path.isfile(header):
        version = f"{sys.version_info.major}.{sys.version_info.minor}"
        problems.append(
            f"no Python headers for torch.compile: {header} does not exist "
            f"(install them, e.g. apt-get install python{version}-dev)"
        )
    if not problems and compiler is not None:
        problem = _compile_probe(compiler, include)
        if problem:
            problems.append(problem)
    return problems, info


def _compile_probe(compiler: str, include: str) -> str | None:
    """Whether ``compiler`` can compile a file that includes Python.h (what Triton builds on first use)."""
    with tempfile.TemporaryDirectory(prefix="resnet-lit-cc-") as folder:
        source = os.path.join(folder, "probe.c")
        with open(source, "w") as f:
            f.write("#include <Python.h>\nint probe(void) { return PY_MAJOR_VERSION; }\n")
        try:
            done = subprocess.run(
                [compiler, "-fsyntax-only", f"-I{include}", source], capture_output=True, text=True, timeout=30
            )
        except (OSError, subprocess.TimeoutExpired) as err:
            return f"C compiler {compiler} does not run: {err}"
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        return f"C compiler {compiler} cannot compile against {include}/Python.h: {lines[-1] if lines else ''}"
    return None


def check_environment(require_cuda: bool = True) -> Environment:
    """Packages, CUDA (unless ``require_cuda`` is false, for dry runs on CPUs) and the compile toolchain."""
    env = Environment()
    env.info.update(python=sys.version.split()[0], torch=torch.__version__, cuda_build=torch.version.cuda)
    missing = [name for name in PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        env.fatal.append(
            f"missing Python packages: {', '.join(missing)} (install them, or carry their wheels in .whl/)"
        )
    cuda = torch.cuda.is_available()
    env.info["cuda_available"] = cuda
    if cuda:
        env.info.update(gpu=torch.cuda.get_device_name(), bf16=torch.cuda.is_bf16_supported())
    elif require_cuda:
        build = f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build"
        env.fatal.append(
            f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, {build}, "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); run on a GPU machine, or SMOKE=1"
        )
    problems, info = compile_toolchain_problems(need_triton=cuda)
    env.compile_problems.extend(problems)
    env.info.update(info)
    return env


def main(argv: Sequence[str] | None = None) -> int:
    """Print the findings (and write them to ``--json``); the exit status says what can run."""
    parser = argparse.ArgumentParser(prog="check_environment.py", description=__doc__)
    parser.add_argument("--cpu-ok", action="store_true", help="do not require a CUDA device (dry runs)")
    parser.add_argument("--json", default=None, help="write the findings to this JSON file")
    args = parser.parse_args(argv)
    env = check_environment(require_cuda=not args.cpu_ok)
    print(", ".join(f"{key} {value}" for key, value in env.info.items()))
    for problem in env.fatal:
        print(f"environment: error: {problem}")
    for problem in env.compile_problems:
        print(f"environment: compile steps skipped: {problem}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**asdict(env), "exit_code": env.exit_code}, f, indent=2)
    return env.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
