/* The optional native accelerator of the A3 data path (emu/a3/native.py).
 *
 * Five loops that the Python phases otherwise spell as many numpy/torch operations: packing
 * rows and their metadata into a wire buffer, dispatch's receive layout, dispatch's dynamic
 * int8 quantisation, combine's fp32 weighted sum (for bf16 also rounded straight into x_out)
 * and combine's bf16 TP reduce (also fused with the packing of its rows).  Each does
 * exactly what its Python twin does, element for element (the tests run both and compare
 * bytes): copies move bytes, and the arithmetic is the same IEEE fp32 operations in the same
 * order, each rounded on its own (built with -ffp-contract=off, so no fused multiply-add, and
 * without -ffast-math).
 *
 * A wire buffer holds rows of `width` bytes; peer p's segment starts at row start[p]: its
 * n[p] payload rows, then its n[p] int32 metadata words (token << 15 | slot << 10 | local);
 * or, for bare rows, the words come apart (`meta`, every peer's in order) and the segments
 * have no tails.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static int32_t meta_word(int64_t t, int64_t k, int64_t l) {
    return (int32_t)((t << 15) | (k << 10) | l);          /* wraps as numpy's astype(int32) */
}

/* Peer p's metadata words: its segment's tail, or (meta given) from word `done` of meta, where
 * `done` is the payload rows of the peers before p. */
static const int32_t *meta_of(const uint8_t *buf, int64_t width, const int64_t *start, const int64_t *n,
                              const int32_t *meta, int64_t p, int64_t done) {
    return meta ? meta + done : (const int32_t *)(buf + (start[p] + n[p]) * width);
}

