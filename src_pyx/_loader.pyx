# cython: language_level=3
"""Program loading at C speed (lpucore._loader): pack Instruction lists into the engine's code
table, check a code table against the ISA tables, and build Instruction lists from a code table.

Nothing here raises a user-facing error: every function answers "fine" or "not fine" (or None:
"cannot say, use the Python path"), and lpucore.program then runs its Python validator, which
raises the exact ProgramError of today's checks.  The tables come from lpucore.fastload, which
derives them from the ISA table and the chip configuration.
"""

cimport cython
from cpython.long cimport PyLong_CheckExact
from cpython.object cimport PyObject
from cpython.tuple cimport PyTuple_CheckExact, PyTuple_GET_ITEM, PyTuple_GET_SIZE
from libc.stdint cimport int8_t, int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset

from types import MemberDescriptorType

import numpy as np

DEF NF = 8          # isa.NFIELDS (lpucore.fastload checks it)
DEF MAXOPS = 64     # entries of the per-op tables (lpucore.fastload checks len(isa.TABLE) fits)

# field kinds (fastload.K_*)
DEF K_RANGE = 0
DEF K_SRC = 1
DEF K_NONE_OK = 2
# extra rules (fastload.R_*)
DEF R_NONE = 0
DEF R_LW = 1
DEF R_ABC = 2
DEF R_ACC = 3
DEF R_PERMUTE = 4
DEF R_ROTATE = 5
DEF R_TRANSPOSE = 6
DEF R_VXM = 7
DEF R_MAP = 8
DEF R_REPEAT = 9
# VXM field roles
DEF V_NONE = 0
DEF V_SRC = 1
DEF V_DST = 2


cdef struct Tables:
    int32_t opk[256]            # opcode -> op index, -1 unknown
    int32_t nf[MAXOPS]
    int64_t lo[MAXOPS][NF]
    int64_t hi[MAXOPS][NF]
    int8_t fkind[MAXOPS][NF]
    int8_t vrole[MAXOPS][NF]
    int32_t qkind[MAXOPS]       # queue kind code of the op, -1: any queue (ICU)
    int32_t dtype_f[MAXOPS]     # field index of "dtype", -1 none
    int32_t dmask[MAXOPS]       # accepted dtype codes as bits, 0: no restriction
    int32_t rule[MAXOPS]
    int32_t fa[MAXOPS][4]       # field indices the rule reads
    int32_t vto[MAXOPS]         # VXM cvt: field index of "to", -1
    int32_t vout[MAXOPS]        # VXM: fixed output element bytes (requant: 1), 0: from the dtypes
    int32_t strided[MAXOPS]     # bit j: field j is strided
    int32_t is_icu[MAXOPS]
    int32_t dbytes[8]           # dtype code -> bytes
    int32_t ndtypes
    int64_t streams             # streams per chip (both directions)
    int64_t S                   # streams per direction
    int64_t latch_base
    int64_t alus
    int64_t mxm_size
    int64_t lps                 # lanes per superlane


cdef void _fill(Tables* t, dict d) except *:
    cdef int k, j
    for j in range(256):
        t.opk[j] = d["opk"][j]
    nops = len(d["nf"])
    for k in range(nops):
        t.nf[k] = d["nf"][k]
        t.qkind[k] = d["qkind"][k]
        t.dtype_f[k] = d["dtype_f"][k]
        t.dmask[k] = d["dmask"][k]
        t.rule[k] = d["rule"][k]
        t.vto[k] = d["vto"][k]
        t.vout[k] = d["vout"][k]
        t.strided[k] = d["strided"][k]
        t.is_icu[k] = d["is_icu"][k]
        for j in range(NF):
            t.lo[k][j] = d["lo"][k][j]
            t.hi[k][j] = d["hi"][k][j]
            t.fkind[k][j] = d["fkind"][k][j]
            t.vrole[k][j] = d["vrole"][k][j]
        for j in range(4):
            t.fa[k][j] = d["fa"][k][j]
    t.ndtypes = len(d["dbytes"])
    for j in range(t.ndtypes):
        t.dbytes[j] = d["dbytes"][j]
    t.streams = d["streams"]
    t.S = d["S"]
    t.latch_base = d["latch_base"]
    t.alus = d["alus"]
    t.mxm_size = d["mxm_size"]
    t.lps = d["lps"]


