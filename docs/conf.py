"""Sphinx configuration for lpucore's documentation.

Build (warnings are errors, as in CI):
    python -m sphinx -W --keep-going -n -b html docs docs/_build/html
"""

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))          # the checkout (with its built engine) before any installed copy

import lpucore  # noqa: E402

project = "lpucore"
author = "the lpucore authors"
copyright = "2026, the lpucore authors"
release = version = lpucore.__version__

extensions = ["myst_parser", "sphinx.ext.autodoc"]
source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]

# MyST: headings up to level 3 get anchors, so pages link to sections ("page.md#anchor")
myst_heading_anchors = 3
myst_enable_extensions = ["colon_fence"]

# autodoc: members in source order, signatures from the annotations as written
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_default_options = {"members": True, "show-inheritance": True}

# nitpicky mode (-n): every cross-reference must resolve. Types from outside lpucore have no
# inventory here (the build has no network), so they are named, not linked. The docstrings also
# name lpucore's internals that this reference does not document (internal modules, instance
# attributes, private helpers and tables): those are listed one by one below, so that any other
# reference that does not resolve (a renamed function, a typo) still fails the build.
nitpicky = True
nitpick_ignore_regex = [
    ("py:class", r"(np|numpy|numpy\.typing|npt|os|pathlib|collections\.abc|typing|typing_extensions)\..*"),
    ("py:class", r"(queue|http\.server)\..*"),
    ("py:class", r"(NDArray|ArrayLike|DTypeLike|PathLike|Path|Iterable|Iterator|Sequence|Mapping|Callable)"),
    ("py:class", r"hypothesis\..*"),
]
nitpick_ignore = [
    ("py:attr", "ScheduleError.kind"),
    ("py:attr", "chips"),
    ("py:attr", "constants"),
    ("py:attr", "eos_ids"),
    ("py:attr", "finish_reason"),
    ("py:attr", "finished"),
    ("py:attr", "no_text"),
    ("py:attr", "stop_string"),
    ("py:attr", "tokenizer"),
    ("py:attr", "stats"),
    ("py:class", "_Row"),
    ("py:class", "lpucore.llm.batch._Row"),
    ("py:data", "lpucore.llm.decoder.LOGIT_TOLERANCE"),
    ("py:func", "lpucore.llm.program.build_step"),
    ("py:class", "lpucore.compiler.bounds.Bounds"),
    ("py:class", "lpucore.dtypes.DType"),
    ("py:class", "lpucore.isa.Op"),
    ("py:class", "lpucore.layout.Extent"),
    ("py:class", "lpucore.layout.Stripes"),
    ("py:class", "lpucore.layout.TensorInfo"),
    ("py:class", "lpucore.llm.predict._Model"),
    ("py:class", "lpucore.llm.reference.WeightStore"),
    ("py:class", "lpucore.testing.programs.RandomChooser"),
    ("py:data", "ENGINE_OPTIONS"),
    ("py:data", "LIMITS"),
    ("py:data", "MXM_KERNELS"),
    ("py:data", "SHAPES"),
    ("py:data", "lpucore.llm.SHAPES"),
    ("py:data", "lpucore.llm.shapes.LIMITS"),
    ("py:func", "_fp16_filter_numpy"),
    ("py:func", "host_memory_bytes"),
    ("py:func", "lpucore.layout.make_tensor"),
    ("py:func", "lpucore.llm.pipeline.plan_stages"),
    ("py:func", "lpucore.llm.pipeline.plan_auto"),
    ("py:func", "attn_shards"),
    ("py:func", "normalize_weights"),
    ("py:func", "plan_stages"),
    ("py:meth", "to_json"),
    ("py:mod", "lpucore.compiler.bounds"),
    ("py:mod", "lpucore.compiler.conv"),
    ("py:mod", "lpucore.compiler.dump"),
    ("py:mod", "lpucore.compiler.emit"),
    ("py:mod", "lpucore.compiler.gemm"),
    ("py:mod", "lpucore.compiler.loaded"),
    ("py:mod", "lpucore.compiler.stages"),
    ("py:mod", "lpucore.compiler.store"),
    ("py:mod", "lpucore.compiler.tensor_parallel"),
    ("py:mod", "lpucore.llm.program"),
    ("py:mod", "lpucore.llm.sampling"),
    ("py:mod", "lpucore.llm.text"),
    ("py:mod", "lpucore.testing.programs"),
]

html_theme = "alabaster"
html_title = f"lpucore {release}"
html_static_path: list = []
