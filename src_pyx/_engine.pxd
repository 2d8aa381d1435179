# cython: language_level=3
# C-level API of lpucore's fast engine (lpucore._engine), for Cython code that embeds
# it in another simulator.  Installed as lpucore/_engine.pxd (a copy setup.py keeps in
# sync), so that
#
#     from lpucore._engine cimport lpu_handle, lpu_state, lpu_run_until, lpu_flush_mxm
#
#     h = lpu_state(chip.engine)               # chip = lpucore.Chip(cfg, engine="fast")
#     with nogil:
#         rc = lpu_run_until(h, target, 1)
#
# A handle is the engine's State: valid while the engine object lives, across load(),
# reset() and restore().  Functions marked nogil never touch Python objects; the others
# need the GIL.  Slices are global MEM slice ids (ChipConfig.slice_id(hemisphere, slot)),
# vectors are `lanes` bytes, addresses count vectors.

from libc.stdint cimport int64_t, uint8_t

ctypedef void* lpu_handle

# The engine's state behind a FastEngine (Chip.engine); TypeError for anything else.
cdef lpu_handle lpu_state(object engine) except NULL

# Run the cycle loop up to (not including) cycle `until` (-1: to the end of the program;
# idle = 0: stop at the program's finish cycle if it comes first, 1: idle on to `until`).
# Returns 0 when stopped, 1 on a schedule error (the next lpu_run or Chip.run raises it),
# 2 when out of memory, 3 when an MXM batch must be multiplied first: call
# lpu_flush_mxm(engine) with the GIL, then lpu_run_until again (it resumes mid-cycle).
cdef int lpu_run_until(lpu_handle h, int64_t until, int idle) noexcept nogil
cdef int lpu_flush_mxm(object engine) except -1

# The whole step, as Chip.step / Chip.run do it: MXM batches multiplied, schedule errors
# raised as lpucore.ScheduleError (until = -1: to the end).
cdef int lpu_run(object engine, int64_t until, int idle) except -1

# Time and status.
cdef int64_t lpu_cycle(lpu_handle h) noexcept nogil
cdef int64_t lpu_finish_cycle(lpu_handle h) noexcept nogil
cdef int lpu_finished(lpu_handle h) noexcept nogil
cdef int lpu_error(lpu_handle h) noexcept nogil          # 0: none, else the schedule-error kind

# Geometry.
cdef int lpu_lanes(lpu_handle h) noexcept nogil
cdef int lpu_mem_slices(lpu_handle h) noexcept nogil
cdef int64_t lpu_addresses(lpu_handle h) noexcept nogil

# SRAM access (count vectors from addr on); -1 if out of range, else 0.
cdef int lpu_read_mem(lpu_handle h, int slice_id, int64_t addr, int64_t count, uint8_t* out) noexcept nogil
cdef int lpu_write_mem(lpu_handle h, int slice_id, int64_t addr, int64_t count, const uint8_t* data) noexcept nogil

# Functional instructions issued so far by queue `queue` (-1 if no such queue).
cdef int64_t lpu_issued(lpu_handle h, int queue) noexcept nogil