cdef inline bint _group_bad(const Tables* t, int64_t v, int64_t width, bint aligned) noexcept nogil:
    """_check_stream_groups' group(): the stream group v..v+width-1 leaves its direction (or is
    misaligned).  v is a legal stream (0..streams-1), so v % S is the C remainder."""
    cdef int64_t local = v % t.S
    if aligned and local % width:
        return True
    return local + width > t.S


cdef bint _row_bad(const Tables* t, int k, const int64_t* a) noexcept nogil:
    """check_instruction(...) is not None for op k with operands a[0..nf-1]."""
    cdef int j, n = t.nf[k]
    cdef int64_t v, w, src_w, out_w
    for j in range(n):
        v = a[j]
        if t.fkind[k][j] == K_SRC:
            if not ((0 <= v < t.streams) or (t.latch_base <= v < t.latch_base + t.alus)):
                return True
        elif t.fkind[k][j] == K_NONE_OK and v == -1:
            pass
        elif v < t.lo[k][j] or v > t.hi[k][j]:
            return True
    if t.dmask[k] and t.dtype_f[k] >= 0:
        if not (t.dmask[k] >> a[t.dtype_f[k]]) & 1:
            return True
    cdef int r = t.rule[k]
    if r == R_NONE or r == R_REPEAT:
        return False
    if r == R_LW:          # fa: src, n, row
        if a[t.fa[k][2]] + a[t.fa[k][1]] > t.mxm_size:
            return True
        return _group_bad(t, a[t.fa[k][0]], a[t.fa[k][1]], False)
    if r == R_ABC:         # fa: dtype, src
        return _group_bad(t, a[t.fa[k][1]], t.dbytes[a[t.fa[k][0]]], True)
    if r == R_ACC:         # fa: dst
        return _group_bad(t, a[t.fa[k][0]], 4, True)
    if r == R_PERMUTE:     # fa: map
        return _group_bad(t, a[t.fa[k][0]], 2, True)
    if r == R_ROTATE:      # fa: dst, src, n
        return (_group_bad(t, a[t.fa[k][1]], a[t.fa[k][2]], False)
                or _group_bad(t, a[t.fa[k][0]], a[t.fa[k][2]] * a[t.fa[k][2]], False))
    if r == R_TRANSPOSE:   # fa: dst, src
        return _group_bad(t, a[t.fa[k][1]], t.lps, False) or _group_bad(t, a[t.fa[k][0]], t.lps, False)
    if r == R_MAP:         # fa: map
        return (a[t.fa[k][0]] % t.S) % 2 != 0
    # R_VXM: every stream operand's group is aligned to its element's bytes
    src_w = t.dbytes[a[t.dtype_f[k]]] if t.dtype_f[k] >= 0 else 4
    if t.vout[k]:
        out_w = t.vout[k]
    elif t.vto[k] >= 0:
        out_w = t.dbytes[a[t.vto[k]]]
    else:
        out_w = src_w
    for j in range(n):
        if t.vrole[k][j] == V_NONE:
            continue
        v = a[j]
        if v == -1 or v >= t.latch_base:
            continue
        w = src_w if t.vrole[k][j] == V_SRC else out_w
        if (v % t.S) % w:
            return True
    return False


