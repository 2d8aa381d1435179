"""The compiler's front door: :func:`compile` picks one chip (:mod:`lpucore.compiler.lower`), a
pipeline over chips (:mod:`lpucore.compiler.stages`) or tensor parallelism
(:mod:`lpucore.compiler.tensor_parallel`). It sits above all three, so that none of them imports
another's caller.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Union

import numpy as np

from ..config import ChipConfig
from ..errors import CompileError
from ..graph import Graph, GraphError
from . import store
from .lower import Compiled, Compiler
from .stages import compile_pipeline
from .tensor_parallel import compile_system, tensor_parallel_fits


def load_compiled(path: Union[str, "os.PathLike[str]"]) -> Compiled:
    """Read a compiled program written by :meth:`Compiled.save`: every part is checked like any
    untrusted file (:mod:`lpucore.compiler.store`); CompiledFileError if anything is off."""
    return Compiled(**store.read_fields(path))


def compiled_from_bytes(data: bytes, sources: Optional[str] = None) -> Compiled:
    """A Compiled from a compiled program file's bytes (:func:`lpucore.compiler.store.fields`)."""
    return Compiled(**store.fields(data, sources))


def cached_compile(graph: Graph, cfg: ChipConfig, build: Callable[[], Compiled]) -> Compiled:
    """``build()``'s result, read from the compile cache when its entry for (graph, configuration,
    lpucore sources) loads, else built and kept there (:mod:`lpucore.compiler.store`)."""
    path = store.cache_path(graph, cfg)
    if path is None:
        return build()
    hit = store.read_entry(path)
    if hit is not None:
        return Compiled(**hit)
    c = build()
    store.write_entry(c, path)
    return c


def compile(graph: Graph, config: Optional[ChipConfig] = None, system=None, chips=None, state_axes=None,
            strategy: str = "auto"):
    """Compile a graph into a scheduled program (GroqChip geometry by default).

    With ``system`` (an :class:`~lpucore.System`), the graph is spread over its chips (or
    the given ``chips``):

    * ``strategy="tensor"``: tensor parallelism over chips wired pairwise, with scheduled
      all-gathers and all-reduces (:mod:`lpucore.compiler.tensor_parallel`, returns a
      ``SystemCompiled``);
    * ``"pipeline"``: consecutive parts of the graph on consecutive chips, the part's result
      handed over a link (:mod:`lpucore.compiler.stages`, returns a ``PipelineCompiled``);
    * ``"auto"`` (default): tensor parallelism if the chips are wired pairwise and the
      graph's constants and states, split over them, fit (at batch 1 every chip then streams
      its share of the weights at once, which a pipeline cannot), else pipeline stages."""
    if not isinstance(graph, Graph):
        raise GraphError("compile expects an lpucore.Graph")
    if not graph.outputs:
        raise GraphError("compile: the graph has no outputs (use graph.output(name, tensor))")
    if system is not None:
        if config is not None and config != system.config:
            raise CompileError("compile: config differs from the system's chip configuration")
        if strategy not in ("auto", "tensor", "pipeline"):
            raise CompileError(f"strategy must be 'auto', 'tensor' or 'pipeline', not {strategy!r}")
        if strategy == "auto":
            strategy = "tensor" if tensor_parallel_fits(graph, system, chips) else "pipeline"
        if strategy == "pipeline":
            if state_axes:
                raise CompileError("state_axes are for strategy='tensor'")
            return compile_pipeline(graph, system, chips=chips)
        return compile_system(graph, system, chips=chips, state_axes=state_axes)
    cfg = config if config is not None else ChipConfig.groqchip1()
    # one chip: through the compile cache (lpucore.compiler.store; LPUCORE_CACHE=0 turns it off)
    return cached_compile(graph, cfg, lambda: compile_one(graph, cfg))


def compile_sharing(graph: Graph, base: Compiled) -> Compiled:
    """Compile ``graph`` for ``base``'s chip so that both programs can be loaded into one chip in turn
    with their common constants and states written once: each constant or state of ``graph`` named as
    one of ``base``'s, of the same dtype and width (and rows, or fewer rows for a state written by MEM
    Scatter, which then holds ``base``'s first rows), is placed at ``base``'s addresses, and nothing
    else of the program touches any address ``base`` keeps a constant or state at.
    :meth:`Compiled.private_constants` are what the host writes when it switches to this program.
    ``base`` must come from this process's compiler (not the compile cache). Not cached.

    A name is no proof of the same values: the compiler names its own constants (masks, scatter bases) by
    node number, and two graphs' numbers can meet on different values. A constant placed at ``base``'s
    addresses holding other values than ``base``'s is compiled again away from them (it is then private)."""
    if not isinstance(graph, Graph):
        raise GraphError("compile_sharing expects an lpucore.Graph")
    if not base.layout:
        raise CompileError("compile_sharing: the base program has no placements to share (compiled in this "
                           "process, with LPUCORE_CACHE=0 or by compile_sharing?)")
    exclude: frozenset = frozenset()
    for _ in range(3):          # the same graph lowers to the same constants: one more pass settles it
        out = _compile_shared(graph, base, exclude)
        clash = _value_clashes(out, base)
        if not clash:
            return out
        exclude |= clash
    raise CompileError(f"compile_sharing: constants {sorted(clash)[:3]} keep clashing with the base program's")


def _compile_shared(graph: Graph, base: Compiled, exclude: frozenset) -> Compiled:
    """One compile of ``graph`` placed around ``base`` (:meth:`Compiler.share`); as :func:`compile_one`, a graph
    with in-place scatters that does not fit is compiled once more with their constants placed first."""
    c = Compiler(graph, base.config)
    c.share(base, exclude)
    try:
        return c.run()
    except CompileError as e:
        if "does not fit" not in str(e) or not any(n.op == "scatter" for n in graph.nodes):
            raise
    c = Compiler(graph, base.config)
    c.share(base, exclude)
    c.reserve_scatter = True
    return c.run()


def _value_clashes(c: Compiled, base: Compiled) -> frozenset:
    """Tensor-table names ``c`` placed at ``base``'s addresses for a constant whose values differ from the
    one ``base`` keeps there."""
    out = set()
    for name, arr in c.constants.items():
        shared = [m for m in c.members(name) if m in c.shared]
        if not shared or name in c.states:      # a state's values are the program's to write, not the host's
            continue
        other = base.constants.get(name)
        same = (other is not None and c.members(name) == base.members(name) and other.dtype == arr.dtype
                and other.shape == arr.shape and np.array_equal(other, arr))
        if not same:
            out.update(shared)
    return frozenset(out)


def compile_one(graph: Graph, cfg: ChipConfig) -> Compiled:
    """One chip's program. A graph with in-place scatters that does not fit is compiled once more with
    their constants placed before lowering (:func:`lpucore.compiler.scatter.reserve`: lowering's
    temporaries can take all the space a constant may use); only then, so that the programs that fit
    keep their placement."""
    try:
        return Compiler(graph, cfg).run()
    except CompileError as e:
        if "does not fit" not in str(e) or not any(n.op == "scatter" for n in graph.nodes):
            raise
    c = Compiler(graph, cfg)
    c.reserve_scatter = True
    return c.run()
