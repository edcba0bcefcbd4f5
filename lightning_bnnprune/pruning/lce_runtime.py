"""Running ``.tflite`` files in Larq Compute Engine's own interpreter: outputs and latency.

LCE 0.16's ``LiteInterpreter(flatbuffer, threads, use_reference_bconv, use_indirect_bgemm,
use_xnnpack)`` chooses how its binary convolution runs; :data:`KERNELS` names the three paths:

- ``"indirect_bgemm"`` (the default): LCE's indirect BGEMM kernel for ``LceBconv2d`` and TFLite's
  XNNPack delegate for the float ops, ``(False, True, True)``; the fast path on x86-64 too.
- ``"optimized"``: LCE's default (im2col + BGEMM) kernel, TFLite's builtin float kernels,
  ``(False, False, False)`` (what ``lce_predict`` ran before it named a path).
- ``"reference"``: LCE's reference ``LceBconv2d``, ``(True, False, False)``: slow and simple, the
  one that checks what a file asks of LCE most strictly (zero padding with an odd channel count).

LCE 0.16.0 is compiled against the numpy 1 ABI: in a numpy 2 process its interpreter sees every
input as 0 bytes. Under numpy 2 the interpreter therefore runs in a second Python that has
``numpy<2`` and ``larq-compute-engine`` (``python=``, else the environment variable
``BNNPRUNE_LCE_PYTHON``), which runs *this file* as a script on a JSON job; under numpy 1 it runs
in the calling process. The module imports nothing from the package (nor torch) at the top, so
that the second Python can run it.

Latency (:func:`lce_latency`) is timed as ``benchmarks/lce_latency.py`` times it: one interpreter
per file, a warm-up, then ``rounds`` rounds of ``calls`` invocations, the per-call time of each
round; the minimum and the median over rounds. Several files are timed round-robin in one process
(each round times every file in turn), so a load that comes and goes hits them all alike: on a
shared machine their ratios mean more than their times.
"""
from __future__ import annotations

import glob
import importlib.machinery
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["KERNELS", "lce_latency", "lce_predict", "lce_python"]

# paths.PathLike and checks.is_int spelled here again: this file also runs as a script in LCE's Python,
# where the package is not importable (see the module docstring).
PathLike = Union[str, "os.PathLike[str]"]

#: kernel path -> ``(use_reference_bconv, use_indirect_bgemm, use_xnnpack)``
KERNELS: Dict[str, Tuple[bool, bool, bool]] = {
    "indirect_bgemm": (False, True, True),
    "optimized": (False, False, False),
    "reference": (True, False, False),
}
DEFAULT_KERNELS = "indirect_bgemm"


def _check_kernels(kernels: Union[str, Sequence[str]]) -> List[str]:
    names = [kernels] if isinstance(kernels, str) else list(kernels)
    bad = [k for k in names if k not in KERNELS]
    if bad or not names:
        raise ValueError(f"kernels must be one of {', '.join(map(repr, KERNELS))} (or a list of them); "
                         f"got {kernels!r}")
    return names


def _numpy1() -> bool:
    return int(np.__version__.split(".")[0]) < 2


def lce_python(python: Optional[str] = None) -> Optional[str]:
    """The Python that runs LCE's interpreter: ``python``, else ``$BNNPRUNE_LCE_PYTHON``, else
    None when this process can run it itself (numpy 1).

    Raises:
        RuntimeError: under numpy 2 with neither (one line, saying what to set).
    """
    python = python or os.environ.get("BNNPRUNE_LCE_PYTHON")
    if python or _numpy1():
        return python or None
    raise RuntimeError("LCE's interpreter needs numpy<2 (larq-compute-engine 0.16 is built against numpy 1); "
                       "pass python= or set BNNPRUNE_LCE_PYTHON to a Python with 'numpy<2' and "
                       "larq-compute-engine")


# --- the interpreter side: runs here under numpy 1, else as this file in the LCE Python ---------

def _wrapper():
    """LCE's ``interpreter_wrapper_lite`` extension, loaded without the package's ``__init__``
    (which imports TensorFlow)."""
    spec = importlib.util.find_spec("larq_compute_engine")  # locates, does not import
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("larq-compute-engine is not installed in this Python")
    pattern = os.path.join(list(spec.submodule_search_locations)[0], "tflite", "python",
                           "interpreter_wrapper_lite*.so")
    so = glob.glob(pattern)[0]
    loader = importlib.machinery.ExtensionFileLoader("interpreter_wrapper_lite", so)
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(
        "interpreter_wrapper_lite", so, loader=loader))
    loader.exec_module(module)
    return module


