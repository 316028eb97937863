"""Compiled hot paths of the CPU side: top-k search and partial attention for all heads of a layer.

Every kernel is multi-head: `q` is (H, d); keys are (G, cap, d) with head h reading key group
h // (H // G) (GQA); graphs are (A, cap, R) with head h walking graph h // (H // A), so one graph per
KV head (A = G) and one per query head (A = H) share the same code. All of them release the GIL
and parallelise over heads, so one call serves one layer. Scratch arrays come from the caller:
nothing is allocated per decode step.
"""
import os

import numpy as np
from numba import carray, get_thread_id, njit, prange, types
from llvmlite import ir
from numba.core.caching import IndexDataCacheFile
from numba.extending import intrinsic, overload

try:
    import fcntl
except ImportError:  # not POSIX: numba's own unlocked writes
    fcntl = None


def _under_lock(method, mode):
    """numba adds a compiled signature to a function's on-disk cache by reading its index, taking the first
    free data file name and writing the index, then the data, with no lock. Two processes that compile two
    signatures of one function at once (servers started together, the test workers, a parallel warm-up)
    can then take the same data file, and a load between the two writes can read a stale file under a new
    key: either way one signature runs another's code. A lock file per index makes saves exclusive and
    loads shared; compiling still runs in parallel."""

    def locked(self, *args):
        try:  # read-only: flock needs no write access, so another user's lock file does too
            fd = os.open(self._index_path + ".lock", os.O_RDONLY | os.O_CREAT, 0o666)
        except OSError:  # no cache directory yet, or one we cannot create files in: numba's own behaviour
            return method(self, *args)
        try:
            fcntl.flock(fd, mode)
            return method(self, *args)
        finally:
            os.close(fd)

    locked.unlocked = method
    return locked


if fcntl is not None and not hasattr(IndexDataCacheFile.save, "unlocked"):  # once, even if re-imported
    IndexDataCacheFile.save = _under_lock(IndexDataCacheFile.save, fcntl.LOCK_EX)
    IndexDataCacheFile.load = _under_lock(IndexDataCacheFile.load, fcntl.LOCK_SH)

NEG_INF = np.float32(-np.inf)
STAMP_MAX = 2**31 - 2
STAMP_STRIDE = 32  # batch_attend: thread t's visit stamp is stamps[t * STAMP_STRIDE], on a cache line of its own
ENTRY_SPACING = 64  # add_nodes: a free entry slot takes every this many-th inserted key


def _pointer_cast(nbtype):
    """An intrinsic that reads an int64 address as a pointer to `nbtype`: batch_attend reaches each
    request's arrays through a table of addresses, since their shapes differ between requests."""

    @intrinsic
    def cast(typingctx, addr):
        sig = types.CPointer(nbtype)(types.int64)

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], context.get_value_type(types.CPointer(nbtype)))

        return sig, codegen

    return cast


_f32p, _i32p, _i64p, _u8p = (_pointer_cast(t) for t in (types.float32, types.int32, types.int64, types.uint8))


@intrinsic
def _ptr_like(typingctx, addr, like):
    """An int64 address as a pointer to the dtype of the array `like`."""
    sig = types.CPointer(like.dtype)(types.int64, like)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], context.get_value_type(types.CPointer(signature.args[1].dtype)))

    return sig, codegen


@njit(nogil=True, cache=True)  # not inlined: inside a prange body, numba loses its write to `stamps`
def _bump(visited_row, stamps, r):
    """The next visit stamp of scratch row r (its keys count as visited where visited_row == stamp)."""
    st = stamps[r] + 1
    if st >= STAMP_MAX:
        visited_row[:] = 0
        st = 1
    stamps[r] = st
    return st


