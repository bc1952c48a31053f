"""Inference: the only module that imports an inference runtime (onnxruntime; OpenVINO for bf16).

Owns: session creation (providers, CPU threading, CUDA with a logged fallback to CPU), warm-up,
and running all members in one pass: `infer(frame) -> (probs [M, C, h, w], Geometry)`. Frame
preparation (per-frame min-max normalisation, optional rescale to the artifact's pixel size,
padding to valid sizes; written straight into the network input buffer) is `frame.py`.

On CUDA the engine runs through IO binding (`_BoundRunner`): a device-resident input buffer per
network shape, updated in place, and preallocated host output buffers that onnxruntime writes
into, bound once; no allocation per frame. The same runner works on the CPU provider (tests).

Precision. The default, fp32, is onnxruntime and matches the trainer to 1e-4. `bf16` runs the
same ONNX graph on the CPU through OpenVINO (`_OpenVinoRunner`, the `openvino` extra), which
computes in bfloat16 on CPUs with AMX or AVX-512 BF16: about 3.5x faster than fp32 here. `fp16`
is onnxruntime on a copy of the graph converted to float16 at load (float32 in and out; meant for
CUDA, slower than fp32 on a CPU; needs the `onnx` package). A reduced precision must keep the
artifact's probe within PROBE_TOLERANCE of the fp32 reference, or the engine is refused; the
difference found is `probe_diff` (docs/benchmarks.md has the accuracy on real detections).
"""
from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from elit_stream.core.frame import EngineError, Geometry, net_shape_for, prepare
from elit_stream.core.frame import normalise  # noqa: F401  (re-exported: public name)
from elit_stream.core.manifest import Artifact

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
OPENVINO = "OpenVINO:CPU"
PRECISIONS = ("fp32", "bf16", "fp16")
# max |member-mean atom map - fp32 probe| accepted per reduced precision (measured on
# models/default: bf16 6.5e-3, fp16 7.4e-4)
PROBE_TOLERANCE = {"bf16": 0.05, "fp16": 0.01}


# --- sessions -----------------------------------------------------------------------------------