def _interpreter(wrapper, path: str, threads: int, kernels: str):
    with open(path, "rb") as f:
        blob = f.read()
    return wrapper.LiteInterpreter(blob, int(threads), *KERNELS[kernels])


def _predict(job: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """Outputs of ``job["model"]`` on ``job["inputs"]`` (NHWC, one image per call), per kernel path."""
    wrapper = _wrapper()
    x = np.load(job["inputs"])
    outputs = {}
    for kernels in job["kernels"]:
        runner = _interpreter(wrapper, job["model"], job["threads"], kernels)
        batch = runner.input_shapes[0][0]
        outputs[kernels] = np.concatenate([runner.predict([x[i:i + batch]])[0] for i in range(0, len(x), batch)])
    return outputs


def _latency(job: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Round-robin timing of ``job["models"]``: per file, the per-call seconds of every round."""
    wrapper = _wrapper()
    runners = [_interpreter(wrapper, p, job["threads"], job["kernels"]) for p in job["models"]]
    rng = np.random.default_rng(0)
    inputs = []
    for path, runner in zip(job["models"], runners):
        shape = tuple(runner.input_shapes[0])
        if shape[0] != job["batch"]:
            raise RuntimeError(f"{path} takes batch {shape[0]}, not batch={job['batch']} (export_lce writes batch 1)")
        inputs.append([rng.standard_normal(shape).astype(np.float32)])
    for runner, x in zip(runners, inputs):
        for _ in range(job["warmup"]):
            runner.predict(x)
    seconds: List[List[float]] = [[] for _ in runners]
    for r in range(job["rounds"]):
        for k in range(len(runners)):
            i = (r + k) % len(runners)  # each round starts at the next file: no file always goes first
            runner, x = runners[i], inputs[i]
            start = time.perf_counter()
            for _ in range(job["calls"]):
                runner.predict(x)
            seconds[i].append((time.perf_counter() - start) / job["calls"])
    return [{"input_shape": list(r.input_shapes[0]), "seconds": s} for r, s in zip(runners, seconds)]


def _main(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    if job["task"] == "predict":
        np.savez(job["outputs"], **_predict(job))
    else:
        with open(job["outputs"], "w") as f:
            json.dump(_latency(job), f)


# --- the calling side ---------------------------------------------------------------------------

def _run(job: Dict[str, Any], python: Optional[str]) -> None:
    """Run ``job`` in LCE's Python (this file as a script); a failure is one line: TFLite's own
    error (what it logs to stderr, e.g. a kernel's refusal) and the interpreter's last line."""
    job_path = os.path.join(os.path.dirname(job["outputs"]), "job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    # -I: this file's folder (the package's modules) stays off the other Python's sys.path
    done = subprocess.run([python, "-I", os.path.abspath(__file__), job_path], capture_output=True, text=True)
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).strip().splitlines()] or ["(no output)"]
        tflite = [line for line in lines if line.startswith("ERROR:") and "Node number" not in line]
        last = lines[-1]
        raise RuntimeError(f"LCE's interpreter ({python}) failed: "
                           + (f"{tflite[0]} ({last})" if tflite and tflite[0] not in last else last))


def _nhwc(images) -> np.ndarray:
    x = images.detach().cpu().numpy() if hasattr(images, "detach") else np.asarray(images)
    if x.ndim != 4:
        raise ValueError(f"images must be [N, C, H, W], got shape {list(x.shape)}")
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=np.float32)


def lce_predict(model: Union[PathLike, bytes], images, num_threads: int = 1, python: Optional[str] = None,
                kernels: Union[str, Sequence[str]] = DEFAULT_KERNELS) -> Union[np.ndarray, Dict[str, np.ndarray]]:
    """Run a ``.tflite`` file (or its bytes) with LCE's own interpreter.

    Args:
        model: the path of an :func:`~lightning_bnnprune.export_lce` file, or its bytes.
        images: ``[N, C, H, W]`` float images (tensor or array), normalised as for the PyTorch
            model (NCHW, as PyTorch takes them; transposed to the file's NHWC here); run in
            chunks of the file's batch (1 for ``export_lce``'s files).
        num_threads: the interpreter's threads.
        python: the numpy<2 Python with ``larq-compute-engine`` (default
            ``$BNNPRUNE_LCE_PYTHON``; not needed under numpy 1).
        kernels: the kernel path that runs it (see :data:`KERNELS`): ``"indirect_bgemm"`` (LCE's
            fast path, with XNNPack for the float ops), ``"optimized"`` or ``"reference"``; or a
            list of them, run one after the other in one interpreter process.

    Returns:
        ``[N, ...]`` float32 outputs (the logits) of the path ``kernels`` names; for a list,
        ``{path: outputs}``, so that every result says which path computed it.

    Raises:
        ValueError: an unknown kernel path (one line, listing them).
        RuntimeError: LCE refused or failed to run the file (one line, LCE's reason), or no
            numpy<2 Python is known.
    """
    names = _check_kernels(kernels)
    x = _nhwc(images)
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model, (bytes, bytearray)):
            path = os.path.join(tmp, "model.tflite")
            with open(path, "wb") as f:
                f.write(model)
        else:
            path = os.path.abspath(os.fspath(model))
        np.save(os.path.join(tmp, "x.npy"), x)
        job = {"task": "predict", "model": path, "inputs": os.path.join(tmp, "x.npy"), "kernels": names,
               "threads": int(num_threads), "outputs": os.path.join(tmp, "y.npz")}
        interpreter_python = lce_python(python)
        if interpreter_python is None:
            outputs = _predict(job)
        else:
            _run(job, interpreter_python)
            with np.load(job["outputs"]) as saved:
                outputs = {k: saved[k] for k in names}
    return outputs[kernels] if isinstance(kernels, str) else outputs


def lce_latency(path: Union[PathLike, Sequence[PathLike]], threads: int = 1, kernels: str = DEFAULT_KERNELS,
                batch: int = 1, rounds: int = 15, calls: int = 5, warmup: int = 5,
                python: Optional[str] = None) -> Union[Dict[str, Any], List[Dict[str, Any]]]:
    """Time a ``.tflite`` file (or several, round-robin) in LCE's interpreter, as the benchmark does.

    Each file gets its own interpreter in one process, ``warmup`` calls, then ``rounds`` rounds;
    a round times ``calls`` back-to-back invocations of every file in turn (random normal input of
    the file's shape, fixed seed). The result is the per-call time of each round, its minimum
    (what the machine can do) and median.

    Args:
        path: a ``.tflite`` file, or a list of them to time alternately (their ratios are what a
            shared machine measures well).
        threads: the interpreter's threads.
        kernels: the kernel path (see :data:`KERNELS`); default LCE's fast path.
        batch: images per call; must be the file's input batch (``export_lce`` writes batch 1).
        rounds, calls, warmup: as above (``rounds`` and ``calls`` >= 1, ``warmup`` >= 0).
        python: the numpy<2 Python with ``larq-compute-engine`` (default ``$BNNPRUNE_LCE_PYTHON``).

    Returns:
        For one path a dict ``{"path", "kernels", "flags", "threads", "batch", "rounds", "calls",
        "min_ms", "median_ms", "round_ms"}`` (``flags``: the interpreter's
        ``use_reference_bconv, use_indirect_bgemm, use_xnnpack``); for a list, one such dict per file.

    Raises:
        ValueError: a bad argument or a missing file (one line).
        RuntimeError: a batch the file does not take, LCE refused or failed to run a file, or no
            numpy<2 Python is known (one line).
    """
    if not isinstance(kernels, str) or kernels not in KERNELS:
        raise ValueError(f"kernels must be one of {', '.join(map(repr, KERNELS))}; got {kernels!r}")
    kernel_name = kernels
    for name, value, low in (("threads", threads, 1), ("batch", batch, 1), ("rounds", rounds, 1),
                             ("calls", calls, 1), ("warmup", warmup, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    single = isinstance(path, (str, os.PathLike))
    paths = [os.path.abspath(os.fspath(p)) for p in ([path] if single else path)]
    if not paths:
        raise ValueError("path must be a .tflite file or a non-empty list of them")
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise ValueError(f"no such file: {missing[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        job = {"task": "latency", "models": paths, "kernels": kernel_name, "threads": threads, "batch": batch,
               "rounds": rounds, "calls": calls, "warmup": warmup, "outputs": os.path.join(tmp, "times.json")}
        interpreter_python = lce_python(python)
        if interpreter_python is None:
            measured = _latency(job)
        else:
            _run(job, interpreter_python)
            with open(job["outputs"]) as f:
                measured = json.load(f)
    results = []
    for p, m in zip(paths, measured):
        ms = [1000.0 * s for s in m["seconds"]]
        results.append({"path": p, "kernels": kernel_name, "flags": dict(zip(
            ("use_reference_bconv", "use_indirect_bgemm", "use_xnnpack"), KERNELS[kernel_name])),
            "threads": threads, "batch": batch, "rounds": rounds, "calls": calls,
            "min_ms": min(ms), "median_ms": statistics.median(ms), "round_ms": ms})
    return results[0] if single else results


if __name__ == "__main__":  # the LCE Python's side of lce_predict / lce_latency
    _main(sys.argv[1])
