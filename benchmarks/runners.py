"""Runners: a variant (backend, precision, memory format, compile mode) turned into ``fn(x)`` plus its input pool.

Network runners time the bare network (normalised float input -> logits) in PyTorch, ONNX Runtime or TensorRT;
end-to-end runners time :class:`blindnet.inference.Predictor` (uint8 images in, label maps on the host out).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from blindnet.backends.onnxruntime_backend import OnnxBackend, ort_providers, ort_session
from blindnet.backends.torch_backend import TorchBackend
from blindnet.benchmarks.config import BenchConfig, Variant
from blindnet.benchmarks.profiling import ort_profile
from blindnet.benchmarks.timing import Runner, exportable, input_pool, uint8_pool
from blindnet.export.int8 import quantize_int8
from blindnet.export.onnx import export_onnx
from blindnet.inference import Predictor


class Skip(Exception):
    """A variant cannot run here (library or hardware missing); the row says why instead of failing the run."""


_TORCH_DTYPES = {"float32": torch.float32, "tf32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_runner(model: nn.Module, variant: Variant, shape: tuple[int, ...], cfg: BenchConfig) -> Runner:
    """Eager or compiled PyTorch. Low precision casts the weights (no autocast casts inside the timed region)."""
    device = torch.device(cfg.device)
    if variant.precision == "float16" and device.type == "cpu":
        raise Skip("float16 is not supported on CPU")
    if variant.precision == "tf32" and device.type != "cuda":
        raise Skip("TF32 exists on CUDA GPUs only")
    if variant.precision == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise Skip("this GPU has no bfloat16 support")
    dtype = _TORCH_DTYPES[variant.precision]
    net = model.to(dtype=dtype)
    if variant.channels_last:
        net = net.to(memory_format=torch.channels_last)
    run: Callable[[torch.Tensor], torch.Tensor] = net
    mark_step: Callable[[], None] | None = None
    if variant.compile:
        torch._dynamo.reset()
        # dynamic=False: every batch size gets its own static graph (what CUDA graphs and autotuning need), instead
        # of the shape-generic kernels dynamo would switch to after the first new shape.
        run = torch.compile(net, mode=None if variant.compile == "default" else variant.compile, dynamic=False)
        if variant.compile != "default":
            mark_step = torch.compiler.cudagraph_mark_step_begin
    inputs = input_pool(
        shape,
        dtype=dtype,
        device=device,
        channels_last=variant.channels_last,
        pool_bytes=cfg.pool_bytes,
        seed=cfg.seed + 1,
    )
    last: dict[str, torch.Tensor] = {}

    def fn(x: torch.Tensor) -> torch.Tensor:
        if mark_step is not None:
            mark_step()
        out = run(x)
        last["out"] = out
        return out

    def check() -> None:
        out = last.get("out")
        if out is None:
            return
        expect = (shape[0], 19, shape[2], shape[3])
        if tuple(out.shape) != expect:
            raise RuntimeError(f"network output has shape {tuple(out.shape)}, expected {expect}")
        if not bool(torch.isfinite(out).all()):
            raise RuntimeError("network output contains NaN or Inf")

    note = "weights and activations in " + variant.precision if dtype != torch.float32 else ""
    return Runner(fn=fn, inputs=inputs, note=note, check=check)


def _export_onnx(model: nn.Module, path: Path, *, fp16: bool, shape: tuple[int, ...], exporter: str = "auto") -> Path:
    """Export the raw network (normalised float input -> logits) through the project's exporter."""
    if not path.exists():
        cpu_model = model.float().to("cpu").to(memory_format=torch.contiguous_format).eval()
        with exportable():
            export_onnx(cpu_model, path, normalize_input=False, argmax=False, fp16=fp16, exporter=exporter)
    return path


