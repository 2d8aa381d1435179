"""Small helpers shared by the unit tests."""

import numpy as np
import pytest

from lpucore import Chip, ChipConfig, ScheduleError, assemble
from lpucore.llm.decoder import LOGIT_TOLERANCE

TINY = ChipConfig.tiny()


def timed(events):
    """Assembly text from {queue: [(cycle, instruction text), ...]}, NOPs filled in."""
    lines = []
    for q, evs in events.items():
        t = 0
        for c, ins in sorted(evs):
            assert c >= t, (q, c, t)
            if c > t:
                lines.append(f"{q}: NOP {c - t}")
            lines.append(f"{q}: {ins}")
            t = c + 1
    return "\n".join(lines)


def make_chip(engine, text, cfg=TINY, mem=()):
    chip = Chip(cfg, engine=engine)
    header = ".config tiny\n" if cfg == TINY else ".config json:" + cfg.to_json() + "\n"
    chip.load(assemble(header + text))
    for (s, a), v in dict(mem).items():
        chip.write_mem(s[0], int(s[1:]), a, np.asarray(v, dtype=np.uint8))
    return chip


def run(engine, text, cfg=TINY, mem=()):
    chip = make_chip(engine, text, cfg, mem)
    stats = chip.run()
    return chip, stats


def schedule_error(engine, text, cfg=TINY, mem=()):
    chip = make_chip(engine, text, cfg, mem)
    with pytest.raises(ScheduleError) as e:
        chip.run()
    return e.value


def one_error_line(capsys, *fragments):
    """stderr is exactly one 'lpucore: error: ...' line containing every fragment."""
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("lpucore: error: "), err
    assert "Traceback" not in err
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def check_close(logits, ref_logits):
    """Logits of each step within the decoders' documented bound of the reference's."""
    assert logits.shape == ref_logits.shape
    for i, (a, b) in enumerate(zip(logits, ref_logits)):
        err = float(np.max(np.abs(a - b)))
        bound = LOGIT_TOLERANCE * (1 + float(np.max(np.abs(b))))
        assert err <= bound, f"step {i}: logits differ by {err} > {bound}"
