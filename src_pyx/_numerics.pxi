# The VXM's numerics: the float helpers are plain C (lpu_numerics.h) so that no
# double-precision literal or promotion can slip into a float32 sequence.

from libc.math cimport sqrtf, fabsf

cdef extern from "lpu_numerics.h" nogil:
    float lpu_f32(uint32_t b)
    uint32_t lpu_bits(float f)
    uint32_t lpu_f32_out(float f)
    float lpu_h2f(uint32_t h)
    uint32_t lpu_f2h(float f)
    float lpu_exp(float x)
    float lpu_tanh(float x)
    float lpu_sigmoid(float x)
    float lpu_relu(float x)
    float lpu_fmin(float a, float b)
    float lpu_fmax(float a, float b)
    float lpu_recip(float x)
    float lpu_rsqrt(float x)
    float lpu_div(float a, float b)
    int64_t lpu_f2i(float x, int bits)
    int64_t lpu_requant(int64_t a, int64_t mult, int shift, int64_t zp)


cdef inline int dt_bytes(int dtc) noexcept nogil:
    if dtc == DT_INT8:
        return 1
    if dtc == DT_INT16 or dtc == DT_FLOAT16:
        return 2
    return 4


cdef inline int dt_float(int dtc) noexcept nogil:
    return dtc == DT_FLOAT16 or dtc == DT_FLOAT32


cdef inline uint32_t dt_mask(int dtc) noexcept nogil:
    cdef int n = dt_bytes(dtc)
    if n == 4:
        return 0xFFFFFFFFu
    return (1u << (8 * n)) - 1u


# binary16 bits -> float32 for every value (lpu_h2f's results, filled at import): a
# table lookup is several times cheaper than decoding each value
cdef float _H2F[65536]

cdef void fill_h2f() noexcept nogil:
    cdef int i
    for i in range(65536):
        _H2F[i] = lpu_h2f(<uint32_t>i)


cdef extern from "lpu_kernels.h" nogil:
    # branch-free, vectorised lpu_h2f / lpu_f2h / lpu_f32_out over n lanes (same bits)
    void lpu_h2f_n(int n, const uint32_t* src, uint32_t* dst)
    void lpu_f2h_n(int n, const uint32_t* src, uint32_t* dst)
    void lpu_f32_out_n(int n, const uint32_t* src, uint32_t* dst)


cdef inline void load_f(int L, uint32_t* src, float* dst, int dtc) noexcept nogil:
    """Lanes' raw bits (binary16 in the low half, or binary32) as floats."""
    if dtc == DT_FLOAT16:
        lpu_h2f_n(L, src, <uint32_t*>dst)      # the low 16 bits of each lane
    else:
        memcpy(dst, src, L * sizeof(float))


cdef inline void store_f(int L, float* src, uint32_t* dst, int dtc) noexcept nogil:
    if dtc == DT_FLOAT16:
        lpu_f2h_n(L, <uint32_t*>src, dst)
    else:
        lpu_f32_out_n(L, <uint32_t*>src, dst)


cdef inline void load_i(int L, uint32_t* src, int64_t* dst, int dtc) noexcept nogil:
    cdef int ln
    cdef int n = dt_bytes(dtc)
    if n == 4:
        for ln in range(L):
            dst[ln] = <int32_t>src[ln]
    elif n == 2:
        for ln in range(L):
            dst[ln] = <int16_t>src[ln]
    else:
        for ln in range(L):
            dst[ln] = <int8_t>src[ln]


cdef inline void store_i(int L, int64_t* src, uint32_t* dst, int dtc) noexcept nogil:
    cdef int ln
    cdef uint32_t m = dt_mask(dtc)
    for ln in range(L):
        dst[ln] = (<uint32_t>(<uint64_t>src[ln])) & m
