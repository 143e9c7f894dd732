/* CT pack-quantized codes -> ggml blocks (spec/gguf.md §1-§2, §2.1): the same bytes as the numpy
 * codec in ggml.py, which stays the reference. Plain C ABI, called through ctypes on numpy buffers
 * (no Python C-API, so one build serves every interpreter). Built at first use by native.py.
 *
 * A block's 32 codes u are 4b bytes of CT's dense bit stream (code i at bits b*i, little-endian
 * across the int32 words; for 1, 2, 4 and 8 bits the padded layout is the same bytes). Each is
 * spread to one byte, the block's add (type offset - z_u, mod 256; 0 for Q4_1) is added, and the
 * bytes are stored as the type lays them out: qs byte j = element j | element j + 16 << 4 (Q4_x,
 * Q5_0 with bit 4 of element j in bit j of qh), or the 32 bytes themselves (Q8_0).
 *
 * SSE2 (x86-64's baseline) when available; -DCTF_SCALAR builds the portable 64-bit lane code. */
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "CT words and ggml blocks are little-endian; this codec reads and writes them as host words"
#endif

#if defined(__SSE2__) && !defined(CTF_SCALAR)
#include <emmintrin.h>
#define CTF_SSE2 1
#else
#define CTF_SSE2 0
#endif

#define INLINE static inline __attribute__((always_inline))

enum { CTF_Q4_0 = 0, CTF_Q4_1 = 1, CTF_Q5_0 = 2, CTF_Q8_0 = 3 };

/* 2: SSE2, 1: portable lanes (tests check that both builds were made). */
int ctf_variant(void) { return CTF_SSE2 ? 2 : 1; }

INLINE int type_size(const int T) { return T == CTF_Q4_0 ? 18 : T == CTF_Q4_1 ? 20 : T == CTF_Q5_0 ? 22 : 34; }

/* Three mask-and-shift rounds spreading 8 fields of B bits (at bits B*i of a 64-bit lane) to bytes
 * (bits 8i): halves of 4, 2, 1 fields, the upper half of each moved up by g*(8-B). */
typedef struct { uint64_t keep[3], move[3]; } spread_t;

INLINE spread_t spread_masks(const int B) {
    spread_t s;
    int pos[8];
    for (int i = 0; i < 8; i++) pos[i] = B * i;
    for (int r = 0, g = 4; g >= 1; g /= 2, r++) {
        uint64_t keep = 0, move = 0;
        for (int i = 0; i < 8; i++) {
            uint64_t mask = ((1ull << B) - 1) << pos[i];
            if ((i / g) % 2) { move |= mask; pos[i] += g * (8 - B); } else keep |= mask;
        }
        s.keep[r] = keep;
        s.move[r] = move;
    }
    return s;
}

INLINE uint64_t load64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

/* Group k (elements 8k..8k+7: B bytes at k*B) of a block of 4B bytes, zero-extended. Whole-word
 * loads inside the block (a byte-wise copy into a stack word stalls on store forwarding). */
INLINE uint64_t group_bytes(const uint8_t *p, const int B, const int k) {
    if (B == 8) return load64(p + 8 * k);
    if (B == 1) {
        uint32_t w;
        memcpy(&w, p, 4);
        return (w >> (8 * k)) & 0xFF;
    }
    const uint64_t mask = (1ull << (8 * B)) - 1;
    const int off = k * B;
    if (off + 8 <= 4 * B) return load64(p + off) & mask;
    return (load64(p + 4 * B - 8) >> (8 * (off + 8 - 4 * B))) & mask;
}

/* The three spreading rounds on one lane. */
INLINE uint64_t spread64(uint64_t x, const int B, const spread_t *s) {
    x = (x & s->keep[0]) | ((x & s->move[0]) << (4 * (8 - B)));
    x = (x & s->keep[1]) | ((x & s->move[1]) << (2 * (8 - B)));
    return (x & s->keep[2]) | ((x & s->move[2]) << (8 - B));
}

