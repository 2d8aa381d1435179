"""One :class:`lpucore.System` spread over several processes with MPI.

Install the optional extra (``pip install -e ".[mpi]"``: mpi4py and the ``mpich``
wheel, so no system MPI is needed) and launch with ``mpiexec -n N``::

    from lpucore import mpi
    system = mpi.System(72, "rack")          # this process simulates 72 / N of the chips
    system.load(lambda chip: program_for(chip))
    stats = system.run()                     # the same cycles and results as one process

Each process simulates a contiguous block of chips (chip ``i`` lives on rank
``i * N // n_chips``) and allocates nothing for the others.  After every lockstep
window (``c2c_latency`` cycles, the shortest time a vector can take between chips)
the processes exchange the vectors sent to each other's chips, any schedule error
(the lowest chip's wins, as in one process) and whether all are done, in one
``alltoall``.  Deliveries reach each link's inbox in the order they were sent, so
every chip sees exactly what it sees in a single-process run: results, cycle counts
and statistics are identical.  ``python -m lpucore relay --mpi`` runs a demonstration.
"""

from __future__ import annotations

from typing import Optional

from .errors import LpuError
from .system import System as _System


def comm_world():
    """``mpi4py.MPI.COMM_WORLD``, or a clear error if mpi4py (or an MPI library) is missing."""
    try:
        from mpi4py import MPI
    except ImportError as e:
        raise LpuError(f"MPI runs need mpi4py and an MPI library: pip install -e \".[mpi]\" ({e})") from None
    return MPI.COMM_WORLD


def System(n_chips: Optional[int] = None, topology="node", config=None, engine: str = "fast",
           fp16_mxm: str = "exact", comm=None) -> _System:
    """An :class:`lpucore.System` whose chips are shared out over ``comm`` (default: all
    the processes ``mpiexec`` started)."""
    return _System(n_chips, topology, config=config, engine=engine, fp16_mxm=fp16_mxm,
                   comm=comm if comm is not None else comm_world())