cdef int64_t _first_bad(const Tables* t, const int32_t* code, const int64_t* qstart, const int32_t* qk,
                        int64_t nq) noexcept nogil:
    """The row of the first instruction the Python validator (or the program file parser: an
    unknown opcode, a non-zero unused field) would reject, queue by queue, or -1 when every row
    passes."""
    cdef int64_t q, j, row
    cdef int k, pk
    cdef int64_t a[NF]
    cdef int64_t last[NF]
    cdef int64_t n, stride
    cdef const int32_t* p
    cdef const int32_t* pp
    for q in range(nq):
        for row in range(qstart[q], qstart[q + 1]):
            p = code + row * (1 + NF)
            k = t.opk[p[0] & 255] if 0 <= p[0] < 256 else -1
            if k < 0:
                return row
            if not t.is_icu[k] and t.qkind[k] != qk[q]:
                return row
            for j in range(t.nf[k], NF):          # a file's unused fields must be zero (packed lists' are)
                if p[1 + j] != 0:
                    return row
            for j in range(NF):
                a[j] = p[1 + j]
            if _row_bad(t, k, a):
                return row
            if t.rule[k] != R_REPEAT:
                continue
            if row == qstart[q]:
                return row
            pp = p - (1 + NF)          # the previous row, in the same queue
            pk = t.opk[pp[0] & 255]
            if t.is_icu[pk]:
                return row
            n = a[t.fa[k][0]]
            stride = a[t.fa[k][1]]
            if stride == 0:
                continue
            if t.strided[pk] == 0:
                return row
            for j in range(NF):
                last[j] = pp[1 + j]
                if (t.strided[pk] >> j) & 1:
                    last[j] += n * stride
            if _row_bad(t, pk, last):
                return row
    return -1


cdef class Checker:
    """The ISA tables for one chip configuration (built by lpucore.fastload.checker)."""

    cdef Tables t

    def __init__(self, dict tables):
        _fill(&self.t, tables)

    def first_bad(self, const int32_t[:, ::1] code, const int64_t[::1] qstart, const int32_t[::1] qkind):
        """Row of the first instruction the Python validator rejects, or -1 (queue q holds rows
        qstart[q]:qstart[q+1]; qkind[q]: its queue-kind code)."""
        cdef int64_t nq = qkind.shape[0], q
        if code.shape[1] != 1 + NF or qstart.shape[0] != nq + 1:
            raise ValueError("code table of the wrong shape")
        if qstart[0] != 0 or qstart[nq] != code.shape[0]:
            raise ValueError("qstart does not cover the code table")
        for q in range(nq):
            if qstart[q] > qstart[q + 1]:
                raise ValueError("qstart is not ascending")
        if code.shape[0] == 0:
            return -1
        with nogil:
            r = _first_bad(&self.t, &code[0, 0], &qstart[0], &qkind[0], nq)
        return r


cdef extern from "structmember.h":
    ctypedef struct PyMemberDef:
        int type
        Py_ssize_t offset

cdef extern from "Python.h":
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member
    ctypedef struct PyTypeObject
    PyTypeObject* Py_TYPE(PyObject*)
    PyObject* PyList_GET_ITEM(object, Py_ssize_t)
    long long PyLong_AsLongLongAndOverflow(PyObject*, int*) except? -1

DEF T_OBJECT_EX = 16    # structmember.h: an object slot, AttributeError when unset
DEF OPHASH = 256        # entries of pack's op table (power of two, > 2 x MAXOPS)


cdef Py_ssize_t _slot_offset(object cls, str name):
    """Byte offset of ``cls``'s own ``__slots__`` entry ``name`` in its instances, or -1 when it is
    not a plain object slot of ``cls`` itself (then pack reads the attribute the slow way)."""
    d = cls.__dict__.get(name)
    if type(d) is not MemberDescriptorType:
        return -1
    cdef PyMemberDef* m = (<PyMemberDescrObject*><PyObject*>d).d_member
    if m == NULL or m.type != T_OBJECT_EX or m.offset <= 0:
        return -1
    return m.offset


cdef struct OpHash:
    size_t key[OPHASH]      # id of a table Op (0: empty)
    int32_t opcode[OPHASH]
    int32_t nf[OPHASH]


cdef bint _op_hash(OpHash* h, dict op_index):
    """Fill ``h`` from op_index (id(op) -> (opcode, nf)), open addressing; False if it cannot."""
    cdef size_t k, slot
    memset(h, 0, sizeof(OpHash))
    if len(op_index) * 2 > OPHASH:
        return False
    for key, (opcode, nf) in op_index.items():
        k = <size_t>key
        slot = (k >> 4) & (OPHASH - 1)
        while h.key[slot] != 0:
            slot = (slot + 1) & (OPHASH - 1)
        h.key[slot], h.opcode[slot], h.nf[slot] = k, opcode, nf
    return True


