"""ResNet-50 benchmark: int8, batch 1, one simulated GroqChip, against the NumPy reference and the paper.

    python bench/bench_resnet50.py [--image-size 224] [--precision int8] [--images 2] [--no-stream]
                                   [--chip groqchip1] [--model resnet50] [--stem auto|s2d|s2d4|direct] [--json OUT.json]

Builds torchvision's ResNet-50 (v1.5: the bottleneck's stride on its 3x3 convolution; seeded random
weights with measured batch-norm statistics, lpucore.vision), calibrates its int8 activation scales,
compiles one image of ``--image-size`` pixels and (unless ``--no-stream``) two images as one program
that the scheduler overlaps, then runs ``--images`` standard-normal images on the fast engine. Prints
one image's latency and images/s, the back-to-back images/s, MXM utilisation, the schedule bound and
efficiency, SRAM, host seconds per image (compile times apart), where the cycles go, the paper's
figures beside them (Abts et al., ISCA 2020: 20,400 images/s, 49 us, ~44,100 cycles at 900 MHz, for
ResNet-50 v2 at 224 x 224, whose MACs are within 1 % of v1.5's), and whether each image's top-1 class
(int8: its logits bit for bit) equals the NumPy reference's. The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from lpucore import ChipConfig, vision

PAPER = {"images_per_second": 20_400, "latency_us": 49.0, "cycles": 44_100, "clock_hz": 900e6}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="resnet50", choices=tuple(vision.ARCHS))
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--precision", default="int8", choices=("int8", "fp16"))
    ap.add_argument("--images", type=int, default=2, help="random images to run and check (default 2)")
    ap.add_argument("--no-stream", action="store_true", help="skip the two-image (back-to-back) program")
    ap.add_argument("--chip", default="groqchip1", choices=ChipConfig.PRESETS)
    ap.add_argument("--stem", default="auto", choices=("auto", "s2d", "s2d4", "direct"),
                    help="auto (default): s2d4 when 4 divides the image size, else s2d; s2d: the host writes the "
                         "image space-to-depth (2 x 2 blocks); s2d4: 4 x 4 blocks, the stem giving 2 x 2 output "
                         "pixels a position; direct: the 7x7 window on the chip")
    ap.add_argument("--json", metavar="OUT.json")
    a = ap.parse_args(argv)
    if a.image_size < 8 or a.images < 1:
        ap.error("--image-size must be >= 8 and --images >= 1")
    cfg = ChipConfig.named(a.chip)

    t0 = time.perf_counter()
    model = vision.resnet(a.model, precision=a.precision, seed=0, config=cfg, stem=a.stem)
    t1 = time.perf_counter()
    model.scales(a.image_size)
    t2 = time.perf_counter()
    model.compile(a.image_size)
    t3 = time.perf_counter()
    print(f"{a.model} {a.precision} {a.image_size} x {a.image_size} on {cfg.name}, stem {a.stem}: "
          f"weights {t1 - t0:.1f} s, calibration {t2 - t1:.1f} s, compile {t3 - t2:.1f} s", flush=True)
    rng = np.random.default_rng(100)
    images = [rng.standard_normal((1, 3, a.image_size, a.image_size)).astype(np.float32) for _ in range(a.images)]
    stats, same_top, exact, max_diff, walls, ref_walls = None, 0, 0, 0.0, [], []
    for i, x in enumerate(images):
        logits, st = model.run(x, stream=(i == 0 and not a.no_stream))
        stats = st if stats is None else stats
        walls.append(st.wall_seconds)
        t = time.perf_counter()
        ref = model.reference(x)
        ref_walls.append(time.perf_counter() - t)
        same_top += int(np.argmax(logits) == np.argmax(ref))
        exact += int(logits.tobytes() == ref.tobytes())
        max_diff = max(max_diff, float(np.abs(logits - ref).max()))
    assert stats is not None
    print(stats.table())
    if stats.stream:
        print(f"stream program: compile {stats.stream['compile_seconds']:.1f} s; each image's logits equal its own run")
    paper_cycles = PAPER["cycles"]
    print(f"paper (ResNet-50 v2, 224 x 224): {PAPER['images_per_second']:,} images/s, {PAPER['latency_us']} us, "
          f"{paper_cycles:,} cycles; this run: {stats.cycles / paper_cycles:,.1f}x the paper's cycles"
          + ("" if a.image_size == 224 else f" (at {a.image_size} x {a.image_size}, not 224)"))
    print(f"host: {np.mean(walls):.2f} s per image simulated (fast engine), NumPy reference "
          f"{np.mean(ref_walls):.2f} s per image")
    print(f"check: top-1 equal to the NumPy reference on {same_top}/{len(images)} random images; logits bit for bit "
          f"on {exact}/{len(images)} (max |diff| {max_diff:.3g})")
    out = {"model": a.model, "precision": a.precision, "image_size": a.image_size, "chip": cfg.name, "stem": a.stem,
           "cycles": stats.cycles, "latency_us": stats.seconds * 1e6, "images_per_second": stats.images_per_second,
           "stream_images_per_second": stats.stream_images_per_second, "stream_cycles": stats.stream_cycles,
           "mxm_utilisation": stats.mxm_utilisation, "schedule_efficiency": stats.schedule_efficiency,
           "bound_cycles": stats.bound, "sram_bytes": stats.sram_bytes, "weights_seconds": t1 - t0,
           "calibration_seconds": t2 - t1, "compile_seconds": t3 - t2,
           "stream_compile_seconds": stats.stream.get("compile_seconds", 0.0),
           "host_seconds_per_image": float(np.mean(walls)), "reference_seconds_per_image": float(np.mean(ref_walls)),
           "top1_equal": same_top, "bit_exact": exact, "images": len(images), "max_logit_diff": max_diff,
           "by_layer": stats.by_layer, "by_op": stats.by_op, "paper": PAPER}
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    print(json.dumps(out))
    return 0 if same_top == len(images) and (a.precision == "fp16" or exact == len(images)) else 1


if __name__ == "__main__":
    raise SystemExit(main())