#if CTF_SSE2
/* Elements 0-15 (e[0]) and 16-31 (e[1]) of one block, one code a byte. */
INLINE void codes_sse2(const uint8_t *p, const int B, const spread_t *s, __m128i e[2]) {
    if (B == 8) {
        e[0] = _mm_loadu_si128((const __m128i *)p);
        e[1] = _mm_loadu_si128((const __m128i *)(p + 16));
    } else if (B == 4) {           /* byte c: elements 2c (low nibble), 2c + 1 */
        const __m128i l4 = _mm_set1_epi8(0x0F);
        __m128i x = _mm_loadu_si128((const __m128i *)p);
        __m128i lo = _mm_and_si128(x, l4), hi = _mm_and_si128(_mm_srli_epi16(x, 4), l4);
        e[0] = _mm_unpacklo_epi8(lo, hi);
        e[1] = _mm_unpackhi_epi8(lo, hi);
    } else {                       /* 8 fields of B bits = B bytes, two groups a register */
        e[0] = _mm_set_epi64x((long long)group_bytes(p, B, 1), (long long)group_bytes(p, B, 0));
        e[1] = _mm_set_epi64x((long long)group_bytes(p, B, 3), (long long)group_bytes(p, B, 2));
#define CTF_ROUND(r, shift)                                                                         \
        for (int h = 0; h < 2; h++)                                                                 \
            e[h] = _mm_or_si128(_mm_and_si128(e[h], _mm_set1_epi64x((long long)s->keep[r])),          \
                                _mm_slli_epi64(_mm_and_si128(e[h], _mm_set1_epi64x((long long)s->move[r])), shift));
        CTF_ROUND(0, 4 * (8 - B)) CTF_ROUND(1, 2 * (8 - B)) CTF_ROUND(2, 8 - B)
#undef CTF_ROUND
    }
}

INLINE void block_sse2(const uint8_t *p, uint8_t *o, const int B, const int T, const spread_t *s,
                       uint16_t d, uint16_t m, uint8_t add) {
    __m128i e[2];
    codes_sse2(p, B, s, e);
    if (add) {
        __m128i a = _mm_set1_epi8((char)add);
        e[0] = _mm_add_epi8(e[0], a);
        e[1] = _mm_add_epi8(e[1], a);
    }
    memcpy(o, &d, 2);
    if (T == CTF_Q8_0) {
        _mm_storeu_si128((__m128i *)(o + 2), e[0]);
        _mm_storeu_si128((__m128i *)(o + 18), e[1]);
    } else if (T == CTF_Q5_0) {    /* bit 4 of each code -> bit 7 of its byte (codes < 32: no spill) */
        const __m128i l4 = _mm_set1_epi8(0x0F);
        uint32_t qh = (uint32_t)_mm_movemask_epi8(_mm_slli_epi16(e[0], 3))
                      | (uint32_t)_mm_movemask_epi8(_mm_slli_epi16(e[1], 3)) << 16;
        __m128i qs = _mm_or_si128(_mm_and_si128(e[0], l4), _mm_slli_epi16(_mm_and_si128(e[1], l4), 4));
        memcpy(o + 2, &qh, 4);
        _mm_storeu_si128((__m128i *)(o + 6), qs);
    } else {                       /* Q4_0, Q4_1: codes < 16, so the 16-bit shift keeps to its byte */
        __m128i qs = _mm_or_si128(e[0], _mm_slli_epi16(e[1], 4));
        if (T == CTF_Q4_1) memcpy(o + 2, &m, 2);
        _mm_storeu_si128((__m128i *)(o + (T == CTF_Q4_1 ? 4 : 2)), qs);
    }
}
#endif

#define L4 0x0F0F0F0F0F0F0F0Full
#define H1 0x8080808080808080ull
#define L7 0x7F7F7F7F7F7F7F7Full

INLINE uint64_t add_bytes(uint64_t x, uint64_t a) {     /* bytewise x + a mod 256, no carries between bytes */
    return ((x & L7) + (a & L7)) ^ ((x ^ a) & H1);
}

INLINE uint64_t gather_bit4(uint64_t x) {               /* bit 4 of byte i -> bit i */
    return (((x >> 4) & 0x0101010101010101ull) * 0x0102040810204080ull) >> 56;
}