static float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* fp32 -> bf16, nearest with ties to even (torch's rounding of a number); *nan is set when s
 * is a NaN, whose bits torch's conversion picks by code path. */
static uint16_t f32_to_bf16(float s, uint32_t *nan) {
    uint32_t u;
    memcpy(&u, &s, 4);
    *nan |= (u & 0x7FFFFFFFu) > 0x7F800000u;
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Rows in peer order: payload row i of the buffer <- src row index[i] (row_bytes), then,
 * when extra is given, its 4-byte word extra[index[i]]; metadata word i <- (token[i],
 * slot[i], local[i]).  Returns 0, or -1 when the rows do not fit the segments. */
int mc2_pack_rows(uint8_t *buf, int64_t width, const int64_t *start, const int64_t *n, int64_t peers,
                  const uint8_t *src, int64_t row_bytes, const int64_t *index, const uint8_t *extra,
                  const int64_t *token, const int64_t *slot, const int64_t *local) {
    if (row_bytes + (extra ? 4 : 0) > width || width % 4)
        return -1;
    int64_t i = 0;
    for (int64_t p = 0; p < peers; p++) {
        uint8_t *rows = buf + start[p] * width;
        int32_t *words = (int32_t *)(buf + (start[p] + n[p]) * width);
        for (int64_t j = 0; j < n[p]; j++, i++) {
            memcpy(rows + j * width, src + index[i] * row_bytes, (size_t)row_bytes);
            if (extra)
                memcpy(rows + j * width + row_bytes, extra + 4 * index[i], 4);
            words[j] = meta_word(token[i], slot[i], local[i]);
        }
    }
    return 0;
}

/* Combine's TP reduce fused with its rows' packing (tp 2, bf16): payload row i of the buffer
 * (peers in order, as mc2_pack_rows) <- bf16(fp32(a[index[i]]) + fp32(b[index[i]])), h values,
 * rows of a and b lda and ldb values apart (mc2_tp_add_bf16's sum, never stored on its own);
 * metadata word i <- (token[i], slot[i], local[i]).  Returns 0, -1 when the rows do not fit the
 * segments, or -2 when a sum is a NaN (the buffer is then partly written). */
int mc2_pack_tp_add_bf16(uint8_t *buf, int64_t width, const int64_t *start, const int64_t *n, int64_t peers,
                         const uint16_t *a, int64_t lda, const uint16_t *b, int64_t ldb, int64_t h,
                         const int64_t *index, const int64_t *token, const int64_t *slot, const int64_t *local) {
    if (2 * h > width || width % 4)
        return -1;
    uint32_t nan = 0;
    int64_t i = 0;
    for (int64_t p = 0; p < peers; p++) {
        uint8_t *rows = buf + start[p] * width;
        int32_t *words = (int32_t *)(buf + (start[p] + n[p]) * width);
        for (int64_t j = 0; j < n[p]; j++, i++) {
            uint16_t *o = (uint16_t *)(rows + j * width);
            const uint16_t *ar = a + index[i] * lda, *br = b + index[i] * ldb;
            for (int64_t e = 0; e < h; e++)
                o[e] = f32_to_bf16(bf16_to_f32(ar[e]) + bf16_to_f32(br[e]), &nan);
            words[j] = meta_word(token[i], slot[i], local[i]);
        }
    }
    return nan ? -2 : 0;
}

/* Dispatch's receive layout: blocks local-expert major, source minor; within a block the
 * rows in the order received.  Source group rank p is logical source logical[p] (W sources
 * in all; `blocks` = W * local experts).  Writes out_x rows (payload bytes each; with
 * out_scale, the 4 bytes after the payload go there), assist (3 int32 per row: source,
 * token, slot) and ep_recv (blocks int32, the inclusive running count).  Returns the rows
 * laid out, or -1 (nothing written) when a metadata word names a block outside `blocks` or
 * the rows exceed `capacity`. */
int64_t mc2_dispatch_layout(const uint8_t *buf, int64_t width, const int64_t *start, const int64_t *n,
                            const int32_t *meta, int64_t peers, const int64_t *logical, int64_t W, int64_t blocks,
                            int64_t payload, int64_t capacity, uint8_t *out_x, float *out_scale, int32_t *assist,
                            int32_t *ep_recv) {
    int64_t *at = calloc((size_t)blocks + 1, sizeof(int64_t));
    if (!at)
        return -1;
    int64_t total = 0;
    for (int64_t p = 0, m = 0; p < peers; m += n[p], p++) {
        const int32_t *words = meta_of(buf, width, start, n, meta, p, m);
        for (int64_t j = 0; j < n[p]; j++) {
            int64_t b = (int64_t)(words[j] & 1023) * W + logical[p];
            if (words[j] < 0 || b >= blocks) {
                free(at);
                return -1;
            }
            at[b + 1]++;
        }
        total += n[p];
    }
    if (total > capacity) {
        free(at);
        return -1;
    }
    for (int64_t b = 0; b < blocks; b++) {
        at[b + 1] += at[b];
        ep_recv[b] = (int32_t)at[b + 1];
    }
    for (int64_t p = 0, done = 0; p < peers; done += n[p], p++) {
        const uint8_t *rows = buf + start[p] * width;
        const int32_t *words = meta_of(buf, width, start, n, meta, p, done);
        for (int64_t j = 0; j < n[p]; j++) {
            int32_t m = words[j];
            int64_t r = at[(int64_t)(m & 1023) * W + logical[p]]++;
            memcpy(out_x + r * payload, rows + j * width, (size_t)payload);
            if (out_scale)
                memcpy(out_scale + r, rows + j * width + payload, 4);
            assist[3 * r] = (int32_t)logical[p];
            assist[3 * r + 1] = m >> 15;
            assist[3 * r + 2] = (m >> 10) & 31;
        }
    }
    free(at);
    return total;
}

static float f16_to_f32(uint16_t v) {
    uint32_t sign = (uint32_t)(v & 0x8000) << 16, exp = (v >> 10) & 31, man = v & 1023, u;
    if (exp == 31)
        u = sign | 0x7F800000u | (man << 13);
    else if (exp)
        u = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man)
        u = sign;
    else {                                                  /* subnormal: normalise */
        exp = 113;
        while (!(man & 1024)) {
            man <<= 1;
            exp--;
        }
        u = sign | (exp << 23) | ((man & 1023) << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* Dispatch's dynamic int8 quantisation (numerics.dynamic_quant) of n rows: row i is
 * fp32(x[token[i]]) (XT: bf16 when fp16 == 0, else fp16), times smooth[srow[i]] (fp32, one
 * rounded multiply) when smooth is given; amax = max |row|, d = 127 / amax, q = the row times d
 * rounded half to even, scale = 1 / d (an all-zero row: q = 0, scale = 0).  Returns 0, or -1
 * when a row holds a value that is not finite (the Python code then does what torch does). */
int mc2_dynamic_quant(const uint16_t *x, int64_t h, int fp16, const int64_t *token, const float *smooth,
                      const int64_t *srow, int64_t n, int8_t *q, float *scale) {
    float *row = malloc((size_t)(h ? h : 1) * sizeof(float));
    if (!row)
        return -1;
    for (int64_t i = 0; i < n; i++) {
        const uint16_t *xi = x + token[i] * h;
        const float *s = smooth ? smooth + srow[i] * h : NULL;
        if (fp16)
            for (int64_t e = 0; e < h; e++)
                row[e] = f16_to_f32(xi[e]);
        else
            for (int64_t e = 0; e < h; e++)
                row[e] = bf16_to_f32(xi[e]);
        if (s)
            for (int64_t e = 0; e < h; e++)
                row[e] = row[e] * s[e];
        int32_t most = 0;                     /* max |row| on the bits: |v| orders as its bits do */
        for (int64_t e = 0; e < h; e++) {
            int32_t b;
            memcpy(&b, row + e, 4);
            b &= 0x7FFFFFFF;
            most = b > most ? b : most;
        }
        if (most >= 0x7F800000) {             /* an infinity or a NaN */
            free(row);
            return -1;
        }
        float amax;
        memcpy(&amax, &most, 4);
        int8_t *qi = q + i * h;
        if (amax == 0.0f) {
            memset(qi, 0, (size_t)h);
            scale[i] = 0.0f;
            continue;
        }
        float d = 127.0f / amax;
        for (int64_t e = 0; e < h; e++) {
            float r = row[e] * d;                         /* |r| <= 127: exact below 2^22 */
            r = (r + 12582912.0f) - 12582912.0f;          /* round half to even (1.5 * 2^23) */
            qi[e] = (int8_t)(int32_t)r;
        }
        scale[i] = 1.0f / d;
    }
    free(row);
    return 0;
}

/* The received rows of combine in the order the weighted sum takes them: token by token, a
 * token's entries in slot order (entries of one slot in the order received), from each payload
 * row's metadata word (token t, slot k).  row[i] is entry i's row, key[i] its t * slots + k, and
 * first[t] .. first[t + 1] a token's entries (first has bs + 1 items).  Returns the entries, or
 * -1 (nothing allocated) when a word names a token outside [0, bs) or a slot outside [0, slots)
 * or memory runs out. */
static int64_t entries(const uint8_t *buf, int64_t width, const int64_t *start, const int64_t *n, const int32_t *meta,
                       int64_t peers, int64_t bs, int64_t slots, const uint8_t ***row_out, int64_t **key_out,
                       int64_t **first_out) {
    int64_t total = 0, keys = bs * slots;
    for (int64_t p = 0; p < peers; p++)
        total += n[p];
    int64_t *at = calloc((size_t)keys + 1, sizeof(int64_t));
    int64_t *first = malloc((size_t)(bs + 1) * sizeof(int64_t));
    const uint8_t **row = malloc((size_t)(total ? total : 1) * sizeof(*row));
    int64_t *key = malloc((size_t)(total ? total : 1) * sizeof(int64_t));
    int ok = at && first && row && key;
    for (int64_t p = 0, m = 0; ok && p < peers; m += n[p], p++) {
        const int32_t *words = meta_of(buf, width, start, n, meta, p, m);
        for (int64_t j = 0; j < n[p]; j++) {
            int32_t t = words[j] >> 15, k = (words[j] >> 10) & 31;
            if (t < 0 || t >= bs || k >= slots) {
                ok = 0;
                break;
            }
            at[t * slots + k + 1]++;
        }
    }
    if (!ok) {
        free(at);
        free(first);
        free(row);
        free(key);
        return -1;
    }
    for (int64_t b = 0; b < keys; b++)
        at[b + 1] += at[b];
    for (int64_t t = 0; t <= bs; t++)
        first[t] = at[t * slots];
    for (int64_t p = 0, m = 0; p < peers; m += n[p], p++) {
        const uint8_t *rows = buf + start[p] * width;
        const int32_t *words = meta_of(buf, width, start, n, meta, p, m);
        for (int64_t j = 0; j < n[p]; j++) {
            int64_t b = (int64_t)(words[j] >> 15) * slots + ((words[j] >> 10) & 31);
            int64_t i = at[b]++;
            row[i] = rows + j * width;
            key[i] = b;
        }
    }
    free(at);
    *row_out = row;
    *key_out = key;
    *first_out = first;
    return total;
}

/* Entries first .. last of one token into its fp32 row a: a[e] = a[e] + fp32(x[e]) * weight
 * (w[t, k] for k < K, 1 for a shared slot k >= K), every multiply and add rounded to fp32. */
static void add_entries(float *a, const uint8_t **row, const int64_t *key, int64_t first, int64_t last, int fp16,
                        int64_t h, int64_t K, int64_t slots, const float *w) {
    for (int64_t i = first; i < last; i++) {
        int64_t t = key[i] / slots, k = key[i] % slots;
        float wt = k < K ? w[t * K + k] : 1.0f;
        const uint16_t *x = (const uint16_t *)row[i];
        if (fp16)
            for (int64_t e = 0; e < h; e++)
                a[e] = a[e] + f16_to_f32(x[e]) * wt;
        else
            for (int64_t e = 0; e < h; e++)
                a[e] = a[e] + bf16_to_f32(x[e]) * wt;
    }
}

/* Combine's fp32 weighted sum of the received rows (XT: bf16 when fp16 == 0, else fp16) into
 * acc (bs x h): each token's entries (see entries()) added to acc[t] in order, so every
 * element gets the adds the slot-major Python sum gives it.  Returns 0, or -1 (acc untouched)
 * when a word names a token outside [0, bs) or a slot outside [0, slots). */
int mc2_combine_sum(const uint8_t *buf, int64_t width, const int64_t *start, const int64_t *n, const int32_t *meta,
                    int64_t peers, int fp16, int64_t h, int64_t bs, int64_t K, int64_t slots, const float *w, float *acc) {
    const uint8_t **row;
    int64_t *key, *first;
    if (entries(buf, width, start, n, meta, peers, bs, slots, &row, &key, &first) < 0)
        return -1;
    for (int64_t t = 0; t < bs; t++)
        add_entries(acc + t * h, row, key, first[t], first[t + 1], fp16, h, K, slots, w);
    free(row);
    free(key);
    free(first);
    return 0;
}

/* Combine's x_out for bf16 rows, straight from the received rows: a token's fp32 sum (as
 * mc2_combine_sum gives it, from 0) plus fp32(shared[t]) when shared (bs x h bf16) is given,
 * rounded to bf16 (nearest, ties to even) into out (bs x h); a token with active[t] == 0
 * (active given) is 0.  The sum of a token lives in one fp32 row, so nothing of bs x h fp32 is
 * written.  Returns 0; -1 (out untouched) for a word out of range, as mc2_combine_sum; -2 when a
 * rounded value is a NaN (whose bits torch's conversion picks by code path). */
int mc2_combine_out_bf16(const uint8_t *buf, int64_t width, const int64_t *start, const int64_t *n,
                         const int32_t *meta, int64_t peers, int64_t h, int64_t bs, int64_t K, int64_t slots, const float *w, const uint16_t *shared,
                         const uint8_t *active, uint16_t *out) {
    const uint8_t **row;
    int64_t *key, *first;
    float *a = malloc((size_t)(h ? h : 1) * sizeof(float));
    if (!a || entries(buf, width, start, n, meta, peers, bs, slots, &row, &key, &first) < 0) {
        free(a);
        return -1;
    }
    uint32_t nan = 0;
    for (int64_t t = 0; t < bs; t++) {
        uint16_t *o = out + t * h;
        if (active && !active[t]) {
            memset(o, 0, (size_t)h * 2);
            continue;
        }
        memset(a, 0, (size_t)h * sizeof(float));
        add_entries(a, row, key, first[t], first[t + 1], 0, h, K, slots, w);
        if (shared)
            for (int64_t e = 0; e < h; e++)
                a[e] = a[e] + bf16_to_f32(shared[t * h + e]);
        for (int64_t e = 0; e < h; e++)
            o[e] = f32_to_bf16(a[e], &nan);
    }
    free(a);
    free(row);
    free(key);
    free(first);
    return nan ? -2 : 0;
}

/* Combine's TP reduce for bf16 (numerics.tp_add) of rows x h values (row strides lda, ldb in
 * values; out contiguous): out = bf16(fp32(a) + fp32(b)), the fp32 sum rounded to nearest
 * even.  Returns 0, or -1 when a sum is a NaN (whose bits torch's conversion picks by code
 * path; the Python code then does what torch does). */
int mc2_tp_add_bf16(const uint16_t *a, int64_t lda, const uint16_t *b, int64_t ldb, int64_t rows, int64_t h,
                    uint16_t *out) {
    uint32_t nan = 0;
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *ar = a + r * lda, *br = b + r * ldb;
        uint16_t *o = out + r * h;
        for (int64_t i = 0; i < h; i++) {
            o[i] = f32_to_bf16(bf16_to_f32(ar[i]) + bf16_to_f32(br[i]), &nan);
        }
    }
    return nan ? -1 : 0;
}
