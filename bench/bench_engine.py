#!/usr/bin/env python3
"""Engine speed on the GroqChip geometry.

(a) streaming: every West MEM slice reads one vector per cycle, the 16 VXM ALUs
    each add two streams per cycle, every East MEM slice writes one vector per
    cycle, for --cycles cycles (default 100,000);
(b) idle: a few instructions separated by NOPs spanning --idle-cycles cycles
    (default 10^9).

Both run on the fast engine and (shorter runs) on the reference engine; the host's
own limit is NumPy copying the same number of 320-byte vectors.  Prints simulated
cycles/s and vector instructions/s, the fast/reference ratio and the fast/NumPy
ratio; the last line is one JSON object.

    python bench/bench_engine.py [--cycles N] [--ref-cycles N] [--idle-cycles N]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import lpucore
from lpucore import Chip, ChipConfig, Program


def streaming_program(cfg: ChipConfig, cycles: int) -> Program:
    """A legal program keeping all MEM slices and all VXM ALUs busy every cycle."""
    p = Program(cfg)
    S = cfg.streams_per_direction
    n_sl = cfg.mem_slices_per_hemisphere
    chunk = min(cfg.addresses_per_slice, 8000)

    def stream_loop(queue, mnemonic, stream, start, total):
        if start:
            p.add(queue, "NOP", start)
        done = 0
        while done < total:
            n = min(chunk, total - done)
            p.add(queue, mnemonic, 0, stream)
            if n > 1:
                p.add(queue, "Repeat", n - 1, 1, 1)
            done += n

    # West slices: stream i gets slice i (and slice i + S further out); the nearer one wins.
    for i in range(n_sl):
        stream_loop(f"MEM.W{i}", "Read", f"E{i % S}", 0, cycles)
    # Values reach the VXM at most mem_read_delay + max hops cycles after the first read.
    warm = cfg.mem_read_delay + cfg.hops[-1] + 2
    for k in range(min(cfg.vxm_alus_per_lane, S // 2)):
        p.add(f"VXM.{k}", "NOP", warm)
        p.add(f"VXM.{k}", "add", "int8", f"E{k}", f"E{k}", f"E{k + S // 2}")
        p.add(f"VXM.{k}", "Repeat", cycles - warm - 1, 1, 0)
    warm_e = warm + cfg.vxm_alu_delay + cfg.hops[-1] + 2
    for j in range(n_sl):
        stream_loop(f"MEM.E{j}", "Write", f"E{j % S}", warm_e, cycles - warm_e)
    return p


def idle_program(cfg: ChipConfig, span: int) -> Program:
    p = Program(cfg)
    p.add("MEM.W0", "Read", 0, "E0")
    p.add("MEM.W0", "NOP", span)
    p.add("MEM.W0", "Read", 1, "E0")
    p.add("VXM.0", "NOP", span // 2)
    p.add("VXM.0", "const", "int32", "-", 7)
    return p


def timed_run(cfg, program, engine, max_cycles=None, warm=False):
    """Run once; with warm=True run once untimed first, so that the SRAM pages the
    program writes are already mapped (first-touch page faults are the OS's cost,
    not the simulator's), then restart it and time the second run."""
    chip = Chip(cfg, engine=engine)
    chip.load(program)
    if warm:
        chip.run(max_cycles)
        chip.reset(clear_memory=False)
    t0 = time.perf_counter()
    stats = chip.run(max_cycles)
    dt = time.perf_counter() - t0
    cycles = chip.cycle
    return stats, cycles, dt


def numpy_copy_rate(n_vectors: int, lanes: int) -> float:
    """Vectors per second NumPy copies, 320 bytes each, in bulk (the host's limit)."""
    src = np.random.default_rng(0).integers(0, 256, (min(n_vectors, 1 << 16), lanes), dtype=np.uint8)
    dst = np.empty_like(src)
    reps = max(1, n_vectors // src.shape[0])
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return reps * src.shape[0] / best


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=100_000)
    ap.add_argument("--ref-cycles", type=int, default=2_000)
    ap.add_argument("--idle-cycles", type=int, default=10 ** 9)
    args = ap.parse_args(argv)
    cfg = ChipConfig.groqchip1()
    out = {"lpucore": lpucore.__version__, "config": cfg.name}

    prog = streaming_program(cfg, args.cycles)
    st, cyc, dt = timed_run(cfg, prog, "fast", warm=True)
    fast_ips = st.instructions / dt
    out["stream_fast"] = {"cycles": cyc, "instructions": st.instructions, "wall_s": dt,
                          "cycles_per_s": cyc / dt, "instr_per_s": fast_ips}
    print(f"(a) streaming, fast:      {cyc:>12,} cycles  {st.instructions:>12,} vector instr  {dt:8.3f} s  "
          f"{cyc / dt:>12,.0f} cycles/s  {fast_ips:>12,.0f} instr/s")

    rprog = streaming_program(cfg, args.ref_cycles)
    rst, rcyc, rdt = timed_run(cfg, rprog, "reference")
    ref_ips = rst.instructions / rdt
    out["stream_reference"] = {"cycles": rcyc, "instructions": rst.instructions, "wall_s": rdt,
                               "cycles_per_s": rcyc / rdt, "instr_per_s": ref_ips}
    print(f"(a) streaming, reference: {rcyc:>12,} cycles  {rst.instructions:>12,} vector instr  {rdt:8.3f} s  "
          f"{rcyc / rdt:>12,.0f} cycles/s  {ref_ips:>12,.0f} instr/s")

    copy_rate = numpy_copy_rate(st.instructions, cfg.lanes)
    out["numpy_copy_vectors_per_s"] = copy_rate
    out["fast_over_reference"] = fast_ips / ref_ips
    out["numpy_copy_over_fast"] = copy_rate / fast_ips
    print(f"    NumPy bulk copy of {cfg.lanes}-byte vectors: {copy_rate:,.0f} vectors/s")
    print(f"    fast / reference: {fast_ips / ref_ips:,.1f}x    NumPy copy / fast: {copy_rate / fast_ips:.2f}x "
          f"(goal <= 10x)    fast instr/s goal >= 5,000,000")

    iprog = idle_program(cfg, args.idle_cycles)
    for eng in ("fast", "reference"):
        ist, icyc, idt = timed_run(cfg, iprog, eng)
        out[f"idle_{eng}"] = {"cycles": icyc, "instructions": ist.instructions, "wall_s": idt,
                              "cycles_per_s": icyc / idt}
        print(f"(b) idle, {eng:9s}:        {icyc:>14,} cycles  {ist.instructions:>3} vector instr  {idt:8.4f} s  "
              f"{icyc / idt:>16,.0f} cycles/s")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