cdef inline Py_ssize_t _op_find(const OpHash* h, size_t k) noexcept nogil:
    """Slot of op id ``k`` in ``h``, or -1."""
    cdef size_t slot = (k >> 4) & (OPHASH - 1)
    while h.key[slot] != 0:
        if h.key[slot] == k:
            return <Py_ssize_t>slot
        slot = (slot + 1) & (OPHASH - 1)
    return -1


def pack(list lists, dict op_index, object instruction_type):
    """Instruction lists (one per queue, by queue number) -> (code int32[n, 1 + NF], qstart
    int64[len(lists) + 1]), or None when an entry is anything but an Instruction of a known Op
    (op_index: id(op) -> (opcode, number of fields)) with a tuple of exactly that many plain ints
    in int32: the caller then takes the Python path, which says what is wrong.

    The loop reads each instruction's ``op`` and ``args`` at their slot offsets (the type is
    checked to be exactly ``instruction_type``, whose slots fix the layout) and finds the op in a
    small table keyed by its id: no attribute lookup or dictionary probe per instruction."""
    cdef Py_ssize_t n = 0, i, j, k, m, nargs, slot
    cdef OpHash ops
    cdef Py_ssize_t off_op = _slot_offset(instruction_type, "op")
    cdef Py_ssize_t off_args = _slot_offset(instruction_type, "args")
    if off_op < 0 or off_args < 0 or not _op_hash(&ops, op_index):
        return None                  # not the Instruction layout pack knows: the Python path
    for obj in lists:
        if type(obj) is not list:
            return None
        n += len(<list>obj)
    code_a = np.zeros((n, 1 + NF), dtype=np.int32)
    qstart_a = np.zeros(len(lists) + 1, dtype=np.int64)
    cdef int32_t[:, ::1] code = code_a
    cdef int64_t[::1] qstart = qstart_a
    cdef Py_ssize_t row = 0
    cdef PyTypeObject* itype = <PyTypeObject*><PyObject*>instruction_type
    cdef PyObject* ins
    cdef PyObject* op
    cdef PyObject* args
    cdef PyObject* last_op = NULL
    cdef PyObject* v
    cdef int32_t opcode = 0
    cdef Py_ssize_t nf = 0
    cdef long long x
    cdef int overflow
    for i in range(len(lists)):
        qstart[i] = row
        lst = lists[i]
        m = len(<list>lst)
        for j in range(m):
            ins = PyList_GET_ITEM(lst, j)
            if Py_TYPE(ins) != itype:
                return None
            op = (<PyObject**>((<char*>ins) + off_op))[0]
            args = (<PyObject**>((<char*>ins) + off_args))[0]
            if op == NULL or args == NULL:
                return None
            if op != last_op:
                slot = _op_find(&ops, <size_t>op)
                if slot < 0:
                    return None
                opcode, nf, last_op = ops.opcode[slot], ops.nf[slot], op
            if not PyTuple_CheckExact(<object>args):
                return None
            nargs = PyTuple_GET_SIZE(<object>args)
            if nargs != nf:
                return None
            code[row, 0] = opcode
            for k in range(nargs):
                v = PyTuple_GET_ITEM(<object>args, k)
                if not PyLong_CheckExact(<object>v):
                    return None
                x = PyLong_AsLongLongAndOverflow(v, &overflow)
                if overflow or x < -2147483648 or x > 2147483647:
                    return None
                code[row, 1 + k] = <int32_t>x
            row += 1
    qstart[len(lists)] = row
    return code_a, qstart_a


def unpack(const int32_t[:, ::1] code, Py_ssize_t start, Py_ssize_t count, list ops, list nfs,
           object instruction_type):
    """Instructions of rows start..start+count-1 (ops[opcode] / nfs[opcode]: the Op and its field
    count; every opcode known, unused fields zero: the caller checked).  Rows equal to an earlier
    row share its (immutable) Instruction."""
    cdef Py_ssize_t r, k, nf
    cdef const int32_t* p
    cdef list out = [None] * count
    cdef dict seen = {}
    new = object.__new__
    setattr_ = object.__setattr__
    for r in range(count):
        p = &code[start + r, 0]
        nf = nfs[p[0]]
        args = tuple([p[1 + k] for k in range(nf)])
        key = (p[0], args)
        ins = seen.get(key)
        if ins is None:
            ins = new(instruction_type)
            setattr_(ins, "op", ops[p[0]])
            setattr_(ins, "args", args)
            seen[key] = ins
        out[r] = ins
    return out