INLINE void block_scalar(const uint8_t *p, uint8_t *o, const int B, const int T, const spread_t *s,
                         uint16_t d, uint16_t m, uint8_t add) {
    uint64_t e[4];                 /* elements 0-7, 8-15, 16-23, 24-31, one code a byte */
    e[0] = group_bytes(p, B, 0);
    e[1] = group_bytes(p, B, 1);
    e[2] = group_bytes(p, B, 2);
    e[3] = group_bytes(p, B, 3);
    for (int k = 0; k < 4; k++) {
        uint64_t x = B < 8 ? spread64(e[k], B, s) : e[k];
        e[k] = add ? add_bytes(x, add * 0x0101010101010101ull) : x;
    }
    memcpy(o, &d, 2);
    if (T == CTF_Q8_0) {
        memcpy(o + 2, e, 32);
        return;
    }
    uint64_t qs[2];
    if (T == CTF_Q5_0) {
        uint32_t qh = (uint32_t)(gather_bit4(e[0]) | gather_bit4(e[1]) << 8 | gather_bit4(e[2]) << 16
                                 | gather_bit4(e[3]) << 24);
        qs[0] = (e[0] & L4) | (e[2] & L4) << 4;
        qs[1] = (e[1] & L4) | (e[3] & L4) << 4;
        memcpy(o + 2, &qh, 4);
        memcpy(o + 6, qs, 16);
        return;
    }
    qs[0] = e[0] | e[2] << 4;      /* codes < 16 */
    qs[1] = e[1] | e[3] << 4;
    if (T == CTF_Q4_1) memcpy(o + 2, &m, 2);
    memcpy(o + (T == CTF_Q4_1 ? 4 : 2), qs, 16);
}

/* Blocks [first, first + n): block k takes d[k / per] (and m, and adds[k / per], or adds[0] when
 * one_add), walked scale group by scale group (one division a call, none a block). */
INLINE void encode_t(const int B, const int T, const uint8_t *codes, uint8_t *out, int64_t first, int64_t n,
                     const uint16_t *d, const uint16_t *m, const uint8_t *adds, int one_add, int64_t per) {
    const spread_t s = spread_masks(B);
    const int ts = type_size(T);
    int64_t end = first + n;
    for (int64_t k = first, g = first / per; k < end; g++) {
        int64_t stop = (g + 1) * per < end ? (g + 1) * per : end;
        uint16_t dv = d[g], mv = T == CTF_Q4_1 ? m[g] : 0;
        uint8_t a = adds[one_add ? 0 : g];
        const uint8_t *p = codes + k * 4 * B;
        uint8_t *o = out + k * ts;
        for (; k < stop; k++, p += 4 * B, o += ts) {
#if CTF_SSE2
            block_sse2(p, o, B, T, &s, dv, mv, a);
#else
            block_scalar(p, o, B, T, &s, dv, mv, a);
#endif
        }
    }
}

/* codes: the module's packed bytes (4b a block); out: its blocks. Returns 0, or -1 for a
 * (bits, type) pair the codec does not map (the caller takes the numpy path). */
int ctf_encode(const uint8_t *codes, uint8_t *out, int64_t first, int64_t n, int bits, int type,
               const uint16_t *d, const uint16_t *m, const uint8_t *adds, int one_add, int64_t per) {
#define CTF_CASE(B, T) \
    case (B) * 4 + (T): encode_t(B, T, codes, out, first, n, d, m, adds, one_add, per); return 0;
    if (per < 1 || n < 0) return -1;
    switch (bits * 4 + type) {
        CTF_CASE(1, CTF_Q4_0) CTF_CASE(2, CTF_Q4_0) CTF_CASE(3, CTF_Q4_0) CTF_CASE(4, CTF_Q4_0)
        CTF_CASE(4, CTF_Q4_1) CTF_CASE(4, CTF_Q5_0) CTF_CASE(5, CTF_Q5_0)
        CTF_CASE(5, CTF_Q8_0) CTF_CASE(6, CTF_Q8_0) CTF_CASE(7, CTF_Q8_0) CTF_CASE(8, CTF_Q8_0)
    default: return -1;
    }
#undef CTF_CASE
}