@intrinsic
def _prefetch(typingctx, addr):
    """Ask the CPU to load the cache line at `addr` (llvm.prefetch: read, keep in all cache levels)."""
    sig = types.void(types.int64)

    def codegen(context, builder, signature, args):
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        fn = builder.module.declare_intrinsic("llvm.prefetch", [i8p], ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]))
        builder.call(fn, [builder.inttoptr(args[0], i8p), i32(0), i32(3), i32(1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(nogil=True, cache=True, inline="always")
def _prefetch_row(X, v):
    """Start loading row v of X: a walk scores keys at random rows of a store far larger than the caches, and
    waiting for each load in turn (one miss at a time) bounds it, where issued together they overlap
    (H200 host, 32K bf16: a layer's lookups 1.13 -> 0.94 ms for 1 request, 7.9 -> 7.3 ms for 8)."""
    a, row = X.ctypes.data + v * X.strides[0], X.strides[0]
    for off in range(0, row, 64):
        _prefetch(a + off)
    _prefetch(a + row - 1)  # a row that starts late in a line ends in one more (int8 rows of 36 bytes)


@intrinsic
def _bf16_bits_to_f32(typingctx, x):
    """bfloat16 bits (uint16) -> float32: the upper half of a float32's bits."""
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.IntType(32)(16))
        return builder.bitcast(wide, ir.FloatType())

    return sig, codegen


def _ld(a, i):
    """a[i] as float32, for float32 arrays, bfloat16 ones (stored as uint16 bits) and int8 ones."""


@overload(_ld, inline="always")
def _ld_impl(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: _bf16_bits_to_f32(a[i])
    return lambda a, i: np.float32(a[i])


def _row_scale(row, d):
    """The scale of a stored row of d values: int8 rows end with their float32 scale, others have none."""


@overload(_row_scale, inline="always")
def _row_scale_impl(row, d):
    if row.dtype == types.int8:
        return lambda row, d: carray(_f32p(row.ctypes.data + d), (1,))[0]
    return lambda row, d: np.float32(1.0)


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _dot(a, b):
    s = np.float32(0.0)
    for i in range(a.shape[0]):
        s += _ld(a, i) * _ld(b, i)
    return s


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _score(qv, row):
    """q . k for a stored key row (its d = len(q) values, times its scale where it has one)."""
    return _dot(qv, row) * _row_scale(row, qv.shape[0])


@njit(nogil=True, cache=True)
def _heap_push_topk(sc, ids, size, k, score, key):
    """Keep the k best (score, key) in a min-heap `sc`/`ids` of current size `size`; return new size."""
    if size < k:
        i = size
        size += 1
    elif score > sc[0]:
        i = 0
        # sift down from the root, replacing the worst
        while True:
            c = 2 * i + 1
            if c >= k:
                break
            if c + 1 < k and sc[c + 1] < sc[c]:
                c += 1
            if sc[c] >= score:
                break
            sc[i] = sc[c]
            ids[i] = ids[c]
            i = c
        sc[i] = score
        ids[i] = key
        return size
    else:
        return size
    # sift up the new leaf
    while i > 0:
        p = (i - 1) // 2
        if sc[p] <= score:
            break
        sc[i] = sc[p]
        ids[i] = ids[p]
        i = p
    sc[i] = score
    ids[i] = key
    return size


@njit(nogil=True, cache=True)
def _sort_desc(sc, ids, size):
    order = np.argsort(-sc[:size])
    tmp_s = sc[:size][order]
    tmp_i = ids[:size][order]
    sc[:size] = tmp_s
    ids[:size] = tmp_i


@njit(nogil=True, fastmath=True, cache=True)
def _flat_one(qv, Kg, n, k, sc, ids):
    size = 0
    for j in range(n):
        size = _heap_push_topk(sc, ids, size, k, _score(qv, Kg[j]), j)
    _sort_desc(sc, ids, size)
    return size


@intrinsic
def _f32_bits(typingctx, x):
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return sig, codegen


@intrinsic
def _f32_of_bits(typingctx, x):
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


EXPANDED = np.int64(1 << 31)  # a list entry's flag: its key's neighbours were scored
ID_MASK = EXPANDED - 1


@njit(nogil=True, cache=True, inline="always")
def _candidate(score, key):
    """(score, key) as one int64 that orders as the score does: the score's bits made monotonic in the upper
    half, the key (and the EXPANDED flag) in the lower. An insert into the search list then moves one
    array instead of three (score, key, flag): a walk 25% faster on the dev CPU."""
    b = np.int64(_f32_bits(score))
    if b < 0:
        b ^= 0x7FFFFFFF
    return (b << 32) | key


@njit(nogil=True, cache=True, inline="always")
def _candidate_score(x):
    b = np.int32(x >> 32)
    if b < 0:
        b ^= 0x7FFFFFFF
    return _f32_of_bits(b)


@njit(nogil=True, cache=True, inline="always")
def _insert(cl, size, cap, x):
    """Insert candidate x into the descending list cl of `size` (at most cap) -> (new size, where it landed;
    cap if it did not)."""
    if size == cap and x <= cl[size - 1]:
        return size, cap
    pos = size if size < cap else cap - 1
    while pos > 0 and cl[pos - 1] < x:
        cl[pos] = cl[pos - 1]
        pos -= 1
    cl[pos] = x
    return (size + 1 if size < cap else size), pos


@njit(nogil=True, cache=True, inline="always")
def _unpack(cl, size, cs, ci):
    """The list's scores and keys, best first, into cs/ci."""
    for j in range(size):
        cs[j] = _candidate_score(cl[j])
        ci[j] = cl[j] & ID_MASK


@njit(nogil=True, cache=True, inline="always")
def _entry(entries, e, usable, n):
    """The e-th key a walk over the first n keys starts from: the graph's entry points, then, where fewer
    than half of them are among those n keys (a request that sees a prefix of a cached document's store),
    evenly spaced keys of [0, n). -2: no more."""
    E = entries.shape[0]
    if e < E:
        return entries[e]
    if 2 * usable >= E:
        return -2
    return ((e - E) * n) // E


@njit(nogil=True, fastmath=True, cache=True)
def _beam_one(qv, Kg, n, adj, entries, ef, visited, stamp, cl, nb):
    """Best-first beam search (a sorted candidate list of size ef, `_candidate`s in cl) over one graph. nb:
    room for a key's neighbours (>= adj.shape[1]).

    Returns (found, scanned): cl holds `found` candidates, best first; `scanned` keys were scored.
    """
    size = 0
    scanned = 0
    E = entries.shape[0]
    usable = 0
    for e in range(2 * E):
        u = _entry(entries, e, usable, n)
        if u == -2:
            break
        if u < 0 or u >= n or visited[u] == stamp:
            continue
        usable += e < E
        visited[u] = stamp
        scanned += 1
        size, _ = _insert(cl, size, ef, _candidate(_score(qv, Kg[u]), u))
    pos = 0  # invariant: every candidate before pos is expanded
    while pos < size:
        x = cl[pos]
        if x & EXPANDED:
            pos += 1
            continue
        cl[pos] = x | EXPANDED
        u = x & ID_MASK
        nxt = pos + 1
        # the unvisited neighbours first, their rows' loads started together; then their scores
        c = 0
        for r in range(adj.shape[1]):
            v = adj[u, r]
            if v >= 0 and v < n and visited[v] != stamp:
                visited[v] = stamp
                _prefetch_row(Kg, v)
                nb[c] = v
                c += 1
        scanned += c
        for j in range(c):
            v = nb[j]
            x = _candidate(_score(qv, Kg[v]), v)
            if size < ef or x > cl[size - 1]:
                size, at = _insert(cl, size, ef, x)
                nxt = min(nxt, at)  # a better candidate landed before the next unexpanded one
                _prefetch_row(adj, v)  # its links, read when it is expanded (H200 host: 0.656 -> 0.638 ms a layer)
        pos = nxt
    return size, scanned


@njit(nogil=True, fastmath=True, cache=True)
def _attend_one(Vg, ids, sc, cnt, scale, o):
    """Partial attention over keys `ids[:cnt]` of scores q . k `sc[:cnt]` (the search's: not computed
    again): writes the normalised output to o, returns (m, s)."""
    d = o.shape[0]
    for i in range(d):
        o[i] = 0.0
    if cnt == 0:
        return NEG_INF, np.float32(0.0)
    m = NEG_INF
    for j in range(cnt):
        _prefetch_row(Vg, ids[j])
        m = max(m, sc[j] * scale)
    s = np.float32(0.0)
    for j in range(cnt):
        w = np.exp(sc[j] * scale - m)
        s += w
        vu = Vg[ids[j]]
        wv = w * _row_scale(vu, d)
        for i in range(d):
            o[i] += wv * _ld(vu, i)
    inv = np.float32(1.0) / s
    for i in range(d):
        o[i] *= inv
    return m, s


@njit(nogil=True, parallel=True, cache=True)
def flat_search(q, K, n, k, out_ids, out_sc, out_scanned):
    H = q.shape[0]
    per = H // K.shape[0]
    for h in prange(H):
        got = _flat_one(q[h], K[h // per], n, k, out_sc[h], out_ids[h])
        for j in range(got, k):
            out_ids[h, j] = -1
        out_scanned[h] = n


@njit(nogil=True, cache=True)
def _graph_or_exact(qv, Kg, n, k, adj, entries, exact, exact_max, occ, ef, visited, stamp, cs, ci, cl):
    """One head's candidates, best first, in cs/ci (cl: the walk's list) -> (found, scanned): a beam search;
    for a head flagged `exact` (a copying head, whose target the graph cannot reach), an exact scan of up
    to `exact_max` keys, and beyond that the beam plus the keys at and after `occ`, the earlier
    occurrences of the current token, which are what a duplicate-token or induction head looks for."""
    if exact and n <= exact_max:
        return _flat_one(qv, Kg, n, k, cs, ci), n
    found, scanned = _beam_one(qv, Kg, n, adj, entries, ef, visited, stamp, cl, ci)
    if exact:
        for j in range(occ.shape[0]):
            for u in (occ[j], occ[j] + 1):
                if u < 0 or u >= n or visited[u] == stamp:
                    continue
                visited[u] = stamp
                scanned += 1
                found, _ = _insert(cl, found, ef, _candidate(_score(qv, Kg[u]), u))
    _unpack(cl, found, cs, ci)
    return found, scanned


@njit(nogil=True, parallel=True, cache=True)
def graph_search(q, K, n, k, adj, entries, exact, exact_max, occ, ef, visited, stamps, cs, ci, cl, out_ids, out_sc,
                 out_scanned):
    H = q.shape[0]
    per_k = H // K.shape[0]
    per_a = H // adj.shape[0]
    for h in prange(H):
        a = h // per_a
        got, scanned = _graph_or_exact(q[h], K[h // per_k], n, k, adj[a], entries[a], exact[h], exact_max, occ, ef,
                                       visited[h], _bump(visited[h], stamps, h), cs[h], ci[h], cl[h])
        kk = min(k, got)
        for j in range(kk):
            out_ids[h, j] = ci[h, j]
            out_sc[h, j] = cs[h, j]
        for j in range(kk, k):
            out_ids[h, j] = -1
        out_scanned[h] = scanned


@njit(nogil=True, parallel=True, cache=True)
def flat_attend(q, K, V, n, k, scale, sc, ids, out_o, out_m, out_s):
    """Exact top-k + partial attention for every head (the paper's `Flat`)."""
    H = q.shape[0]
    per = H // K.shape[0]
    for h in prange(H):
        g = h // per
        got = _flat_one(q[h], K[g], n, k, sc[h], ids[h])
        out_m[h], out_s[h] = _attend_one(V[g], ids[h], sc[h], got, scale, out_o[h])


@njit(nogil=True, parallel=True, cache=True)
def graph_attend(q, K, V, n, k, scale, adj, entries, exact, exact_max, occ, ef, visited, stamps, cs, ci, cl, out_o,
                 out_m, out_s):
    """Graph top-k + partial attention for every head (RetrievalAttention's CPU side)."""
    H = q.shape[0]
    per_k = H // K.shape[0]
    per_a = H // adj.shape[0]
    for h in prange(H):
        g = h // per_k
        got, _ = _graph_or_exact(q[h], K[g], n, k, adj[h // per_a], entries[h // per_a], exact[h], exact_max, occ,
                                 ef, visited[h], _bump(visited[h], stamps, h), cs[h], ci[h], cl[h])
        out_m[h], out_s[h] = _attend_one(V[g], ci[h], cs[h], min(k, got), scale, out_o[h])


@njit(nogil=True, parallel=True, cache=True)
def ids_attend(q, K, V, ids, counts, scale, sc, out_o, out_m, out_s):
    """Partial attention over ids found elsewhere (hnswlib); sc (H, >= k): room for their scores."""
    H = q.shape[0]
    per = H // K.shape[0]
    for h in prange(H):
        g = h // per
        for j in range(counts[h]):
            sc[h, j] = _score(q[h], K[g][ids[h, j]])
        out_m[h], out_s[h] = _attend_one(V[g], ids[h], sc[h], counts[h], scale, out_o[h])


# A store described by addresses (OffloadedStore.describe), for batch_attend: one row per store and layer.
D_K, D_V, D_ADJ, D_ENTRIES, D_EXACT, D_CAP, D_ROW, D_A, D_R, D_E = range(10)
DESCRIBE_FIELDS = 10
# Per request and step: its row in q/out and k, then PARTS parts (its own store, a cached document's), each
# flat (0) or graph (1), its keys (0: no part), ef, exact_max and occurrences.
R_ROW, R_K = range(2)
P_KIND, P_N, P_EF, P_EXACT_MAX, P_OCC, P_OCC_N = range(6)
PART_FIELDS, PARTS = 6, 2
REQUEST_FIELDS = 2 + PARTS * PART_FIELDS


@njit(nogil=True, fastmath=True, cache=True, inline="always")
def _merge_into(o, m, s, o2, m2, s2):
    """o, m, s <- the log-sum-exp merge of two partial attentions (o normalised, m max score, s sum of
    exponentials at m); a part with no keys (s == 0) leaves the other as it is."""
    if s2 == 0.0:
        return m, s
    if s == 0.0:
        for i in range(o.shape[0]):
            o[i] = o2[i]
        return m2, s2
    mx = max(m, m2)
    a, c = s * np.exp(m - mx), s2 * np.exp(m2 - mx)
    inv = np.float32(1.0) / (a + c)
    for i in range(o.shape[0]):
        o[i] = (a * o[i] + c * o2[i]) * inv
    return mx, a + c


@njit(nogil=True, parallel=True, cache=True)
def batch_attend(desc, l, req, G, scale, q, out_o, out_ms, kv_like, visited, stamps, cs, ci, cl, tmp):
    """Top-k + partial attention for every (request, head) pair of layer l in one parallel loop: desc (B,
    PARTS, L, DESCRIBE_FIELDS) describes each request's stores, req (B, REQUEST_FIELDS) its step; q (rows,
    H, d) -> out_o (rows, H, d), out_ms (rows, 2, H) (max score, sum of exponentials) at each request's row.
    Each part gives its own top-k, merged by log-sum-exp. Flat stores and k >= n scan exactly; graph stores
    walk their graph (exact heads as in graph_attend). kv_like: an array of the stores' K/V dtype (all of
    them the same). Scratch is per worker thread (row numba.get_thread_id()): visited (T, >= any n),
    stamps (T,), cs/ci/cl (T, >= any part's list and any graph's degree), tmp (T, d)."""
    B, H, d = req.shape[0], q.shape[1], q.shape[2]
    for t in prange(B * H):
        b = t // H
        h = t - b * H
        th = get_thread_id()
        r, k = req[b, R_ROW], req[b, R_K]
        g = h // (H // G)
        qv, o = q[r, h], out_o[r, h]
        m, s = NEG_INF, np.float32(0.0)
        for i in range(d):
            o[i] = 0.0
        for p in range(PARTS):
            f = 2 + p * PART_FIELDS
            n = req[b, f + P_N]
            if n == 0:
                continue
            kk = min(k, n)
            e = desc[b, p, l]
            cap, row = e[D_CAP], e[D_ROW]
            Kg = carray(_ptr_like(e[D_K], kv_like), (G, cap, row))[g]
            Vg = carray(_ptr_like(e[D_V], kv_like), (G, cap, row))[g]
            if req[b, f + P_KIND] == 0 or kk >= n:
                got = _flat_one(qv, Kg, n, kk, cs[th], ci[th])
            else:
                A = e[D_A]
                adj = carray(_i32p(e[D_ADJ]), (A, cap, e[D_R]))[h // (H // A)]
                entries = carray(_i32p(e[D_ENTRIES]), (A, e[D_E]))[h // (H // A)]
                exact = carray(_u8p(e[D_EXACT]), (H,))
                occ = carray(_i64p(req[b, f + P_OCC]), (req[b, f + P_OCC_N],))
                got, _ = _graph_or_exact(qv, Kg, n, kk, adj, entries, exact[h], req[b, f + P_EXACT_MAX], occ,
                                         req[b, f + P_EF], visited[th], _bump(visited[th], stamps, th * STAMP_STRIDE), cs[th],
                                         ci[th], cl[th])
            t_o = tmp[th, :d]  # its row is padded past d
            m2, s2 = _attend_one(Vg, ci[th], cs[th], min(kk, got), scale, t_o)
            m, s = _merge_into(o, m, s, t_o, m2, s2)
        out_ms[r, 0, h], out_ms[r, 1, h] = m, s


# ---------------------------------------------------------------------------------------------
# Graph construction (attention-aware, RoarGraph-style projection of the query->key bipartite graph)

@njit(nogil=True, cache=True, inline="always")
def _pair(src_of, dst_of, c, a, b):
    """Append the candidate edges a -> b and b -> a; returns the new count."""
    src_of[c] = a
    dst_of[c] = b
    src_of[c + 1] = b
    dst_of[c + 1] = a
    return c + 2


@njit(nogil=True, cache=True)
def build_graph(knn, n, R, adj, entries):
    """Fill adj (n, R) and entries (E,) from the exact top-L keys of each prefill query.

    knn (m, L) int: keys in descending score order per query (-1 = none). Slots 0/1 of every row
    are sequence edges (u-1, u+1): they make every key reachable, which a pure projection does not
    (queries pile onto a few sink keys). Slots 2.. hold projected edges: key pairs co-retrieved by
    the same query (the query's best key <-> each other key, and rank neighbours), most frequent
    first.
    """
    m, L = knn.shape
    for u in range(n):
        for r in range(R):
            adj[u, r] = -1
        adj[u, 0] = u - 1 if u > 0 else -1
        adj[u, 1] = u + 1 if u + 1 < n else -1
    # candidate directed edges (src, dst), grouped by src with a counting sort (a global sort of all
    # m * L * 4 of them was half of the build)
    src_of = np.empty(m * (L - 1) * 4, dtype=np.int32)
    dst_of = np.empty(m * (L - 1) * 4, dtype=np.int32)
    c = 0
    pivot_count = np.zeros(n, dtype=np.int32)
    for r in range(m):
        p = knn[r, 0]
        if p < 0:
            continue
        pivot_count[p] += 1
        for j in range(1, L):
            x = knn[r, j]
            if x < 0:
                break
            c = _pair(src_of, dst_of, c, p, x)
            if j >= 2:
                c = _pair(src_of, dst_of, c, knn[r, j - 1], x)
    start = np.zeros(n + 1, dtype=np.int64)
    for i in range(c):
        start[src_of[i] + 1] += 1
    longest = 0
    for u in range(n):
        longest = max(longest, start[u + 1])
        start[u + 1] += start[u]
    grouped = np.empty(c, dtype=np.int32)
    fill = start[:n].copy()
    for i in range(c):
        grouped[fill[src_of[i]]] = dst_of[i]
        fill[src_of[i]] += 1
    dsts = np.empty(longest, dtype=np.int64)
    cnts = np.empty(longest, dtype=np.int64)
    free = R - 2
    for src in range(n):
        seg = grouped[start[src]:start[src + 1]]
        seg.sort()
        # run-length count of each destination, then keep the most frequent (ties: lower id first)
        nd = 0
        t = 0
        while t < seg.shape[0]:
            e = t
            while e < seg.shape[0] and seg[e] == seg[t]:
                e += 1
            dst = seg[t]
            if dst != src and dst != src - 1 and dst != src + 1:
                dsts[nd] = dst
                cnts[nd] = e - t
                nd += 1
            t = e
        if nd == 0:
            continue
        order = np.argsort(-cnts[:nd], kind="mergesort")
        for r in range(min(free, nd)):
            adj[src, 2 + r] = dsts[order[r]]
    # entries: the most frequent best keys, then evenly spaced keys
    order = np.argsort(-pivot_count, kind="mergesort")
    E = entries.shape[0]
    ne = 0
    for r in range(min(E, n)):
        if pivot_count[order[r]] == 0:
            break
        entries[ne] = order[r]
        ne += 1
    spare = E - ne
    for r in range(spare):
        entries[ne + r] = (r * n) // spare if n > 0 else -1


@njit(nogil=True, fastmath=True, cache=True)
def add_nodes(Kg, d, start, end, adj, entries, ef, visited, stamps, ci, cl):
    """Link keys start..end-1 (already in Kg) into the graph: a sequence edge to the previous key and
    projected edges to the keys a search for the key itself finds, mirrored where a slot is free.
    It searches with scratch row 0 (visited[0], stamps[0], ci[0], cl[0])."""
    R = adj.shape[1]
    vis, ci, cl = visited[0], ci[0], cl[0]
    for u in range(start, end):
        for r in range(R):
            adj[u, r] = -1
        if u > 0:
            adj[u, 0] = u - 1
            adj[u - 1, 1] = u
        if u % ENTRY_SPACING == 0:  # a graph that started empty (no prefill keys) takes entries as it grows
            for e in range(entries.shape[0]):
                if entries[e] < 0:
                    entries[e] = u
                    break
        if u == 0:
            continue
        got, _ = _beam_one(Kg[u, :d], Kg, u, adj, entries, ef, vis, _bump(vis, stamps, 0), cl, ci)
        slot = 2
        for j in range(got):
            v = cl[j] & ID_MASK
            if slot >= R:
                break
            if v == u - 1:
                continue
            adj[u, slot] = v
            slot += 1
            # reverse edge: into a free slot, else over the last (least frequent) projected edge
            placed = False
            for r in range(2, R):
                if adj[v, r] < 0:
                    adj[v, r] = u
                    placed = True
                    break
            if not placed and R > 2:
                adj[v, R - 1] = u
