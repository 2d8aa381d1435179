# The MXM, batched.  An ABC does not multiply anything when it issues: it copies
# its activation vector into the plane's batch ("stage A") with the accumulator,
# mode and landing cycle of its product.  The batch is multiplied in one matrix
# product (NumPy BLAS, in FastEngine._mxm_flush, outside this loop) only when it
# must be: before the plane's installed weights change, before an ACC reads an
# accumulator that a batched product lands in by then, when the batch is full, and
# at the end of the run.  Products wait in a FIFO ("stage B") and are added into
# the accumulators in landing order when an ACC (or the end) needs them.  So a
# weight set meeting a run of activations costs one BLAS call, while issue times,
# cycle counts and statistics stay those of the cycle-level model.

cdef extern from "lpu_kernels.h" nogil:
    void lpu_acc_i32(uint32_t* acc, const float* res, int L, int add)
    void lpu_acc_f32(uint32_t* acc, const float* res, int L, int add)
    void lpu_stage_f16(const uint8_t* lo, const uint8_t* hi, int L, float* x)
    void lpu_mxm_i8_transpose(const int8_t* w, int K, int L, int16_t* wt)
    void lpu_mxm_i8_dot(const uint8_t* xb, const int16_t* wt, int K, int L, int16_t* x16, float* out)
    int lpu_vnni_available()
    int64_t lpu_vnni_packed_bytes(int K, int L)
    int lpu_vnni_blocks(int L)
    void lpu_vnni_pack(const int8_t* w, int K, int L, int8_t* wp, int32_t* corr)
    void lpu_vnni_rows(const uint8_t* xb, int64_t xs, int nrows, const int8_t* wp, const int32_t* corr,
                       int K, int L, float* const* orow)
    int lpu_f16w_to_f32(const uint8_t* arr, int L, float* wf, int* kmax, int* cmax)
    int lpu_f32_special(const float* x, int64_t xs, int n, int K)
    int lpu_avx2_available()
    int64_t lpu_avx2_packed_bytes(int K, int L)
    int64_t lpu_avx2_scratch_ints(int K)
    void lpu_avx2_pack(const int8_t* w, int K, int L, int16_t* wp)
    void lpu_avx2_rows(const uint8_t* xb, int64_t xs, int nrows, const int16_t* wp, int K, int L,
                       float* const* orow, int32_t* xp)
    void lpu_f32_rows(const float* x, int64_t xs, int nrows, const float* wf, int K, int L, int ncols,
                      float* const* orow)
    int lpu_mxm_f16_weights(const uint8_t* arr, int L, const float* h2f, double* wd)
    void lpu_mxm_f64_row(const float* x, const double* wd, int K, int L, double* s, double* ab)
    void lpu_mxm_f16_row(const float* x, const uint8_t* arr, int L, const float* h2f, double* s, double* ab)
    int lpu_mxm_f16_special(const uint8_t* arr, int L)
    int lpu_mxm_f16_fused(const float* x, int64_t xs, int nrows, const uint8_t* arr, int L, double* out)
    int lpu_mxm_f16_snap(const float* x, const uint8_t* arr, int L, int c, double s, double b, float* out)


cdef extern from "lpu_jobs.h" nogil:
    int LPU_JOB_I8
    int LPU_JOB_F32
    int LPU_JOB_I8_AVX2
    ctypedef struct lpu_job:
        int kind, n, L, kk, cc
        float** orow
        const uint8_t* x
        const uint8_t* wsrc
        void* w
        int32_t* corr
    ctypedef struct lpu_pool:
        lpu_job* jobs
        int delay_us
    int lpu_pool_init(lpu_pool* P, int nj, int rows)
    int lpu_pool_start(lpu_pool* P, int64_t w_bytes, int64_t corr_ints)
    lpu_job* lpu_pool_acquire(lpu_pool* P)
    int64_t lpu_pool_submit(lpu_pool* P, lpu_job* j)
    void lpu_pool_wait(lpu_pool* P, int k, int64_t seq)
    void lpu_pool_wait_upto(lpu_pool* P, int64_t seq)
    void lpu_pool_drain(lpu_pool* P)
    void lpu_pool_destroy(lpu_pool* P)

# Batches of at least this many rows go to the helper thread (smaller ones cost less
# to multiply than to hand over).
DEF HELPER_ROWS = 16

# s.simd: which kernels multiply MXM batches (FastEngine.mxm_kernel, in MXM_KERNELS' order)
DEF KERNEL_PORTABLE = 0     # small batches by plain C (lpu_mxm_i8_dot...), the rest by NumPy's BLAS
DEF KERNEL_AVX512 = 1       # int8 and fp32-mode fp16 batches of any size by the AVX-512 kernels
DEF KERNEL_AVX2 = 2         # int8 batches of any size by the AVX2 kernel; fp16 as portable
MXM_KERNELS = ("portable", "avx512", "avx2")


cdef int64_t packed_bytes(int L) noexcept nogil:
    """Bytes of int8 weights in the VNNI or the AVX2 kernel's layout, whichever is larger."""
    cdef int64_t a = lpu_vnni_packed_bytes(L, L)
    cdef int64_t b = lpu_avx2_packed_bytes(L, L)
    return a if a > b else b


# test hook (_hide_mxm_kernels): kernels this engine pretends the host cannot run, a bit each
cdef int _hidden_kernels = 0


cdef int kernel_available(int kernel) noexcept nogil:
    if (_hidden_kernels >> kernel) & 1:
        return 0
    if kernel == KERNEL_AVX512:
        return lpu_vnni_available()
    if kernel == KERNEL_AVX2:
        return lpu_avx2_available()
    return 1