# ---- tensors: byte planes <-> host arrays, in bulk ----------------------------------------------------
cdef inline bint _rows_ok(const int64_t[:, ::1] idx, int64_t nrows) noexcept nogil:
    cdef Py_ssize_t p, v
    for p in range(idx.shape[0]):
        for v in range(idx.shape[1]):
            if idx[p, v] < 0 or idx[p, v] >= nrows:
                return False
    return True


cdef inline Py_ssize_t _place(Py_ssize_t v, Py_ssize_t ch, Py_ssize_t cols, Py_ssize_t L,
                              Py_ssize_t* n) noexcept nogil:
    """Vector v = row * ch + chunk of a tensor of ``cols`` columns: its first element's index in
    the host array, and (in n) how many of its lanes hold elements (the rest is padding)."""
    cdef Py_ssize_t r = v // ch, c = v % ch
    n[0] = min(L, cols - c * L)
    return r * cols + c * L


def gather_planes(const uint8_t[:, ::1] sram, const int64_t[:, ::1] idx, uint8_t[::1] out, Py_ssize_t cols):
    """Read a tensor's byte planes from SRAM into a host array: vector v (row v // chunks, chunk
    v % chunks, chunks = ceil(cols / lanes)) of byte plane p is SRAM row idx[p, v] (sram:
    [slices * addresses, lanes]); ``out`` holds rows * cols elements of nbytes = idx.shape[0]
    bytes each, little-endian, row-major (a vector's padding lanes are not read).  False (nothing
    read) if an index is outside SRAM."""
    cdef Py_ssize_t nb = idx.shape[0], nvec = idx.shape[1], L = sram.shape[1], v, ln, n, e
    cdef Py_ssize_t ch = (cols + L - 1) // L if cols > 0 else 1
    cdef const uint8_t* s0
    cdef const uint8_t* s1
    cdef const uint8_t* s2
    cdef const uint8_t* s3
    cdef uint16_t* o16
    cdef uint32_t* o32
    if nb not in (1, 2, 4) or cols < 1 or nvec % ch or out.shape[0] != (nvec // ch) * cols * nb:
        raise ValueError("gather_planes: sizes do not match")
    if nvec == 0:
        return True
    if not _rows_ok(idx, sram.shape[0]):
        return False
    with nogil:
        for v in range(nvec):
            e = _place(v, ch, cols, L, &n)
            if nb == 1:
                memcpy(&out[e], &sram[idx[0, v], 0], n)
            elif nb == 2:
                s0 = &sram[idx[0, v], 0]
                s1 = &sram[idx[1, v], 0]
                o16 = <uint16_t*>&out[e * 2]
                for ln in range(n):
                    o16[ln] = s0[ln] | (<uint16_t>s1[ln] << 8)
            else:
                s0 = &sram[idx[0, v], 0]
                s1 = &sram[idx[1, v], 0]
                s2 = &sram[idx[2, v], 0]
                s3 = &sram[idx[3, v], 0]
                o32 = <uint32_t*>&out[e * 4]
                for ln in range(n):
                    o32[ln] = (s0[ln] | (<uint32_t>s1[ln] << 8) | (<uint32_t>s2[ln] << 16)
                               | (<uint32_t>s3[ln] << 24))
    return True


def scatter_planes(uint8_t[:, ::1] sram, const int64_t[:, ::1] idx, const uint8_t[:, :] src, Py_ssize_t cols,
                   const int64_t[::1] chunk_col):
    """The inverse of gather_planes: split a host array's elements (little-endian, nbytes =
    idx.shape[0] each) into byte planes and write vector v (row v // chunks, chunk v % chunks) of
    plane p to SRAM row idx[p, v], its padding lanes zero.  ``src`` holds the tensor's rows, one a
    row of bytes (any row stride: a column slice of a wider array is read in place), and chunk c of
    every row starts at element ``chunk_col[c]`` of its row (c * lanes for the row as it is; other
    columns gather whole lane runs of a wider array, a tiled weight's member).  False (nothing
    written) if an index is outside SRAM."""
    cdef Py_ssize_t nb = idx.shape[0], nvec = idx.shape[1], L = sram.shape[1], v, ln, n, p, r, c
    cdef Py_ssize_t ch = (cols + L - 1) // L if cols > 0 else 1
    cdef uint8_t* d0
    cdef uint8_t* d1
    cdef uint8_t* d2
    cdef uint8_t* d3
    cdef const uint8_t* s8
    cdef const uint16_t* i16
    cdef const uint32_t* i32
    if nb not in (1, 2, 4) or cols < 1 or nvec % ch or src.shape[0] != nvec // ch or chunk_col.shape[0] != ch:
        raise ValueError("scatter_planes: sizes do not match")
    if src.shape[1] > 1 and src.strides[1] != 1:
        raise ValueError("scatter_planes: a row's bytes must be contiguous")
    for c in range(ch):            # compared without a product that could overflow
        if chunk_col[c] < 0 or chunk_col[c] > src.shape[1] // nb - min(L, cols - c * L):
            raise ValueError("scatter_planes: a chunk's columns lie outside the rows")
    if nvec == 0:
        return True
    if not _rows_ok(idx, sram.shape[0]):
        return False
    with nogil:
        for v in range(nvec):
            r, c = v // ch, v % ch
            n = min(L, cols - c * L)
            s8 = &src[r, chunk_col[c] * nb]
            if n < L:
                for p in range(nb):
                    memset(&sram[idx[p, v], n], 0, L - n)
            if nb == 1:
                memcpy(&sram[idx[0, v], 0], s8, n)
            elif nb == 2:
                d0 = &sram[idx[0, v], 0]
                d1 = &sram[idx[1, v], 0]
                i16 = <const uint16_t*>s8
                for ln in range(n):
                    d0[ln] = <uint8_t>i16[ln]
                    d1[ln] = <uint8_t>(i16[ln] >> 8)
            else:
                d0 = &sram[idx[0, v], 0]
                d1 = &sram[idx[1, v], 0]
                d2 = &sram[idx[2, v], 0]
                d3 = &sram[idx[3, v], 0]
                i32 = <const uint32_t*>s8
                for ln in range(n):
                    d0[ln] = <uint8_t>i32[ln]
                    d1[ln] = <uint8_t>(i32[ln] >> 8)
                    d2[ln] = <uint8_t>(i32[ln] >> 16)
                    d3[ln] = <uint8_t>(i32[ln] >> 24)
    return True


cdef inline uint64_t _mix64(uint64_t z) noexcept nogil:
    """splitmix64's finaliser (Steele, Lea and Flood 2014): a bijection of 64-bit words."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


@cython.boundscheck(False)
@cython.wraparound(False)
def random_codes(uint64_t key, int8_t[::1] out):
    """Fill ``out`` with int8 codes in [-127, 127]: word i = mix64(key + i * 0x9E3779B97F4A7C15)
    gives elements 8i..8i+7, its bytes b from the least significant, each code (b * 255 >> 8) - 127
    (lpucore.llm.weights._codes is the same in NumPy: the two must agree byte for byte)."""
    cdef Py_ssize_t n = out.shape[0], i, j, words = n // 8
    cdef uint64_t z
    cdef int8_t* o = &out[0] if n > 0 else NULL
    with nogil:
        for i in range(words):
            z = _mix64(key + <uint64_t>i * 0x9E3779B97F4A7C15ULL)
            for j in range(8):
                o[8 * i + j] = <int8_t>(<int32_t>(((z >> (8 * j)) & 0xFF) * 255 >> 8) - 127)
        if n > 8 * words:
            z = _mix64(key + <uint64_t>words * 0x9E3779B97F4A7C15ULL)
            for j in range(n - 8 * words):
                o[8 * words + j] = <int8_t>(<int32_t>(((z >> (8 * j)) & 0xFF) * 255 >> 8) - 127)
