// CPU paged attention: packed queries of several sequences against key/value caches read through
// block tables (see PagedAttnArgs).
//
// One work item is (sequence, key/value head, tile of query positions, range of keys): it takes the
// query rows of every head of the group for its positions together and reads each key and value
// row of its range once, straight from the cache when the dtype and layout allow (else converted a
// block at a time), so decode (one position per sequence) streams the cache at memory speed. Keys
// are visited BC at a time across cache blocks; each row is limited to the keys at or before its
// own position. When there are few items, long contexts are split and the partial results merged by
// their log-sum-exp, as in the decode kernel.
#include <vector>

#include "attention_stream.h"

namespace fusedformer::cpu::FF_ISA {
namespace {

// Query rows (group heads x positions) per work item, when the group is smaller.
constexpr int64_t kMaxRows = 16;
// Fewest keys per split.
constexpr int64_t kMinSplitKeys = 512;
// Smallest cache block whose values are multiplied in place (smaller ones are packed: a product per
// block would reload the outputs too often).
constexpr int64_t kMinDirectBlock = 16;

struct PagedItem {
  int64_t b, hkv, i0, nt;  // sequence, key/value head, positions [i0, i0 + nt) of its queries
  int64_t keys;            // keys the last position sees
  int64_t nsplit, part;    // splits of the keys, and the offset of their partials
};

struct PagedPlan {
  int64_t group, E, Ep, rows;  // rows: the most rows of an item
  bool k_direct, v_direct;
};

template <typename T, typename C = compute_t<T>>
void paged_item(const PagedAttnArgs& a, const PagedPlan& pl, const PagedItem& it, int64_t split,
                const StreamRows<C>& st, C* kbuf, C* vbuf, C* part) {
  const int64_t S = a.seq_lens[it.b], t0 = a.query_start[it.b], L = a.query_start[it.b + 1] - t0;
  const int64_t R = pl.group * it.nt, first = S - L;  // position of the sequence's first query
  const int64_t* table = a.block_tables + it.b * a.bt_stride;
  // row r is (head hkv * group + r / nt, query i0 + r % nt)
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = it.hkv * pl.group + r / it.nt, i = it.i0 + r % it.nt;
    const T* q = static_cast<const T*>(a.q) + (t0 + i) * a.q_st + h * a.q_sh;
    pack_rows<T, C>(q, 0, a.q_se, 1, pl.E, C(a.scale) * kLog2e<C>, st.qd + r * pl.Ep, pl.Ep, 1);
  }
  StreamRows<C> rows = st;
  rows.R = R;
  rows.reset();
  const T* kc = static_cast<const T*>(a.k_cache) + it.hkv * a.kc_sh;
  const T* vc = static_cast<const T*>(a.v_cache) + it.hkv * a.vc_sh;
  const int64_t bs = a.block_size;
  const int64_t nkb = ceil_div(it.keys, BC);
  const int64_t kb0 = nkb * split / it.nsplit, kb1 = nkb * (split + 1) / it.nsplit;
  const C* krow[BC];
  const T* vsrc[BC];
  for (int64_t kb = kb0; kb < kb1; ++kb) {
    const int64_t j0 = kb * BC, n = std::min<int64_t>(BC, it.keys - j0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t tok = j0 + j, blk = table[tok / bs], off = tok % bs;
      const T* k = kc + blk * a.kc_sb + off * a.kc_sl;
      vsrc[j] = vc + blk * a.vc_sb + off * a.vc_sl;
      if (pl.k_direct) {
        krow[j] = reinterpret_cast<const C*>(k);
      } else {
        pack_rows<T, C>(k, 0, a.kc_se, 1, pl.E, C(1), kbuf + j * pl.Ep, pl.Ep, 1);
        krow[j] = kbuf + j * pl.Ep;
      }
    }
    stream_block<C>(
        rows, [&](int64_t j) { return krow[j]; }, n,
        [&](int64_t r, C* s) {
          const int64_t pos = first + it.i0 + r % it.nt;
          const int64_t lim = std::clamp<int64_t>(pos - j0 + 1, 0, n);
          std::fill(s + lim, s + BC, -kInf<C>);
        },
        [](int64_t, C*) {},
        [&](const auto& seg) {
          if (pl.v_direct && bs >= kMinDirectBlock) {
            // in place, one cache block's run of values at a time
            for (int64_t j = 0, e; j < n; j = e) {
              e = std::min<int64_t>(n, j + bs - (j0 + j) % bs);
              seg(j, e, reinterpret_cast<const C*>(vsrc[j]), a.vc_sl);
            }
            return;
          }
          for (int64_t j = 0; j < n; ++j) pack_rows<T, C>(vsrc[j], 0, a.vc_se, 1, pl.E, C(1), vbuf + j * pl.Ep, pl.Ep, 1);
          seg(0, n, vbuf, pl.Ep);
        });
  }
  if (it.nsplit > 1) {
    store_partial(rows, part + it.part + split * R * (pl.Ep + 2));
    return;
  }
  C lse;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = it.hkv * pl.group + r / it.nt, i = it.i0 + r % it.nt;
    T* out = static_cast<T*>(a.out) + ((t0 + i) * a.Hq + h) * a.E;
    finish_row<T, C>(rows.ob + r * pl.Ep, rows.m[r], rows.l[r], pl.E, out, &lse);
  }
}