def ort_runner(model: nn.Module, variant: Variant, shape: tuple[int, ...], cfg: BenchConfig, workdir: Path) -> Runner:
    """ONNX Runtime on the CPU or CUDA execution provider. CUDA inputs/outputs stay on the GPU (IO binding)."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise Skip(f"onnxruntime is not installed ({exc})") from exc
    provider = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}[variant.provider or "cpu"]
    if provider not in ort.get_available_providers():
        raise Skip(f"{provider} is not available in this onnxruntime build")
    if provider == "CUDAExecutionProvider" and cfg.device != "cuda":
        raise Skip("the CUDA execution provider needs --device cuda")
    fp16 = variant.precision == "float16"
    name = getattr(model, "_bench_name", "model")
    path = _export_onnx(
        model, workdir / f"{name}-{'fp16' if fp16 else 'fp32'}.onnx", fp16=fp16, shape=shape, exporter=cfg.onnx_exporter
    )
    if variant.precision == "int8":
        # The Q/DQ INT8 file the package serves (blindnet.export.int8), calibrated on a few generated scenes.
        path = quantize_int8(path, workdir / f"{name}-int8qdq.onnx", calibration=4, size=(256, 512))
    threads = cfg.threads or torch.get_num_threads()
    # EXHAUSTIVE: the benchmark times one fixed shape, so the best conv algorithms are worth searching for once.
    providers = ort_providers("cuda" if provider == "CUDAExecutionProvider" else "cpu", conv_algo_search="EXHAUSTIVE")
    session = ort_session(path, providers=providers, threads=threads, inter_op_threads=1)
    if session.get_providers()[0] != provider:
        # ORT silently falls back to the CPU when the CUDA provider's libraries do not load: never label that "cuda".
        raise Skip(f"{provider} did not load (session runs on {session.get_providers()}); check CUDA/cuDNN libraries")
    in_meta, out_meta = session.get_inputs()[0], session.get_outputs()[0]
    # The exporter keeps float32 at the graph boundary of float16 graphs; read what this file wants.
    in_np = np.float16 if "float16" in in_meta.type else np.float32
    out_np = np.float16 if "float16" in out_meta.type else np.float32
    note = f"{provider}, {threads} intra-op threads" if provider == "CPUExecutionProvider" else provider
    if provider == "CPUExecutionProvider":
        rng = np.random.default_rng(cfg.seed + 2)
        per = math.prod(shape) * np.dtype(in_np).itemsize
        count = int(max(2, min(8, cfg.pool_bytes // per)))
        arrays = [rng.standard_normal(shape, dtype=np.float32).astype(in_np) for _ in range(count)]
        last: dict[str, np.ndarray] = {}

        def fn(x: np.ndarray) -> Any:
            last["out"] = session.run([out_meta.name], {in_meta.name: x})[0]
            return last["out"]

        def check() -> None:
            out = last.get("out")
            if out is not None and not np.isfinite(out).all():
                raise RuntimeError("onnxruntime output contains NaN or Inf")

        def profile(iterations: int) -> dict[str, Any]:
            return ort_profile(path, threads, providers, in_meta.name, arrays, iterations, str(workdir))

        return Runner(fn=fn, inputs=arrays, note=note, check=check, profile=profile)
    # CUDA EP: bind torch device buffers so the timed call is GPU compute, not PCIe copies.
    in_t = torch.float16 if in_np is np.float16 else torch.float32
    out_t = torch.float16 if out_np is np.float16 else torch.float32
    inputs = input_pool(
        shape, dtype=in_t, device=torch.device("cuda"), channels_last=False, pool_bytes=cfg.pool_bytes, seed=cfg.seed
    )
    out = torch.empty((shape[0], 19, shape[2], shape[3]), dtype=out_t, device="cuda")
    binding = session.io_binding()

    def fn_cuda(x: torch.Tensor) -> torch.Tensor:
        binding.bind_input(in_meta.name, "cuda", 0, in_np, tuple(x.shape), x.data_ptr())
        binding.bind_output(out_meta.name, "cuda", 0, out_np, tuple(out.shape), out.data_ptr())
        session.run_with_iobinding(binding)
        return out

    return Runner(fn=fn_cuda, inputs=inputs, sync=torch.cuda.synchronize, note=note + ", IO binding")


def trt_runner(model: nn.Module, variant: Variant, shape: tuple[int, ...], cfg: BenchConfig, workdir: Path) -> Runner:
    """A TensorRT engine built here from the ONNX export for exactly this shape (float16)."""
    if cfg.device != "cuda":
        raise Skip("TensorRT needs --device cuda")
    try:
        import tensorrt as trt
    except ImportError as exc:
        raise Skip(f"tensorrt is not installed ({exc})") from exc
    if variant.precision == "int8":
        # Timing int8 with made-up dynamic ranges would publish a number for an engine nobody can deploy.
        raise Skip("int8 needs a calibration set (or a Q/DQ ONNX from ModelOpt); not timed with made-up ranges")
    strongly_typed = not hasattr(trt.BuilderFlag, "FP16")  # TensorRT 11 removed the weak-typing flags
    onnx_path = _export_onnx(
        model,
        workdir / f"{getattr(model, '_bench_name', 'model')}-{'fp16' if strongly_typed else 'fp32'}.onnx",
        fp16=strongly_typed,
        shape=shape,
        exporter=cfg.onnx_exporter,
    )
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    if strongly_typed and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, 8 << 30)
    if not strongly_typed:
        config.set_flag(trt.BuilderFlag.FP16)
    inp, outp = network.get_input(0), network.get_output(0)
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, shape, shape, shape)
    config.add_optimization_profile(profile)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError("TensorRT engine build failed (see the TensorRT log above)")
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    context.set_input_shape(inp.name, shape)
    in_dtype = torch.float16 if engine.get_tensor_dtype(inp.name) == trt.DataType.HALF else torch.float32
    inputs = input_pool(
        shape,
        dtype=in_dtype,
        device=torch.device("cuda"),
        channels_last=False,
        pool_bytes=cfg.pool_bytes,
        seed=cfg.seed,
    )
    out_dtype = torch.float16 if engine.get_tensor_dtype(outp.name) == trt.DataType.HALF else torch.float32
    out = torch.empty(tuple(context.get_tensor_shape(outp.name)), dtype=out_dtype, device="cuda")
    context.set_tensor_address(outp.name, out.data_ptr())

    def fn(x: torch.Tensor) -> torch.Tensor:
        context.set_tensor_address(inp.name, x.data_ptr())
        context.execute_async_v3(torch.cuda.current_stream().cuda_stream)
        return out

    note = f"TensorRT {trt.__version__}, {'strongly typed fp16 ONNX' if strongly_typed else 'FP16 builder flag'}"
    return Runner(fn=fn, inputs=inputs, note=note)


def end_to_end_runner(model: nn.Module, variant: Variant, batch: int, cfg: BenchConfig) -> Runner:
    """The Predictor path: uint8 ``N x H x W x 3`` on the host in, label maps on the host out."""

    precision = "float32" if variant.precision == "tf32" else variant.precision
    backend = TorchBackend(
        model.float(),
        device=cfg.device,
        precision=precision,
        channels_last=variant.channels_last,
        compile=False if variant.compile is None else (variant.compile if variant.compile != "default" else True),
    )
    predictor = Predictor(backend, batch_size=batch)
    pool = uint8_pool(batch, cfg.size, cfg.seed + 3)

    def fn(images: np.ndarray) -> Any:
        return predictor.predict_arrays(list(images))

    sync = torch.cuda.synchronize if cfg.device == "cuda" else None
    note = "Predictor + TorchBackend (autocast), uint8 in, labels on host out"
    return Runner(fn=fn, inputs=pool, sync=sync, note=note)


def ort_end_to_end_runner(model: nn.Module, variant: Variant, batch: int, cfg: BenchConfig, workdir: Path) -> Runner:
    """The Predictor over :class:`OnnxBackend` on a deployment export (uint8 NHWC in, normalise + argmax in-graph)."""

    fp16 = variant.precision == "float16"
    path = workdir / f"{getattr(model, '_bench_name', 'model')}-deploy-{'fp16' if fp16 else 'fp32'}.onnx"
    if not path.exists():
        cpu_model = model.float().to("cpu").eval()
        with exportable():
            export_onnx(cpu_model, path, normalize_input=True, argmax=True, fp16=fp16, exporter=cfg.onnx_exporter)
    backend = OnnxBackend(path, device=variant.provider or "cpu", threads=cfg.threads or torch.get_num_threads())
    predictor = Predictor(backend, batch_size=batch)
    pool = uint8_pool(batch, cfg.size, cfg.seed + 3)

    def fn(images: np.ndarray) -> Any:
        return predictor.predict_arrays(list(images))

    note = "Predictor + OnnxBackend, uint8 NHWC in, normalisation and argmax in-graph, labels on host out"
    return Runner(fn=fn, inputs=pool, sync=torch.cuda.synchronize if cfg.device == "cuda" else None, note=note)


def make_runner(model: nn.Module, variant: Variant, shape: tuple[int, ...], cfg: BenchConfig, workdir: Path) -> Runner:
    """The network runner of ``variant`` for one input ``shape``; :class:`Skip` where it cannot run here."""
    if cfg.device not in variant.devices:
        raise Skip(f"{variant.name} runs on {'/'.join(variant.devices)} only")
    if variant.backend == "torch":
        return torch_runner(model, variant, shape, cfg)
    if variant.backend == "onnxruntime":
        return ort_runner(model, variant, shape, cfg, workdir)
    if variant.backend == "tensorrt":
        return trt_runner(model, variant, shape, cfg, workdir)
    raise Skip(f"unknown backend {variant.backend!r}")


def make_e2e_runner(model: nn.Module, variant: Variant, cfg: BenchConfig, workdir: Path) -> Runner:
    """The end-to-end (Predictor, batch 1) runner of ``variant``; :class:`Skip` where it cannot run here."""
    if cfg.device not in variant.devices:
        raise Skip(f"{variant.name} runs on {'/'.join(variant.devices)} only")
    if variant.precision == "float16" and cfg.device == "cpu":
        raise Skip("float16 is not supported on CPU")
    if variant.backend == "onnxruntime":
        return ort_end_to_end_runner(model, variant, 1, cfg, workdir)
    return end_to_end_runner(model, variant, 1, cfg)