cdef inline int pool_start(State* s) noexcept nogil:
    """0 if the helper thread runs (started now if need be), 1 to compute here."""
    cdef int L = s.L
    cdef int64_t wb = packed_bytes(L)
    cdef int64_t fb = <int64_t>(L // 2) * 64 * lpu_vnni_blocks(L) * 4
    cdef int64_t cb = 64 * lpu_vnni_blocks(L)
    cdef int64_t xb = lpu_avx2_scratch_ints(L)
    return lpu_pool_start(<lpu_pool*>s.jobs, wb if wb > fb else fb, cb if cb > xb else xb)


cdef inline void pool_hand_over(State* s, int p, int kind, const uint8_t* x, int64_t row_bytes,
                                int n, int dtc) noexcept nogil:
    """Hand plane p's batch of n rows (staged at x, row_bytes apart) to helper jobs that
    multiply it where it is, with the installed slot's weights: two jobs of half the rows
    each when it is big enough, so that a loop waiting for one can run the other.  File
    the products' rows, and stage the plane's next batch in the ring's next buffer (once
    the job that read that buffer last is done)."""
    cdef lpu_pool* P = <lpu_pool*>s.jobs
    cdef lpu_job* j
    cdef int i, b, part, r0, r1, nparts
    cdef int64_t seq = -1
    cdef int64_t e, base = s.mx_bhead[p] + s.mx_bn[p]
    mxm_commit(s, p, n, dtc)
    nparts = 2 if n >= 2 * HELPER_ROWS else 1
    for part in range(nparts):
        r0 = part * n // nparts
        r1 = (part + 1) * n // nparts
        j = lpu_pool_acquire(P)
        j.kind, j.n, j.L = kind, r1 - r0, s.L
        j.x = x + r0 * row_bytes
        j.wsrc = mx_slot(s, p, s.mx_arr_slot[p])
        for i in range(r0, r1):
            e = p * s.BB + (base + i) % s.BB
            j.orow[i - r0] = s.mx_bres + e * s.L
            s.mx_bjob[e] = <int>(j - P.jobs)
        seq = lpu_pool_submit(P, j)
        for i in range(r0, r1):
            s.mx_bseq[p * s.BB + (base + i) % s.BB] = seq
    s.mx_hbatches += 1
    s.mx_sseq[p * s.NS + s.mx_arr_slot[p]] = seq
    b = p * NR + s.mx_xbuf[p]
    s.mx_rseq[b] = seq
    s.mx_xbuf[p] = (s.mx_xbuf[p] + 1) % NR
    b = p * NR + s.mx_xbuf[p]
    lpu_pool_wait_upto(P, s.mx_rseq[b])
    s.mx_rseq[b] = -1


cdef inline float* fifo_row(State* s, int p, int i) noexcept nogil:
    """Where the i-th product of plane p's batch goes: the FIFO's i-th free row."""
    return s.mx_bres + (p * s.BB + (s.mx_bhead[p] + s.mx_bn[p] + i) % s.BB) * <int64_t>s.L


cdef inline int32_t next_field(State* s, int q, int fi) noexcept nogil:
    """Field fi of the instruction queue q issues next (a repetition adds its stride)."""
    cdef int64_t* qp = s.qs + q * QW
    cdef int op
    cdef int32_t v
    if qp[Q_REPLEFT] > 0:
        op = s.code[qp[Q_REPROW] * (1 + NFIELDS)]
        v = s.qf[q * NFIELDS + fi]
        if (s.strided[op] >> fi) & 1:
            v += <int32_t>qp[Q_REPSTRIDE]
        return v
    return s.code[qp[Q_PC] * (1 + NFIELDS) + 1 + fi]


cdef inline int mxm_needs_flush(State* s, int q, int op, int64_t c) noexcept nogil:
    """1 if plane q's batch must be multiplied before this instruction can issue."""
    cdef int p = s.q_slot[q]
    cdef int n = s.mx_an[p]
    cdef int r
    cdef int32_t acc
    if n == 0:
        return 0
    for r in range(s.RI):
        if s.mx_inst_T[p * s.RI + r] >= 0 and s.mx_inst_T[p * s.RI + r] <= c:
            return 1          # the weights the batch was computed with are about to change
    if op == OP_ABC and n == s.BMAX:
        return 1
    if op == OP_ACC and s.mx_aland[p * s.BMAX] <= c:
        # only a batched product for the accumulator this ACC reads matters: a GEMM drains
        # one half of the accumulators while the batch fills the other
        acc = next_field(s, q, F_ACC_ACC)
        for r in range(n):
            if s.mx_aland[p * s.BMAX + r] > c:
                return 0          # later rows land later
            if s.mx_aacc[p * s.BMAX + r] == acc:
                return 1
    return 0


cdef inline uint8_t* mx_slot(State* s, int p, int k) noexcept nogil:
    return s.mx_slots + (<int64_t>p * s.NS + k) * s.L * s.L


cdef inline int mx_free_slot(State* s, int p, int busy) noexcept nogil:
    """A slot of plane p that holds neither the installed weights, nor a pending
    install, nor busy (the one just handed to an IW, which the buffer's rows refer to):
    there are RI + 2 slots and at most RI pending installs."""
    cdef int k, r, used
    for k in range(s.NS):
        if k == busy or k == s.mx_arr_slot[p]:
            continue
        used = 0
        for r in range(s.RI):
            if s.mx_inst_T[p * s.RI + r] >= 0 and s.mx_inst_slot[p * s.RI + r] == k:
                used = 1
        if not used:
            return k
    return -1       # unreachable: NS = RI + 2


cdef inline void mxm_install(State* s, int p, int64_t c) noexcept nogil:
    """Make the installs effective by cycle c the plane's weights (oldest first)."""
    cdef int r, best
    cdef int64_t bt, T
    while True:
        best = -1
        bt = INF
        for r in range(s.RI):
            T = s.mx_inst_T[p * s.RI + r]
            if T >= 0 and T <= c and T < bt:
                best = r
                bt = T
        if best < 0:
            return
        s.mx_arr_slot[p] = s.mx_inst_slot[p * s.RI + best]
        s.mx_arr_dt[p] = s.mx_inst_dt[p * s.RI + best]
        s.mx_ver[p] += 1
        s.mx_inst_T[p * s.RI + best] = -1


cdef inline void mxm_apply(State* s, int p, int64_t c) noexcept nogil:
    """Add the products landing by cycle c into the accumulators, in landing order."""
    cdef int64_t e, i
    cdef int l
    cdef uint32_t* acc
    cdef float* res
    cdef float r
    while s.mx_bn[p] > 0:
        e = p * s.BB + s.mx_bhead[p]
        if s.mx_bland[e] > c:
            return
        if s.mx_bjob[e] >= 0:
            lpu_pool_wait(<lpu_pool*>s.jobs, s.mx_bjob[e], s.mx_bseq[e])
            s.mx_bjob[e] = -1
        acc = s.mx_acc + (<int64_t>p * s.NACC + s.mx_bacc[e]) * s.L
        res = s.mx_bres + e * s.L
        if s.mx_bdt[e] == DT_INT8:
            lpu_acc_i32(acc, res, s.L, s.mx_badd[e])
        else:
            lpu_acc_f32(acc, res, s.L, s.mx_badd[e])
        s.mx_bhead[p] = (s.mx_bhead[p] + 1) % s.BB
        s.mx_bn[p] -= 1


cdef inline uint8_t* mx_xrow(State* s, int p, int i) noexcept nogil:
    """Row i of plane p's int8 batch (offset bytes) in its current ring buffer."""
    return s.mx_xb + ((<int64_t>p * NR + s.mx_xbuf[p]) * (s.BMAX + 8) + i) * s.L


cdef inline float* mx_axrow(State* s, int p, int i) noexcept nogil:
    """Row i of plane p's float batch in its current ring buffer."""
    return s.mx_ax + ((<int64_t>p * NR + s.mx_xbuf[p]) * s.BMAX + i) * s.L


cdef inline void mxm_commit(State* s, int p, int n, int dtc) noexcept nogil:
    """The batch's n products are in the FIFO's next n rows (or will be, once the helper
    jobs pool_hand_over then files there are done): file their accumulators, modes and
    landing cycles there, and empty the batch."""
    cdef int i
    cdef int64_t a, e
    for i in range(n):
        a = <int64_t>p * s.BMAX + i
        e = p * s.BB + (s.mx_bhead[p] + s.mx_bn[p] + i) % s.BB
        s.mx_bjob[e] = -1
        s.mx_bacc[e] = s.mx_aacc[a]
        s.mx_badd[e] = s.mx_aadd[a]
        s.mx_bland[e] = s.mx_aland[a]
        s.mx_bdt[e] = dtc
    s.mx_bn[p] += n
    s.mx_an[p] = 0
    s.mx_cbatches += 1


cdef int mxm_multiply_vnni(State* s, int p) noexcept nogil:
    """Plane p's int8 batch, any size, by the AVX-512 VNNI kernel (lpu_kernels.h): the
    exact int32 sums the other paths give.  Returns 0 (done) or 1 (no room in the FIFO:
    the host path takes it; cannot happen, as products land mxm_delay cycles after
    their ABC, so after mxm_apply at most mxm_delay + 1 of them wait)."""
    cdef int n = s.mx_an[p]
    cdef int L = s.L
    cdef int i, k, m
    cdef int8_t* wp = s.mx_wp + p * s.mx_wpstride
    cdef int32_t* corr = s.mx_wcorr + <int64_t>p * 64 * lpu_vnni_blocks(L)
    cdef float* orow[4]
    mxm_apply(s, p, s.t)
    if n + s.mx_bn[p] > s.BB:
        return 1
    if s.helper and n >= HELPER_ROWS and pool_start(s) == 0:
        pool_hand_over(s, p, LPU_JOB_I8, mx_xrow(s, p, 0), L, n, DT_INT8)
        return 0
    if s.mx_wpver[p] != s.mx_ver[p]:
        lpu_vnni_pack(<int8_t*>mx_slot(s, p, s.mx_arr_slot[p]), L, L, wp, corr)
        s.mx_wpver[p] = s.mx_ver[p]
    i = 0
    while i < n:
        m = n - i if n - i < 4 else 4       # LPU_VNNI_ROWS
        for k in range(m):
            orow[k] = fifo_row(s, p, i + k)
        lpu_vnni_rows(mx_xrow(s, p, i), L, m, wp, corr, L, L, orow)
        i += m
    mxm_commit(s, p, n, DT_INT8)
    return 0


cdef int mxm_multiply_avx2(State* s, int p) noexcept nogil:
    """Plane p's int8 batch, any size, by the AVX2 kernel (lpu_kernels.h): the exact int32
    sums the other paths give.  Returns 0, or 1 as mxm_multiply_vnni."""
    cdef int n = s.mx_an[p]
    cdef int L = s.L
    cdef int i, k, m
    cdef int16_t* wp = <int16_t*>(s.mx_wp + p * s.mx_wpstride)
    cdef float* orow[6]
    mxm_apply(s, p, s.t)
    if n + s.mx_bn[p] > s.BB:
        return 1
    if s.helper and n >= HELPER_ROWS and pool_start(s) == 0:
        pool_hand_over(s, p, LPU_JOB_I8_AVX2, mx_xrow(s, p, 0), L, n, DT_INT8)
        return 0
    if s.mx_wpver[p] != s.mx_ver[p]:
        lpu_avx2_pack(<int8_t*>mx_slot(s, p, s.mx_arr_slot[p]), L, L, wp)
        s.mx_wpver[p] = s.mx_ver[p]
    i = 0
    while i < n:
        m = n - i if n - i < 6 else 6       # LPU_AVX2_ROWS
        for k in range(m):
            orow[k] = fifo_row(s, p, i + k)
        lpu_avx2_rows(mx_xrow(s, p, i), L, m, wp, L, L, orow, s.mx_si)
        i += m
    mxm_commit(s, p, n, DT_INT8)
    return 0


cdef int mxm_multiply_f32(State* s, int p) noexcept nogil:
    """Plane p's float16 batch, any size, in fp16_mxm="fp32" mode by the AVX-512 kernel
    (lpu_kernels.h): products summed in float32, k ascending.  Rows and columns of the
    weights that are all zero (a GEMM's padding) are skipped unless an activation is an
    infinity or a NaN (which times zero is NaN).  Returns 0, or 1 as mxm_multiply_vnni."""
    cdef int n = s.mx_an[p]
    cdef int L = s.L
    cdef int K = L // 2
    cdef int i, k, m, kk, cc
    cdef float* wf = s.mx_wf + <int64_t>p * K * 64 * lpu_vnni_blocks(L)
    cdef float* xa = mx_axrow(s, p, 0)
    cdef float* orow[4]
    mxm_apply(s, p, s.t)
    if n + s.mx_bn[p] > s.BB:
        return 1
    if s.helper and n >= HELPER_ROWS and pool_start(s) == 0:
        pool_hand_over(s, p, LPU_JOB_F32, <const uint8_t*>xa, L * sizeof(float), n, s.mx_arr_dt[p])
        return 0
    if s.mx_wfver[p] != s.mx_ver[p]:
        lpu_f16w_to_f32(mx_slot(s, p, s.mx_arr_slot[p]), L, wf, <int*>&s.mx_wfext[2 * p], <int*>&s.mx_wfext[2 * p + 1])
        s.mx_wfver[p] = s.mx_ver[p]
    kk, cc = s.mx_wfext[2 * p], s.mx_wfext[2 * p + 1]
    if (kk < K or cc < L) and lpu_f32_special(xa, L, n, K):
        kk, cc = K, L
    i = 0
    while i < n:
        m = n - i if n - i < 4 else 4
        for k in range(m):
            orow[k] = fifo_row(s, p, i + k)
        lpu_f32_rows(xa + <int64_t>i * L, L, m, wf, kk, L, cc, orow)
        i += m
    mxm_commit(s, p, n, s.mx_arr_dt[p])
    return 0


cdef inline int mxm_multiply_small(State* s, int p) noexcept nogil:
    """Multiply plane p's batch here, without the host's BLAS, when it has at most
    s.small_rows rows (decode-shaped work: a few activation vectors per weight set,
    where a BLAS call costs more than its arithmetic).  int8: exact int32 sums.
    fp16 (exact mode): each dot product summed in float64 (the products are exact
    there), with the bound b = (K + 2) 2**-53 1.01 sum|x_k w_k| on the summation
    error; when s - b and s + b round to the same float32, that is the exactly
    rounded dot product, and when b is below half the products' granularity, s
    rounded to it is the exact sum (the rules of lpucore.matmul.fp16_dot_fast).  Returns 0 when
    done (products queued as _push_products does), 1 to leave the batch to the host
    (too many rows, fp32 mode, an infinity or NaN in the operands, or a result this
    bound cannot settle), with nothing changed but caches."""
    cdef int n = s.mx_an[p]
    cdef int L = s.L
    cdef int K = L // 2
    cdef int dtc = s.mx_arr_dt[p]
    cdef int i, k, c, nnz
    cdef int64_t RL2 = <int64_t>L * L
    cdef int64_t e, a
    cdef int32_t* si = s.mx_si
    cdef int16_t* wt = <int16_t*>(s.mx_wp + p * s.mx_wpstride)
    cdef double* sd = s.mx_sd
    cdef double* ab = s.mx_sd + L
    cdef double* wd = s.mx_wd + <int64_t>p * K * L
    cdef double b, sv
    cdef double coef = (K + 2) * 1.1102230246251565e-16 * 1.01
    cdef float flo, fhi
    cdef float* xa
    cdef float* res
    cdef uint8_t* arr = mx_slot(s, p, s.mx_arr_slot[p])
    if n == 0:
        return 0
    if dtc == DT_INT8 and s.simd == KERNEL_AVX512:
        return mxm_multiply_vnni(s, p)
    if dtc == DT_INT8 and s.simd == KERNEL_AVX2:
        return mxm_multiply_avx2(s, p)
    if dtc != DT_INT8 and not s.fp16_exact and s.simd == KERNEL_AVX512:
        return mxm_multiply_f32(s, p)
    if n > s.small_rows or n + s.mx_bn[p] > s.BB:
        return 1
    if dtc != DT_INT8:
        if not s.fp16_exact:
            return 1
        nnz = 0
        for i in range(n):
            xa = mx_axrow(s, p, i)
            for k in range(K):
                if not fabsf(xa[k]) <= 3.4028234663852886e38:
                    return 1
                if xa[k] != 0.0:
                    nnz += 1
        # dense batches convert the weights to float64 once per install (cached);
        # sparse ones (one-hot rows) read the few weight rows they touch directly;
        # with AVX-512 every row reads the byte planes itself (lpu_mxm_f16_fused)
        if s.simd != KERNEL_AVX512:
            if s.mx_wchk[p] != s.mx_ver[p] or (nnz > K and not s.mx_wconv[p]):
                if nnz > K:
                    s.mx_wbad[p] = <uint8_t>lpu_mxm_f16_weights(arr, L, _H2F, wd)
                    s.mx_wconv[p] = 1
                else:
                    s.mx_wbad[p] = <uint8_t>lpu_mxm_f16_special(arr, L)
                    s.mx_wconv[p] = 0
                s.mx_wchk[p] = s.mx_ver[p]
            if s.mx_wbad[p]:
                return 1
    if dtc == DT_INT8 and s.mx_wpver[p] != s.mx_ver[p]:
        # the weights transposed to int16 (portable kernel; in mx_wp, as no other kernel runs)
        lpu_mxm_i8_transpose(<int8_t*>arr, L, L, wt)
        s.mx_wpver[p] = s.mx_ver[p]
    # make room: products that have landed by now go into the accumulators first
    mxm_apply(s, p, s.t)
    for i in range(n):
        a = <int64_t>p * s.BMAX + i
        xa = mx_axrow(s, p, i)
        e = p * s.BB + (s.mx_bhead[p] + s.mx_bn[p] + i) % s.BB
        res = s.mx_bres + e * L
        if dtc == DT_INT8:
            lpu_mxm_i8_dot(mx_xrow(s, p, i), wt, L, L, <int16_t*>si, res)
        else:
            if s.simd == KERNEL_AVX512:
                # four rows at a time (the batch's rows are L floats apart), row i's sums at i % 4
                if i % 4 == 0 and lpu_mxm_f16_fused(xa, L, min(4, n - i), arr, L, s.mx_sd):
                    return 1          # an infinity or a NaN weight: nothing committed yet
                sd = s.mx_sd + (i % 4) * 2 * L
                ab = sd + L
            elif s.mx_wconv[p]:
                memset(sd, 0, 2 * L * sizeof(double))
                lpu_mxm_f64_row(xa, wd, K, L, sd, ab)
            else:
                memset(sd, 0, 2 * L * sizeof(double))
                lpu_mxm_f16_row(xa, arr, L, _H2F, sd, ab)
            for c in range(L):
                sv = sd[c]
                b = coef * ab[c]
                flo = <float>(sv - b)
                fhi = <float>(sv + b)
                if flo != fhi and lpu_mxm_f16_snap(xa, arr, L, c, sv, b, &flo):
                    return 1          # nothing committed yet: the host redoes the batch
                res[c] = 0.0 if flo == 0.0 else flo
    mxm_commit(s, p, n, dtc)
    return 0


cdef inline int mxm_exec(State* s, int q, int op, int32_t* f, int64_t c) noexcept nogil:
    cdef int p = s.q_slot[q]
    cdef int pos = s.q_pos[q]
    cdef int i, dtc, n, b
    cdef int64_t e, T, slot, macs
    cdef uint8_t* v
    cdef uint8_t* lo
    cdef uint8_t* hi
    cdef uint32_t* acc
    cdef float* xa
    cdef int64_t name
    mxm_install(s, p, c)
    if op == OP_LW:
        n = f[F_LW_N]
        # rows a bulk Read named for this LW (_bulk.pxi) come from SRAM, not the stream
        for i in range(n):
            if (bulk_named(s, p * s.L + f[F_LW_ROW] + i, c) < 0
                    and stream_read(s, f[F_LW_SRC] + i, pos, c) == NULL):
                set_error(s, ERR_EMPTY_READ, c, q, f[F_LW_SRC] + i, pos)
                return 1
        b = s.mx_buf_slot[p]
        for i in range(n):
            name = bulk_named(s, p * s.L + f[F_LW_ROW] + i, c)
            if name >= 0:
                bulk_row(s, p, f[F_LW_ROW] + i, b, name, c)
                continue
            v = stream_read(s, f[F_LW_SRC] + i, pos, c)
            if s.bulk_rec:
                rec_lw(s, p, f[F_LW_ROW] + i, v, c)
            memcpy(mx_slot(s, p, b) + <int64_t>(f[F_LW_ROW] + i) * s.L, v, s.L)
            s.mx_row_src[p * s.L + f[F_LW_ROW] + i] = b
        return 0
    if op == OP_IW:
        T = c + s.mx_install_delay
        e = p * s.RI + (T % s.RI)
        s.mx_inst_T[e] = T
        s.mx_inst_dt[e] = f[F_IW_DTYPE]
        # the buffer's slot, completed with the rows LW has not rewritten since the
        # last IW, becomes the install; later LWs go to a fresh slot
        b = s.mx_buf_slot[p]
        for i in range(s.L):
            if s.mx_row_src[p * s.L + i] != b:
                memcpy(mx_slot(s, p, b) + <int64_t>i * s.L,
                       mx_slot(s, p, s.mx_row_src[p * s.L + i]) + <int64_t>i * s.L, s.L)
                s.mx_row_src[p * s.L + i] = b
        s.mx_inst_slot[e] = b
        s.mx_buf_slot[p] = mx_free_slot(s, p, b)
        # LW is about to rewrite that slot: a helper job may still read its weights
        if s.mx_sseq[p * s.NS + s.mx_buf_slot[p]] >= 0:
            lpu_pool_wait_upto(<lpu_pool*>s.jobs, s.mx_sseq[p * s.NS + s.mx_buf_slot[p]])
            s.mx_sseq[p * s.NS + s.mx_buf_slot[p]] = -1
        effect(s, T)
        return 0
    if op == OP_ABC:
        dtc = f[F_ABC_DTYPE]
        if dtc == DT_FLOAT16 and c < s.mx_busy_until[p]:
            set_error(s, ERR_MXM, c, q, MXE_BUSY, 0)
            return 1
        if s.mx_arr_dt[p] < 0:
            set_error(s, ERR_MXM, c, q, MXE_EMPTY, 0)
            return 1
        if s.mx_arr_dt[p] != dtc:
            set_error(s, ERR_MXM, c, q, MXE_DTYPE, 0)
            return 1
        lo = stream_read(s, f[F_ABC_SRC], pos, c)
        if lo == NULL:
            set_error(s, ERR_EMPTY_READ, c, q, f[F_ABC_SRC], pos)
            return 1
        hi = NULL
        if dtc == DT_FLOAT16:
            hi = stream_read(s, f[F_ABC_SRC] + 1, pos, c)
            if hi == NULL:
                set_error(s, ERR_EMPTY_READ, c, q, f[F_ABC_SRC] + 1, pos)
                return 1
        e = p * s.BMAX + s.mx_an[p]
        # stage the activation: int8 as offset bytes (what the VNNI kernel multiplies),
        # float16 as floats (what the host's BLAS multiplies)
        if hi == NULL:
            v = mx_xrow(s, p, s.mx_an[p])
            for i in range(s.L):
                v[i] = lo[i] ^ 0x80
        else:
            xa = mx_axrow(s, p, s.mx_an[p])
            if s.simd == KERNEL_AVX512:
                lpu_stage_f16(lo, hi, s.L, xa)
            else:
                for i in range(s.L // 2):
                    xa[i] = _H2F[<uint32_t>lo[i] | (<uint32_t>hi[i] << 8)]
                for i in range(s.L // 2, s.L):
                    xa[i] = 0.0
        T = c + s.mx_delay
        s.mx_aacc[e] = f[F_ABC_ACC]
        s.mx_aadd[e] = <uint8_t>f[F_ABC_ADD]
        s.mx_aland[e] = T
        s.mx_an[p] += 1
        effect(s, T)
        if dtc == DT_FLOAT16:
            macs = <int64_t>(s.L // 2) * s.L
            s.mx_busy[p] += s.mx_fp16_interval
            s.mx_busy_until[p] = c + s.mx_fp16_interval
        else:
            macs = <int64_t>s.L * s.L
            s.mx_busy[p] += 1
        s.mx_macs[p] += macs
        if c != s.mx_cycle:
            s.mx_cycle = c
            s.mx_cycle_macs = 0
        s.mx_cycle_macs += macs
        if s.mx_cycle_macs > s.mx_peak[0]:
            s.mx_peak[0] = s.mx_cycle_macs
        return 0
    # ACC: every product landing by c is in the accumulators (the loop made sure
    # the batch holding them was multiplied)
    mxm_apply(s, p, c)
    acc = s.mx_acc + (<int64_t>p * s.NACC + f[F_ACC_ACC]) * s.L
    T = c + s.mx_acc_delay
    for i in range(4):
        slot = pool_index(s, q, i, c)
        lpu_to_plane(s.L, acc, s.pool + slot * s.L, 8 * i)
        stream_write(s, f[F_ACC_DST] + i, pos, T, q, slot)
    effect(s, T)
    return 0


# Batches of up to SMALL_ROWS activation rows are multiplied inside the loop
# (C, no GIL), larger ones by the host's BLAS: below this, a BLAS call's
# overhead outweighs its arithmetic (bench/bench_decode.py, bench/bench_gemm.py).
# 64 covers decode attention over caches of up to 63 positions: on GPT-2-small int8
# with 33 positions, 32 sent 720 batches a step to the host at 0.64 ms each (+25%
# wall per step); fp16 (b)'s 256-row batches are faster on the host.
SMALL_ROWS = 64

# the MXM's saved arrays: weight slots and buffers, installs, accumulators, batches, product FIFOs
_MXM_SAVED = ("mx_slots", "mx_buf_slot", "mx_row_src", "mx_arr_slot", "mx_inst_slot", "mx_arr_dt", "mx_ver",
              "mx_inst_T", "mx_inst_dt", "mx_acc", "mx_ax", "mx_xb", "mx_xbuf", "mx_aacc", "mx_aadd", "mx_aland",
              "mx_an", "mx_bres", "mx_bacc", "mx_badd", "mx_bland", "mx_bdt", "mx_bhead", "mx_bn",
              "mx_busy_until", "mx_macs", "mx_busy", "mx_peak")


KERNEL_ENV = "LPUCORE_MXM_KERNEL"


def default_kernel():
    """The kernel a new engine starts with: ``$LPUCORE_MXM_KERNEL`` if set (one of
    MXM_KERNELS; LpuError if the host cannot run it), else the fastest the host runs."""
    name = _os.environ.get(KERNEL_ENV, "").strip()
    if name:
        return check_kernel(name, f"${KERNEL_ENV}")
    return MXM_KERNELS.index(available_kernels()[0])


def check_kernel(name, what):
    """The code of MXM kernel ``name``; LpuError if unknown or if this host cannot run it."""
    if name not in MXM_KERNELS:
        raise _errors.LpuError(f"{what} must be one of 'avx512', 'avx2', 'portable', got {name!r}")
    k = MXM_KERNELS.index(name)
    if not kernel_available(k):
        need = "AVX-512 with VNNI and VBMI" if k == KERNEL_AVX512 else "AVX2"
        raise _errors.LpuError(f"{what}={name!r} needs a host with {need}; this one lacks it "
                               f"(kernels it runs: {', '.join(available_kernels())})")
    return k


def available_kernels():
    """The kernels this host runs, fastest first."""
    return tuple(n for n in ("avx512", "avx2", "portable") if kernel_available(MXM_KERNELS.index(n)))


def _hide_mxm_kernels(names):
    """Tests only: from now on, engines behave as if the host could not run the kernels
    ``names`` (default choice, $LPUCORE_MXM_KERNEL and mxm_kernel checks); () undoes it."""
    global _hidden_kernels
    mask = 0
    for n in names:
        if n == "portable":
            raise ValueError("the portable kernel runs everywhere")
        mask |= 1 << MXM_KERNELS.index(n)
    _hidden_kernels = mask


cdef class MxmUnit(Unit):
    """The MXM: per plane, weight slots, buffer and installs, accumulators, the batch of
    activations waiting to be multiplied (stage A), the FIFO of products waiting to land
    (stage B), MAC counters; and host-side caches of the installed weights (not saved)."""

    cdef readonly dict views     # shaped views of the batch, slot and FIFO arrays, for FastEngine._mxm_flush

    def __init__(self):
        Unit.__init__(self, "MXM", saved=_MXM_SAVED, scalars=("mx_cycle", "mx_cycle_macs"))

    cdef int alloc(self, State* s, object cfg, dict a) except -1:
        Unit.alloc(self, s, cfg, a)
        NP, L = cfg.mxm_planes, s.L
        s.NP = NP
        s.NACC = cfg.mxm_accumulators
        s.RI = cfg.mxm_install_delay + 1
        s.BMAX = 512
        # the FIFO holds two batches plus the products issued while they are in flight
        s.BB = 2 * s.BMAX + cfg.mxm_delay + 2
        s.mx_install_delay = cfg.mxm_install_delay
        s.mx_delay = cfg.mxm_delay
        s.mx_acc_delay = cfg.mxm_acc_delay
        s.mx_fp16_interval = cfg.mxm_fp16_interval
        s.NS = s.RI + 2
        a["mx_slots"] = np.zeros(NP * s.NS * L * L, dtype=np.uint8)
        for k in ("mx_buf_slot", "mx_arr_dt", "mx_xbuf", "mx_an", "mx_bhead", "mx_bn"):
            a[k] = np.zeros(NP, dtype=np.int32)
        a["mx_row_src"] = np.zeros(NP * L, dtype=np.int32)
        a["mx_arr_slot"] = np.full(NP, -1, dtype=np.int32)
        a["mx_inst_slot"] = np.zeros(NP * s.RI, dtype=np.int32)
        a["mx_inst_T"] = np.zeros(NP * s.RI, dtype=np.int64)
        a["mx_inst_dt"] = np.zeros(NP * s.RI, dtype=np.int32)
        a["mx_acc"] = np.zeros(NP * s.NACC * L, dtype=np.uint32)
        a["mx_ax"] = np.zeros(NP * NR * s.BMAX * L + 4 * L, dtype=np.float32)   # + 4 rows the kernels may read
        # int8 activations as offset bytes; 8 spare rows (and 4 bytes) so the VNNI kernel may
        # read whole groups of rows and of 4 bytes past a batch's end
        a["mx_xb"] = np.zeros(NP * NR * (s.BMAX + 8) * L + 4, dtype=np.uint8)
        a["mx_aacc"] = np.zeros(NP * s.BMAX, dtype=np.int32)
        a["mx_aadd"] = np.zeros(NP * s.BMAX, dtype=np.uint8)
        a["mx_aland"] = np.zeros(NP * s.BMAX, dtype=np.int64)
        a["mx_bres"] = np.zeros(NP * s.BB * L, dtype=np.float32)
        a["mx_bacc"] = np.zeros(NP * s.BB, dtype=np.int32)
        a["mx_badd"] = np.zeros(NP * s.BB, dtype=np.uint8)
        a["mx_bland"] = np.zeros(NP * s.BB, dtype=np.int64)
        a["mx_bdt"] = np.zeros(NP * s.BB, dtype=np.int32)
        for k in ("mx_ver", "mx_busy_until", "mx_macs", "mx_busy"):
            a[k] = np.zeros(NP, dtype=np.int64)
        a["mx_peak"] = np.zeros(1, dtype=np.int64)
        self.alloc_host(s, NP)
        return 0

    cdef int alloc_host(self, State* s, int NP) except -1:
        """The host side: weight caches in the kernels' layouts, scratch, the helper thread's
        jobs and their bookkeeping (none of it saved: a restore invalidates the caches)."""
        a, L = self.a, s.L
        for k in ("mx_wchk", "mx_wpver", "mx_wfver"):
            a[k] = np.full(NP, -1, dtype=np.int64)
        a["mx_wbad"] = np.zeros(NP, dtype=np.uint8)
        a["mx_wconv"] = np.zeros(NP, dtype=np.uint8)
        a["mx_wd"] = np.zeros(NP * (L // 2) * L, dtype=np.float64)
        a["mx_si"] = np.zeros(max(L, lpu_avx2_scratch_ints(L)), dtype=np.int32)
        a["mx_sd"] = np.zeros(8 * L, dtype=np.float64)
        s.mx_wpstride = packed_bytes(L)
        a["mx_wp"] = np.zeros(NP * s.mx_wpstride, dtype=np.int8)
        a["mx_wcorr"] = np.zeros(NP * 64 * lpu_vnni_blocks(L), dtype=np.int32)
        a["mx_wf"] = np.zeros(NP * (L // 2) * 64 * lpu_vnni_blocks(L), dtype=np.float32)
        a["mx_wfext"] = np.zeros(2 * NP, dtype=np.int32)
        a["mx_rseq"] = np.full(NP * NR, -1, dtype=np.int64)
        a["mx_sseq"] = np.full(NP * s.NS, -1, dtype=np.int64)
        a["mx_bjob"] = np.full(NP * s.BB, -1, dtype=np.int32)
        a["mx_bseq"] = np.zeros(NP * s.BB, dtype=np.int64)
        s.simd = default_kernel()
        s.small_rows = SMALL_ROWS
        s.jobs = malloc(sizeof(lpu_pool))
        if s.jobs == NULL or lpu_pool_init(<lpu_pool*>s.jobs, HELPER_JOBS, s.BMAX):
            raise MemoryError("cannot set up the MXM helper thread's jobs")
        s.helper = 1 if (_os.cpu_count() or 1) > 1 else 0
        return 0

    cdef int bind(self, State* s) except -1:
        a = self.a
        s.mx_slots = _p_u8(a["mx_slots"])
        s.mx_buf_slot = _p_i32(a["mx_buf_slot"])
        s.mx_row_src = _p_i32(a["mx_row_src"])
        s.mx_arr_slot = _p_i32(a["mx_arr_slot"])
        s.mx_inst_slot = _p_i32(a["mx_inst_slot"])
        s.mx_arr_dt = _p_i32(a["mx_arr_dt"])
        s.mx_ver = _p_i64(a["mx_ver"])
        s.mx_inst_T = _p_i64(a["mx_inst_T"])
        s.mx_inst_dt = _p_i32(a["mx_inst_dt"])
        s.mx_acc = _p_u32(a["mx_acc"])
        s.mx_ax = _p_f32(a["mx_ax"])
        s.mx_xb = _p_u8(a["mx_xb"])
        s.mx_xbuf = _p_i32(a["mx_xbuf"])
        s.mx_aacc = _p_i32(a["mx_aacc"])
        s.mx_aadd = _p_u8(a["mx_aadd"])
        s.mx_aland = _p_i64(a["mx_aland"])
        s.mx_an = _p_i32(a["mx_an"])
        s.mx_bres = _p_f32(a["mx_bres"])
        s.mx_bacc = _p_i32(a["mx_bacc"])
        s.mx_badd = _p_u8(a["mx_badd"])
        s.mx_bland = _p_i64(a["mx_bland"])
        s.mx_bdt = _p_i32(a["mx_bdt"])
        s.mx_bhead = _p_i32(a["mx_bhead"])
        s.mx_bn = _p_i32(a["mx_bn"])
        s.mx_busy_until = _p_i64(a["mx_busy_until"])
        s.mx_macs = _p_i64(a["mx_macs"])
        s.mx_busy = _p_i64(a["mx_busy"])
        s.mx_peak = _p_i64(a["mx_peak"])
        self.bind_host(s)
        self.views = {"ax": a["mx_ax"][:s.NP * NR * s.BMAX * s.L].reshape(s.NP, NR, s.BMAX, s.L),
                      "xb": a["mx_xb"][:s.NP * NR * (s.BMAX + 8) * s.L].reshape(s.NP, NR, s.BMAX + 8, s.L),
                      "slots": a["mx_slots"].reshape(s.NP, s.NS, s.L, s.L),
                      "bres": a["mx_bres"].reshape(s.NP, s.BB, s.L)}
        return 0

    cdef int bind_host(self, State* s) except -1:
        a = self.a
        s.mx_rseq = _p_i64(a["mx_rseq"])
        s.mx_sseq = _p_i64(a["mx_sseq"])
        s.mx_wchk = _p_i64(a["mx_wchk"])
        s.mx_wbad = _p_u8(a["mx_wbad"])
        s.mx_wconv = _p_u8(a["mx_wconv"])
        s.mx_wd = _p_f64(a["mx_wd"])
        s.mx_si = _p_i32(a["mx_si"])
        s.mx_sd = _p_f64(a["mx_sd"])
        s.mx_wp = <int8_t*>_p_u8(a["mx_wp"].view(np.uint8))
        s.mx_wcorr = _p_i32(a["mx_wcorr"])
        s.mx_wpver = _p_i64(a["mx_wpver"])
        s.mx_wf = _p_f32(a["mx_wf"])
        s.mx_wfver = _p_i64(a["mx_wfver"])
        s.mx_wfext = _p_i32(a["mx_wfext"])
        s.mx_bjob = _p_i32(a["mx_bjob"])
        s.mx_bseq = _p_i64(a["mx_bseq"])
        return 0

    cdef int restart(self, State* s, object lowered) except -1:
        a = self.a
        for k in ("mx_macs", "mx_busy", "mx_peak", "mx_busy_until", "mx_an", "mx_bn", "mx_bhead", "mx_acc",
                  "mx_xbuf", "mx_slots", "mx_buf_slot", "mx_row_src", "mx_inst_slot"):
            a[k][:] = 0
        for k in ("mx_arr_dt", "mx_bjob", "mx_rseq", "mx_sseq", "mx_arr_slot", "mx_inst_T"):
            a[k][:] = -1
        self.drop_caches()
        s.mx_cycle = -1
        s.mx_cycle_macs = 0
        return 0

    cdef int drop_caches(self) except -1:
        """Forget the weights cached in the kernels' layouts (their install versions restart)."""
        for k in ("mx_wchk", "mx_wpver", "mx_wfver"):
            self.a[k][:] = -1
        return 0

    cdef dict get_scalars(self, State* s):
        return {"mx_cycle": s.mx_cycle, "mx_cycle_macs": s.mx_cycle_macs}

    cdef int set_scalars(self, State* s, dict sc) except -1:
        s.mx_cycle, s.mx_cycle_macs = sc["mx_cycle"], sc["mx_cycle_macs"]
        return 0

    cdef int restore(self, State* s, dict sc, dict arrays) except -1:
        Unit.restore(self, s, sc, arrays)
        self.drop_caches()
        return 0

    def counters(self):
        a = self.a
        return {"mxm_macs": a["mx_macs"].copy(), "mxm_busy": a["mx_busy"].copy(),
                "mxm_peak_macs": a["mx_peak"].copy()}

    cdef int validate(self, State* s, dict sc, dict arrays, object lowered) except -1:
        # weight slots and dtypes, then batch and product-FIFO counters
        NP, NS = s.NP, s.NS
        dts = (DT_INT8, DT_FLOAT16)
        check_range("scalar mx_cycle", sc["mx_cycle"], -1, LIM)
        check_range("scalar mx_cycle_macs", sc["mx_cycle_macs"], 0, LIM)
        check_range("array 'mx_buf_slot' (weight slot)", arrays["mx_buf_slot"], 0, NS - 1)
        check_range("array 'mx_row_src' (weight slot)", arrays["mx_row_src"], 0, NS - 1)
        aslot, adt = arrays["mx_arr_slot"], arrays["mx_arr_dt"]
        check_range("array 'mx_arr_slot' (installed weight slot, -1: none)", aslot, -1, NS - 1)
        check_range("array 'mx_arr_dt' (installed dtype code, -1: none)", adt, -1, -1, also=dts)
        for p in range(NP):
            if (aslot[p] < 0) != (adt[p] < 0):
                raise _errors.SnapshotError(f"snapshot array 'mx_arr_slot'[{p}] is {aslot[p]} but 'mx_arr_dt'[{p}] "
                                            f"is {adt[p]}: both or neither must be -1")
        it = arrays["mx_inst_T"]
        check_range("array 'mx_inst_T' (install cycle, -1: free)", it, -1, LIM)
        check_range("array 'mx_inst_slot' (weight slot)", arrays["mx_inst_slot"], 0, NS - 1, where=it >= 0)
        check_range("array 'mx_inst_dt' (dtype code)", arrays["mx_inst_dt"], DT_INT8, DT_INT8, where=it >= 0,
                    also=dts)
        self.validate_batches(s, arrays)
        for k in ("mx_busy_until", "mx_ver", "mx_macs", "mx_busy", "mx_peak"):
            check_range(f"array {k!r}", arrays[k], 0, LIM)
        return 0

    cdef int validate_batches(self, State* s, dict arrays) except -1:
        """Stage A (the batch) and stage B (the product FIFO) of each plane."""
        NP, BMAX, BB = s.NP, s.BMAX, s.BB
        dts = (DT_INT8, DT_FLOAT16)
        adt = arrays["mx_arr_dt"]
        an, bn, bh = arrays["mx_an"], arrays["mx_bn"], arrays["mx_bhead"]
        check_range(f"array 'mx_an' (batch rows, the batch holds {BMAX})", an, 0, BMAX)
        check_range(f"array 'mx_bn' (products waiting, the FIFO holds {BB})", bn, 0, BB)
        check_range("array 'mx_bhead' (FIFO head)", bh, 0, BB - 1)
        check_range("array 'mx_xbuf' (staging buffer)", arrays["mx_xbuf"], 0, NR - 1)
        arows = np.arange(BMAX)[None, :] < an[:, None]
        check_range("array 'mx_aacc' (accumulator)", arrays["mx_aacc"].reshape(NP, BMAX), 0, s.NACC - 1,
                    where=arows)
        check_range("array 'mx_aadd'", arrays["mx_aadd"].reshape(NP, BMAX), 0, 1, where=arows)
        check_range("array 'mx_aland' (landing cycle)", arrays["mx_aland"].reshape(NP, BMAX), 0, LIM, where=arows)
        for p in range(NP):
            if an[p] and adt[p] < 0:
                raise _errors.SnapshotError(f"snapshot array 'mx_an'[{p}] is {an[p]} but plane {p} has no "
                                            f"weights installed")
        brows = ((np.arange(BB)[None, :] - bh[:, None]) % BB) < bn[:, None]
        check_range("array 'mx_bacc' (accumulator)", arrays["mx_bacc"].reshape(NP, BB), 0, s.NACC - 1, where=brows)
        check_range("array 'mx_badd'", arrays["mx_badd"].reshape(NP, BB), 0, 1, where=brows)
        check_range("array 'mx_bland' (landing cycle)", arrays["mx_bland"].reshape(NP, BB), 0, LIM, where=brows)
        check_range("array 'mx_bdt' (dtype code)", arrays["mx_bdt"].reshape(NP, BB), DT_INT8, DT_INT8, where=brows,
                    also=dts)
        return 0