def cpu_has_bf16() -> bool:
    """The CPU has native bf16 arithmetic (AMX-BF16 or AVX-512 BF16; Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"amx_bf16", "avx512_bf16"})
    except OSError:
        pass
    return False


def bf16_hint(provider: str | None, precision: str | None) -> str | None:
    """A one-line suggestion when an engine running fp32 on the CPU provider could run bf16 on
    this machine (bf16 instructions and OpenVINO present), else None."""
    if precision != "fp32" or provider != CPU or not cpu_has_bf16() \
            or importlib.util.find_spec("openvino") is None:
        return None
    return ("this CPU has bf16 instructions: --precision bf16 runs ~3.5x faster. What changes: "
            "the probability maps differ from fp32 by up to ~0.02, so an atom right at the "
            "threshold can appear or vanish (4-5 of 15,876 on the benchmark movie, positions "
            "within 0.3 px, detection F1 0.984 both; docs/benchmarks.md)")


def physical_cores() -> int:
    """Physical cores available to this process (falls back to logical CPUs)."""
    try:
        allowed = set(os.sched_getaffinity(0))
    except AttributeError:
        allowed = set(range(os.cpu_count() or 1))
    cores, cpu = set(), None
    try:
        with open("/proc/cpuinfo") as f:
            phys = None
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "processor":
                    cpu = int(val)
                elif key == "physical id":
                    phys = val.strip()
                elif key == "core id" and cpu in allowed:
                    cores.add((phys, val.strip()))
    except (OSError, ValueError):
        pass
    return max(1, min(len(cores) or len(allowed), len(allowed)))


def _session_options(threads: int | None, spin: bool) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.intra_op_num_threads = threads or physical_cores()
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    opts.log_severity_level = 3
    return opts


def _create(onnx_path: Path, opts: ort.SessionOptions, providers: list,
            model: bytes | None = None) -> ort.InferenceSession:
    """A session on `onnx_path`, or on `model` (serialised graph derived from it) if given."""
    try:
        return ort.InferenceSession(model if model is not None else str(onnx_path), opts,
                                    providers=providers)
    except Exception as exc:  # noqa: BLE001 - onnxruntime raises several unrelated types
        raise EngineError(f"{onnx_path.name}: cannot create session: {exc}") from None


def _float16_graph(onnx_path: Path) -> bytes:
    """The graph with float16 weights and arithmetic, float32 input and output."""
    try:
        import onnx
        from onnxruntime.transformers.float16 import convert_float_to_float16
    except ImportError:
        raise EngineError("precision fp16 needs the onnx package: pip install "
                          "'elit-stream[gpu]' (or pip install onnx)") from None
    try:
        model = convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    except Exception as exc:  # noqa: BLE001
        raise EngineError(f"{onnx_path.name}: cannot convert to float16: {exc}") from None
    return model.SerializeToString()


def run_probe(onnx_path: Path, net_input: np.ndarray) -> np.ndarray:
    """Run `net_input` through a fresh single-threaded CPU session (artifact verification)."""
    sess = _create(Path(onnx_path), _session_options(1, False), [CPU])
    try:
        return sess.run(None, {sess.get_inputs()[0].name: net_input})[0]
    except Exception as exc:  # noqa: BLE001
        raise EngineError(f"{Path(onnx_path).name}: probe run failed: {exc}") from None


# --- per-shape buffers -----------------------------------------------------------------------------

class _ShapeCache:
    """Per network shape state (buffers, compiled models), the `size` most recently used kept."""

    def __init__(self, size: int):
        self.size = size
        self._entries: dict[tuple, list] = {}

    def get(self, shape: tuple, build, *args) -> list:
        """The entry for `shape`, made by `build(shape, *args)` the first time."""
        entry = self._entries.pop(shape, None)
        if entry is None:
            entry = build(shape, *args)
            if len(self._entries) >= self.size:
                self._entries.pop(next(iter(self._entries)))    # least recently used
        self._entries[shape] = entry                            # most recently used last
        return entry


# --- IO binding (CUDA; also runs on CPU for tests) ------------------------------------------------

class _BoundRunner:
    """Runs a session through IO binding with buffers preallocated per network shape.

    Per shape: one input OrtValue on `device` (updated in place from the host each frame) and
    `ring` host output arrays, each bound once to its own io_binding; `run` alternates between
    them, so a result stays valid until `ring` further frames have run. At most `max_shapes`
    shapes are kept (least recently used dropped).
    """

    def __init__(self, session: ort.InferenceSession, in_name: str, out_name: str,
                 device: str, ring: int = 2, max_shapes: int = 4):
        self.session, self.in_name, self.out_name = session, in_name, out_name
        self.device, self.ring = device, ring
        self._shapes = _ShapeCache(max_shapes)

    def _build(self, in_shape: tuple, out_shape: tuple) -> list:
        x = ort.OrtValue.ortvalue_from_shape_and_type(list(in_shape), np.float32, self.device, 0)
        outs, binds = [], []
        for _ in range(self.ring):
            out = np.empty(out_shape, np.float32)
            io = self.session.io_binding()
            io.bind_ortvalue_input(self.in_name, x)
            io.bind_ortvalue_output(self.out_name, ort.OrtValue.ortvalue_from_numpy(out))
            outs.append(out)
            binds.append(io)
        return [x, outs, binds, 0]

    def run(self, net_input: np.ndarray, out_shape: tuple) -> np.ndarray:
        entry = self._shapes.get(tuple(net_input.shape), self._build, tuple(out_shape))
        x, outs, binds, i = entry
        x.update_inplace(np.ascontiguousarray(net_input, np.float32))
        self.session.run_with_iobinding(binds[i])
        entry[3] = (i + 1) % self.ring
        return outs[i]


# --- bf16 through OpenVINO (CPU) ------------------------------------------------------------------

class _OpenVinoRunner:
    """Runs the ONNX graph with OpenVINO's CPU plugin in bf16 (AMX / AVX-512 BF16).

    One model compiled per network shape (static shapes run faster than a dynamic compile;
    a new shape costs ~0.5-1 s once, so warm up with the camera's frame size) with `ring` infer
    requests; the input array is shared, not copied, and the returned probs are a view of the
    request's output buffer, valid until `ring` further frames have run (as on CUDA).
    At most `max_shapes` shapes are kept (least recently used dropped).
    """

    def __init__(self, onnx_path: Path, threads: int, precision: str = "bf16",
                 ring: int = 2, max_shapes: int = 4):
        try:
            import openvino
        except ImportError:
            raise EngineError("precision bf16 needs OpenVINO: pip install 'elit-stream[openvino]'"
                              ) from None
        self.ring = ring
        self._core = openvino.Core()
        try:
            self._model = self._core.read_model(str(onnx_path))
        except Exception as exc:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses
            raise EngineError(f"{Path(onnx_path).name}: OpenVINO cannot read it: {exc}") from None
        # no CPU pinning: the service shares the cores with its socket and metrics threads (and,
        # at a microscope, other programs); pinned vs. not measured the same here (175 vs 188 ms)
        self._config = {"INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": threads,
                        "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
                        "ENABLE_CPU_PINNING": False}
        self._shapes = _ShapeCache(max_shapes)
        self.precision = "?"                       # what the CPU plugin actually computes in

    def io_names(self) -> tuple[set, set]:
        return self._model.inputs[0].get_names(), self._model.outputs[0].get_names()

    def _build(self, in_shape: tuple) -> list:
        model = self._model.clone()
        model.reshape({0: list(in_shape)})
        compiled = self._core.compile_model(model, "CPU", self._config)
        kind = compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        self.precision = {"f32": "fp32", "f16": "fp16"}.get(kind, kind)    # bf16 stays
        return [[compiled.create_infer_request() for _ in range(self.ring)], 0]

    def run(self, net_input: np.ndarray) -> np.ndarray:
        entry = self._shapes.get(tuple(net_input.shape), self._build)
        requests, i = entry
        request = requests[i]
        request.infer({0: np.ascontiguousarray(net_input, np.float32)}, share_inputs=True,
                      share_outputs=True)
        entry[1] = (i + 1) % self.ring
        return request.get_output_tensor(0).data


# --- the engine ---------------------------------------------------------------------------------

class Engine:
    """All members of one artifact, one session, one pass per frame.

    `precision`: "fp32" (onnxruntime, CPU or CUDA), "bf16" (OpenVINO on the CPU; refused with
    device="cuda") or "fp16" (onnxruntime on a float16 copy of the graph, for CUDA). `options`
    holds the arguments, so a new model is opened the same way.
    """

    def __init__(self, artifact: Artifact, device: str = "auto", threads: int | None = None,
                 cpu_fallback: bool = True, *, precision: str = "fp32", spin: bool = False,
                 bind: bool | None = None):
        if device not in ("auto", "cpu", "cuda"):
            raise EngineError(f"device must be auto, cpu or cuda, not {device!r}")
        if precision not in PRECISIONS:
            raise EngineError(f"precision must be one of {', '.join(PRECISIONS)}, "
                              f"not {precision!r}")
        self.options = {"device": device, "threads": threads, "cpu_fallback": cpu_fallback,
                        "precision": precision, "spin": spin}
        self.artifact = artifact
        self.n_members, self.n_classes = artifact.n_members, artifact.n_classes
        self.fallback_reason: str | None = None
        self.threads = threads or physical_cores()
        self.session: ort.InferenceSession | None = None
        self._bound: _BoundRunner | None = None
        self._ov: _OpenVinoRunner | None = None
        self.probe_diff: float | None = None       # reduced precision: vs. the fp32 probe
        if precision == "bf16":
            self._open_openvino(device)
        else:
            self._open_onnxruntime(device, threads, cpu_fallback, spin, bind, precision)
        if precision != "fp32":
            self._check_probe(precision)
        log.info("engine: %s on %s, %s (%d threads%s)", artifact.name, self.provider,
                 self.precision, self.threads,
                 f"; fallback: {self.fallback_reason}" if self.fallback_reason else "")

    def _open_onnxruntime(self, device, threads, cpu_fallback, spin, bind, precision) -> None:
        opts = _session_options(threads, spin)
        graph = _float16_graph(self.artifact.onnx_path) if precision == "fp16" else None
        self.session = self._open(device, opts, cpu_fallback, graph)
        self.provider: str = self.session.get_providers()[0]
        self.precision = precision
        if precision == "fp16" and self.provider != CUDA:
            log.warning("engine: fp16 on the CPU provider is slower than fp32 (it is meant for "
                        "CUDA); use bf16 for a faster CPU")
        self.threads = opts.intra_op_num_threads
        self._in_name = self.session.get_inputs()[0].name
        self._out_name = self.session.get_outputs()[0].name
        self._check_io({self._in_name}, {self._out_name})
        use_bind = self.provider == CUDA if bind is None else bind
        self._bound = _BoundRunner(self.session, self._in_name, self._out_name,
                                   "cuda" if self.provider == CUDA else "cpu") if use_bind else None

    def _open_openvino(self, device: str) -> None:
        if device == "cuda":
            raise EngineError("precision bf16 runs on the CPU (OpenVINO); on CUDA use fp32, "
                              "or set device to cpu or auto")
        self._ov = _OpenVinoRunner(self.artifact.onnx_path, self.threads)
        self._check_io(*self._ov.io_names())
        self.provider = OPENVINO
        self.precision = "bf16"          # until the first compile says what the CPU does

    def _check_probe(self, precision: str) -> None:
        """Run the artifact's probe; refuse if the mean atom map moved beyond the tolerance."""
        if self.artifact.probe_path is None:
            raise EngineError(f"precision {precision} is checked against the artifact's probe; "
                              "this artifact has none")
        with np.load(self.artifact.probe_path) as z:
            net_input, want = z["input"], z["probs"]
        got = self.run(net_input)
        if self._ov is not None:
            self.precision = self._ov.precision
            if self.precision != "bf16":
                log.warning("engine: this CPU has no bf16 instructions; OpenVINO computes in %s",
                            self.precision)
        self.probe_diff = float(np.abs(got.sum(axis=1).mean(axis=0)
                                       - want.sum(axis=1).mean(axis=0)).max())
        tol = PROBE_TOLERANCE[precision]
        if not self.probe_diff <= tol:
            raise EngineError(f"{precision} changes the probe's mean atom map by "
                              f"{self.probe_diff:.3g} (> {tol}); use precision fp32 for this model")

    def _open(self, device: str, opts, cpu_fallback: bool, graph: bytes | None
              ) -> ort.InferenceSession:
        path = self.artifact.onnx_path
        if device == "cpu":
            return _create(path, opts, [CPU], graph)
        if CUDA not in ort.get_available_providers():
            why = "onnxruntime has no CUDAExecutionProvider (install the gpu extra)"
            return self._fallback(why, device == "cuda", cpu_fallback, path, opts, graph)
        cuda = (CUDA, {"cudnn_conv_algo_search": "HEURISTIC"})
        try:
            sess = _create(path, opts, [cuda, CPU], graph)
        except EngineError as exc:
            return self._fallback(str(exc), True, cpu_fallback, path, opts, graph)
        if sess.get_providers()[0] != CUDA:
            return self._fallback("CUDA provider failed to initialise (see onnxruntime log)",
                                  True, cpu_fallback, path, opts, graph)
        return sess

    def _fallback(self, why: str, wanted: bool, cpu_fallback: bool, path, opts, graph):
        if wanted and not cpu_fallback:
            raise EngineError(f"CUDA requested but unavailable: {why}")
        if wanted:
            self.fallback_reason = why
            log.warning("engine: CUDA unavailable (%s); falling back to CPU", why)
        return _create(path, opts, [CPU], graph)

    def _check_io(self, in_names: set, out_names: set) -> None:
        model = self.artifact.manifest["model"]
        want = (model["input"]["name"], model["output"]["name"])
        if want[0] not in in_names or want[1] not in out_names:
            raise EngineError(f"{self.artifact.onnx_path.name}: graph input/output "
                              f"{sorted(in_names)}/{sorted(out_names)} do not match manifest {want}")

    # -- frames --

    def net_shape_for(self, frame_shape: tuple[int, int], pixel_size_pm: float | None = None):
        """(valid_shape, net_shape, scale) for a frame of this shape and pixel size."""
        return net_shape_for(self.artifact, frame_shape, pixel_size_pm)

    def prepare(self, frame: np.ndarray, pixel_size_pm: float | None = None
                ) -> tuple[np.ndarray, Geometry]:
        """frame [H, W] -> normalised, rescaled, padded float32 [1, 1, h, w] and its Geometry."""
        return prepare(self.artifact, frame, pixel_size_pm)

    def run(self, net_input: np.ndarray) -> np.ndarray:
        """[1, 1, h, w] float32 -> probs [M, C, h, w] float32, uncopied.

        CPU: ORT's own output array (binding a preallocated output measured no faster on CPU:
        ORT 1.31 hands its buffer to numpy without a copy). CUDA (IO binding) and bf16
        (OpenVINO): a preallocated buffer, valid until two more frames have run.
        """
        want = (self.n_members, self.n_classes, *net_input.shape[2:])
        try:
            if self._ov is not None:
                probs = self._ov.run(net_input)
            elif self._bound is not None:
                probs = self._bound.run(net_input, want)
            else:
                probs = self.session.run([self._out_name], {self._in_name: net_input})[0]
        except Exception as exc:  # noqa: BLE001 - the runtimes raise several unrelated types
            raise EngineError(f"inference failed: {exc}") from None
        if probs.shape != want or probs.dtype != np.float32:
            raise EngineError(f"model output {probs.dtype}{list(probs.shape)}, expected "
                              f"float32{list(want)}")
        return probs

    def infer(self, frame: np.ndarray, pixel_size_pm: float | None = None
              ) -> tuple[np.ndarray, Geometry]:
        net_input, geometry = self.prepare(frame, pixel_size_pm)
        return self.run(net_input), geometry

    def warm_up(self, shape: tuple[int, int] = (512, 512)) -> None:
        """Run a synthetic frame twice so the first real frame does not pay for set-up."""
        frame = np.random.default_rng(0).random(shape, dtype=np.float32)
        for _ in range(2):
            self.infer(frame)