template <typename T, typename C = compute_t<T>>
void merge_item(const PagedAttnArgs& a, const PagedPlan& pl, const PagedItem& it, const C* part, C* acc) {
  const int64_t t0 = a.query_start[it.b], R = pl.group * it.nt, ld = pl.Ep + 2;
  C lse;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t h = it.hkv * pl.group + r / it.nt, i = it.i0 + r % it.nt;
    C M, l;
    merge_partials(part + it.part + r * ld, R * ld, it.nsplit, pl.E, acc, M, l);
    finish_row<T, C>(acc, M, l, pl.E, static_cast<T*>(a.out) + ((t0 + i) * a.Hq + h) * a.E, &lse);
  }
}

template <typename T>
void paged_impl(const PagedAttnArgs& a) {
  using C = compute_t<T>;
  constexpr int N = lanes_v<C>;
  PagedPlan pl;
  pl.group = a.Hq / a.Hkv;
  pl.E = a.E;
  pl.Ep = round_up(a.E, N);
  pl.k_direct = std::is_same_v<T, C> && a.kc_se == 1 && a.E % N == 0;
  pl.v_direct = std::is_same_v<T, C> && a.vc_se == 1 && a.E % N == 0;
  const int64_t tile = std::max<int64_t>(1, kMaxRows / pl.group);
  pl.rows = pl.group * std::min(tile, std::max<int64_t>(a.max_q_len, 1));
  std::vector<PagedItem> items;
  for (int64_t b = 0; b < a.B; ++b) {
    const int64_t L = a.query_start[b + 1] - a.query_start[b], S = a.seq_lens[b];
    for (int64_t hkv = 0; hkv < a.Hkv; ++hkv)
      for (int64_t i0 = 0; i0 < L; i0 += tile) {
        const int64_t nt = std::min(tile, L - i0);
        items.push_back({b, hkv, i0, nt, S - L + i0 + nt, 1, 0});
      }
  }
  const int64_t threads = num_threads(), nitems = int64_t(items.size());
  int64_t nparts = 0;
  std::vector<std::pair<int64_t, int64_t>> units;  // (item, split)
  for (int64_t x = 0; x < nitems; ++x) {
    PagedItem& it = items[x];
    if (nitems < 2 * threads)
      it.nsplit = std::clamp<int64_t>(std::min(ceil_div(2 * threads, nitems), it.keys / kMinSplitKeys), 1,
                                      ceil_div(it.keys, BC));
    if (it.nsplit > 1) {
      it.part = nparts;
      nparts += it.nsplit * pl.group * it.nt * (pl.Ep + 2);
    }
    for (int64_t s = 0; s < it.nsplit; ++s) units.emplace_back(x, s);
  }
  Buf<C> part(nparts);
  run_items(int64_t(units.size()), [&](const auto& take) {
    Buf<C> qd(pl.rows * pl.Ep), sb(pl.rows * BC), ob(pl.rows * pl.Ep), kbuf(pl.k_direct ? 1 : BC * pl.Ep),
        vbuf(BC * pl.Ep), ml(2 * pl.rows);
    const StreamRows<C> st{pl.rows, pl.Ep, pl.Ep, qd.get(), sb.get(), ob.get(), ml.get(), ml.get() + pl.rows};
    for (int64_t u; (u = take()) >= 0;)
      paged_item<T>(a, pl, items[units[u].first], units[u].second, st, kbuf.get(), vbuf.get(), part.get());
  });
  if (nparts > 0) {
    parallel_for(0, nitems, 1, [&](int64_t s, int64_t e) {
      Buf<C> acc(pl.E);
      for (int64_t x = s; x < e; ++x)
        if (items[x].nsplit > 1) merge_item<T>(a, pl, items[x], part.get(), acc.get());
    });
  }
}

}  // namespace

void paged_attention(const PagedAttnArgs& a) {
  dispatch_dtype(a.dtype, [&](auto tag) { paged_impl<decltype(tag)>(a); });
}

}  // namespace fusedformer::cpu::FF_ISA
