"""A stand-in for TensorRT's builder API (Builder, OnnxParser, builder config, timing cache,
optimisation profiles) that records how mmsep.export.tensorrt_build drives it.

A timing cache serialises as b"cache:<version>|"; a cache made by another version does not match
(``set_timing_cache(cache, False)`` returns False, as TensorRT's does for another GPU or version);
a corrupt blob makes ``create_timing_cache`` return None or, with ``corrupt_cache="raise"``, raise
(TensorRT logs "Serialization assertion magicTagRead == kMAGIC_TAG failed" for it; what the
binding then does is not documented).
"""

from __future__ import annotations

import functools
import types
from dataclasses import dataclass, field

import onnx


class Severity:
    INTERNAL_ERROR, ERROR, WARNING, INFO = range(4)


class ILogger:
    Severity = Severity

    def __init__(self):
        pass


@dataclass
class BuildState:
    """The stand-in's behaviour (``*_ok``, ``version``, ``corrupt_cache``) and what it saw."""

    strongly_typed_flag: bool = True
    parse_ok: bool = True
    build_ok: bool = True
    version: str = "10.13.0"
    corrupt_cache: str = "none"
    calls: dict = field(default_factory=lambda: {"shapes": {}, "cleared": [], "pool": None,
                                                 "flags": None, "cache_in": None})


class ParserError:
    def __init__(self, index):
        self.index = index

    def node(self):
        return self.index

    def node_name(self):
        return f"node_{self.index}"

    def node_operator(self):
        return "Conv"

    def desc(self):
        return f"unsupported thing {self.index}"


class Network:
    def __init__(self):
        self.inputs, self.outputs = [], []

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = property(lambda self: len(self.outputs))

    def get_input(self, i):
        return types.SimpleNamespace(name=self.inputs[i])

    def get_output(self, i):
        return types.SimpleNamespace(name=self.outputs[i])


class OnnxParser:
    def __init__(self, state: BuildState, network: Network, logger):
        self.state, self.network, self.num_errors = state, network, 0

    def parse_from_file(self, path):
        if not self.state.parse_ok:
            self.num_errors = 2
            return False
        graph = onnx.load(path, load_external_data=False).graph
        self.network.inputs = [v.name for v in graph.input]
        self.network.outputs = [v.name for v in graph.output]
        return True

    def get_error(self, i):
        return ParserError(i)


class TimingCache:
    def __init__(self, made_by: str):
        self.made_by = made_by

    def serialize(self):
        return b"cache:" + self.made_by.encode() + b"|"


class BuilderConfig:
    def __init__(self, state: BuildState, logger):
        self.state, self.calls, self.logger = state, state.calls, logger

    def set_memory_pool_limit(self, pool, size):
        self.calls["pool"] = (pool, size)

    def clear_flag(self, flag):
        self.calls["cleared"].append(flag)

    def add_optimization_profile(self, profile):
        return 0

    def create_timing_cache(self, blob):
        self.calls["cache_in"] = blob = bytes(blob)
        if not blob:
            return TimingCache(self.state.version)
        if not blob.startswith(b"cache:"):
            if self.state.corrupt_cache == "raise":
                raise RuntimeError("Serialization assertion magicTagRead == kMAGIC_TAG failed")
            return None
        return TimingCache(blob[len(b"cache:"):blob.index(b"|")].decode())

    def set_timing_cache(self, cache, ignore_mismatch):
        if cache.made_by != self.state.version and not ignore_mismatch:
            self.logger.log(Severity.ERROR, "timing cache of another TensorRT version")
            return False
        self.cache = cache
        return True

    def get_timing_cache(self):
        return self.cache


class Profile:
    def __init__(self, calls: dict):
        self.calls = calls

    def set_shape(self, name, low, opt, high):
        consistent = len(low) == len(opt) == len(high) and \
            all(a <= b <= c for a, b, c in zip(low, opt, high))
        if not consistent:  # TensorRT's binding raises rather than returning False
            raise RuntimeError("Shape provided for min is inconsistent with other shapes.")
        self.calls["shapes"][name] = (tuple(low), tuple(opt), tuple(high))


class Builder:
    def __init__(self, state: BuildState, logger):
        self.state, self.logger = state, logger

    def create_network(self, flags):
        self.state.calls["flags"] = flags
        return Network()

    def create_builder_config(self):
        return BuilderConfig(self.state, self.logger)

    def create_optimization_profile(self):
        return Profile(self.state.calls)

    def build_serialized_network(self, network, config):
        if not self.state.build_ok:
            self.logger.log(Severity.ERROR, "out of workspace")
            return None
        return b"ENGINE"


def fake_tensorrt(**options) -> tuple[types.SimpleNamespace, dict]:
    """(a ``tensorrt`` module stand-in, the dict of calls it records); ``options`` are
    BuildState's fields."""
    state = BuildState(**options)
    flags = types.SimpleNamespace(**({"STRONGLY_TYPED": 1} if state.strongly_typed_flag else {}))
    trt = types.SimpleNamespace(
        __version__=state.version, ILogger=ILogger,
        Builder=functools.partial(Builder, state), OnnxParser=functools.partial(OnnxParser, state),
        NetworkDefinitionCreationFlag=flags, MemoryPoolType=types.SimpleNamespace(WORKSPACE="ws"),
        BuilderFlag=types.SimpleNamespace(TF32="tf32"))
    return trt, state.calls
