"""The tiled key cache of long caches (lpucore.llm.tiled): new keys written as columns of their tile, in place,
bit for bit what NumPy writes; attention over the tiles against a float64 NumPy softmax."""

import numpy as np
import pytest

import lpucore
from lpucore import Graph
from lpucore.llm import tiled
from lpucore.llm.tiled import TILE

T, D = 2, 40


def _write_graph(B):
    g = Graph()
    consts = {}
    init = np.random.default_rng(0).standard_normal((T * D, TILE)).astype(np.float16)
    K = g.state("k", (T * D, TILE), "float16", init=init)
    pos = g.input("pos", (B,), "int32")
    k16 = g.input("knew", (B, D), "float16")
    tl = tiled.tile_values(g, consts, pos, g.cast(pos, "float32"), T * TILE, D)
    Kn = tiled.write_keys(g, consts, K, k16, tl)
    g.assign(K, Kn)
    g.output("s", g.sum(g.cast(g.slice(Kn, (slice(0, 1), slice(None))), "float32"), axis=-1))
    return g


@pytest.mark.parametrize("B,steps", [(1, [[0], [5], [319], [320], [639], [5]]),
                                     (4, [[0, 1, 2, 3], [317, 318, 319, 320], [4, 4, 4, 4], [630, 631, 632, 632]])])
def test_new_keys_land_in_their_tile_column_in_place(B, steps):
    c = lpucore.compile(_write_graph(B))
    assert not [k for k in c.kernels if k[0] in ("assign", "copy")], c.kernels
    for eng in ("fast", "reference"):
        chip = lpucore.Chip(c.config, engine=eng)
        c.load(chip)
        ref = chip.read_tensor("k").copy()
        for n, ps in enumerate(steps):
            ks = np.random.default_rng(n).standard_normal((B, D)).astype(np.float16)
            _, st = lpucore.execute(c, {"pos": np.array(ps, np.int32), "knew": ks}, chip=chip)
            assert st.cycles == c.expected_cycles
            for i, p in enumerate(ps):          # in row order: the later of equal positions wins
                t, lane = divmod(p, TILE)
                ref[t * D:(t + 1) * D, lane] = ks[i]
            assert np.array_equal(chip.read_tensor("k").view(np.uint16), ref.view(np.uint16)), (eng, ps)


def test_attention_over_tiles_against_numpy():
    """Two query heads per kv head, two kv heads, a position in the second tile: the cache's positions
    before it and the step's own key and value (whatever the cache holds at the position), against the
    float64 softmax-weighted sum, within float16 rounding of the weights."""
    Hkv, hd, G = 2, 16, 2
    D = Hkv * hd
    r = np.random.default_rng(3)
    Kc = r.standard_normal((T * D, TILE)).astype(np.float16)
    Vc = r.standard_normal((T * TILE, D)).astype(np.float16)
    q = r.standard_normal((G, 1, D)).astype(np.float16)
    k, v = r.standard_normal((2, 1, D)).astype(np.float16)
    p = 400
    g = Graph()
    consts = {}
    pos = g.input("pos", (1,), "int32")
    tl = tiled.tile_values(g, consts, pos, g.cast(pos, "float32"), T * TILE, D)
    # the value cache as column tiles (tiled.write_values): tile c of position p at row c * T * TILE + p
    nC = tiled.value_tiles(D)
    Vt = np.zeros((nC, T * TILE, nC * TILE), np.float16)
    Vt[:, :, :D] = Vc
    Vt = np.ascontiguousarray(np.stack([Vt[c, :, c * TILE:(c + 1) * TILE] for c in range(nC)]).reshape(-1, TILE))
    o = tiled.scores_and_mix(g, consts, g.input("q", q.shape, "float16"), g.input("k", k.shape, "float16"),
                             g.input("v", v.shape, "float16"), g.constant("K", Kc), g.constant("V", Vt), Hkv, tl)
    g.output("o", o)
    got = lpucore.execute(lpucore.compile(g), {"pos": np.array([p], np.int32), "q": q, "k": k, "v": v})[0]["o"]
    keys = Kc.astype(np.float64).reshape(T, D, TILE).transpose(0, 2, 1).reshape(T * TILE, D)[:p + 1]
    values = Vc.astype(np.float64)[:p + 1]
    keys[p], values[p] = k[0], v[0]
    for j in range(G):
        for h in range(Hkv):
            lanes = slice(h * hd, (h + 1) * hd)
            s = keys[:, lanes] @ q[j, 0, lanes].astype(np.float64) / np.sqrt(hd)
            w = np.exp(s - s.max())
            want = (w / w.sum()) @ values[:, lanes]
            np.testing.assert_allclose(got[j, 0, lanes], want, atol=2e-3, rtol=0)
