// Fused attention forward on the CPU (flash-attention style). Semantics: fastnn/reference/attention.py.
//
// Work split: at::parallel_for over tasks (sequence, kv head, chunk of query blocks; chunks only when
// there are fewer than ~4 (sequence, kv head) pairs per thread). A task packs K^T and V of the keys its
// rows can see once (GEMM B blocks, zero-padded to whole key blocks), then for every query head of the
// group and every query block of BQ rows: for each key block of BK keys inside the causal / window band
// (blocks outside are skipped, and only the columns [first visible, last visible] of a block are
// multiplied), S = Q K^T by GEMM into an fp32 tile, the online softmax per row (running max m, sum l,
// accumulator rescale; 16 rows per step in the common case, softmax_rows16), P (fp32, or bf16 on the
// AMX path) V by GEMM into the fp32 accumulator. fp32 decode-shaped problems (few query rows per kv
// head) take decode_impl instead, which reads K and V in place.
// out = acc / l, lse = m + log l; rows that see no key get out = 0, lse = -inf. Each output row is
// computed by one task in a fixed order, so the result does not depend on the thread count.
#include "../families/attention.h"
#include "attention_cpu_impl.h"

namespace fastnn {
namespace cpu {
namespace attn_detail {

namespace {
// Block sizes: BQ query rows x BK keys per tile. Measured single-threaded at B=4, H=8, L=1024, D=64
// (2-core AVX-512/AMX VM): bf16 (AMX) BQ 64 -> 128 -> 256 took the forward from ~31 to ~27 to ~25.5 ms
// (fewer, larger brgemm calls); fp32 is GEMM-bound and within noise for (64..256) x (128..512).
constexpr int64_t kFwdBQ = 64;        // fp32 / fp64 / converted fp16
constexpr int64_t kFwdBKf32 = 512;
constexpr int64_t kFwdBQvnni = 256;   // bf16 on AMX
constexpr int64_t kFwdBK = 256;       // bf16 on AMX; a multiple of 64 (VNNI slabs)
}  // namespace

Problem make_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const c10::optional<at::Tensor>& cu_seqlens_q, const c10::optional<at::Tensor>& cu_seqlens_k,
                     const c10::optional<at::Tensor>& seqused_k, const c10::optional<at::Tensor>& bias, double scale,
                     double softcap, int64_t window_left, int64_t window_right, bool bottom_right, double dropout_p,
                     int64_t seed) {
  TORCH_CHECK(q.device().is_cpu() && k.device().is_cpu() && v.device().is_cpu(), "attention_cpu: q, k, v must be CPU tensors");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
              "attention_cpu: q, k, v must be 4-D (B, L, H, D); got ", q.dim(), ", ", k.dim(), ", ", v.dim(), " dims");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "attention_cpu: q, k, v dtypes differ: ", q.scalar_type(), ", ", k.scalar_type(), ", ", v.scalar_type());
  const auto dt = q.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16,
              "attention_cpu: unsupported dtype ", dt);
  TORCH_CHECK(q.size(3) <= 1 || q.stride(3) == 1, "attention_cpu: q's last dim must have stride 1");
  TORCH_CHECK(k.size(3) <= 1 || k.stride(3) == 1, "attention_cpu: k's last dim must have stride 1");
  TORCH_CHECK(v.size(3) <= 1 || v.stride(3) == 1, "attention_cpu: v's last dim must have stride 1");
  TORCH_CHECK(q.size(0) == k.size(0) && k.size(0) == v.size(0), "attention_cpu: batch sizes differ");
  TORCH_CHECK(k.size(1) == v.size(1) && k.size(2) == v.size(2), "attention_cpu: k and v shapes disagree");
  TORCH_CHECK(q.size(3) == k.size(3), "attention_cpu: q and k head dims differ");
  TORCH_CHECK(k.size(2) > 0 && q.size(2) % k.size(2) == 0, "attention_cpu: H (", q.size(2),
              ") must be a multiple of Hkv (", k.size(2), ")");
  TORCH_CHECK(window_left >= -1 && window_right >= -1, "attention_cpu: window sizes must be >= -1");
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p < 1.0, "attention_cpu: dropout_p must be in [0, 1)");

  Problem P;
  P.B = q.size(0);
  P.Lq = q.size(1);
  P.H = q.size(2);
  P.D = q.size(3);
  P.Lk = k.size(1);
  P.Hkv = k.size(2);
  P.Dv = v.size(3);
  P.group = P.H / P.Hkv;
  P.qs0 = q.stride(0), P.qs1 = q.stride(1), P.qs2 = q.stride(2);
  P.ks0 = k.stride(0), P.ks1 = k.stride(1), P.ks2 = k.stride(2);
  P.vs0 = v.stride(0), P.vs1 = v.stride(1), P.vs2 = v.stride(2);
  P.scale = scale;
  P.softcap = softcap;
  P.wl = window_left;
  P.wr = window_right;
  P.bottom_right = bottom_right;
  P.dropout_p = dropout_p;
  const uint64_t useed = static_cast<uint64_t>(seed);
  P.seed_lo = static_cast<uint32_t>(useed & 0xFFFFFFFFu);
  P.seed_hi = static_cast<uint32_t>(useed >> 32);
  P.threshold = fastnn::attn::dropout_threshold(dropout_p);
  P.total_q = P.B * P.Lq;

  auto check_i32 = [](const at::Tensor& t, const char* name) {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kInt && t.dim() == 1,
                "attention_cpu: ", name, " must be a 1-D int32 CPU tensor");
  };
  std::vector<int32_t> used;
  if (seqused_k.has_value()) {
    check_i32(*seqused_k, "seqused_k");
    at::Tensor u = seqused_k->contiguous();
    used.assign(u.data_ptr<int32_t>(), u.data_ptr<int32_t>() + u.numel());
  }
  TORCH_CHECK(cu_seqlens_q.has_value() == cu_seqlens_k.has_value(),
              "attention_cpu: cu_seqlens_q and cu_seqlens_k go together");
  if (cu_seqlens_q.has_value()) {
    check_i32(*cu_seqlens_q, "cu_seqlens_q");
    check_i32(*cu_seqlens_k, "cu_seqlens_k");
    TORCH_CHECK(P.B == 1, "attention_cpu: varlen (cu_seqlens) needs B = 1 views");
    TORCH_CHECK(cu_seqlens_q->numel() == cu_seqlens_k->numel() && cu_seqlens_q->numel() >= 1,
                "attention_cpu: cu_seqlens_q and cu_seqlens_k must have the same length >= 1");
    TORCH_CHECK(!bias.has_value(), "attention_cpu: bias is not supported with cu_seqlens");
    at::Tensor cq = cu_seqlens_q->contiguous(), ck = cu_seqlens_k->contiguous();
    const int32_t* a = cq.data_ptr<int32_t>();
    const int32_t* b = ck.data_ptr<int32_t>();
    const int64_t nseq = cq.numel() - 1;
    TORCH_CHECK(used.empty() || static_cast<int64_t>(used.size()) == nseq,
                "attention_cpu: seqused_k must have one entry per sequence");
    P.varlen = true;
    P.total_q = P.Lq;
    for (int64_t s = 0; s < nseq; ++s) {
      TORCH_CHECK(a[s] >= 0 && a[s] <= a[s + 1] && a[s + 1] <= P.Lq, "attention_cpu: cu_seqlens_q must be "
                  "non-decreasing within [0, ", P.Lq, "]");
      TORCH_CHECK(b[s] >= 0 && b[s] <= b[s + 1] && b[s + 1] <= P.Lk, "attention_cpu: cu_seqlens_k must be "
                  "non-decreasing within [0, ", P.Lk, "]");
      Span sp;
      sp.bi = 0;
      sp.qs = a[s];
      sp.lq = a[s + 1] - a[s];
      sp.ks = b[s];
      sp.kspan = b[s + 1] - b[s];
      sp.lk = used.empty() ? sp.kspan : used[s];
      TORCH_CHECK(sp.lk >= 0 && sp.lk <= sp.kspan, "attention_cpu: seqused_k[", s, "] = ", sp.lk,
                  " must be in [0, cu_seqlens_k[s+1] - cu_seqlens_k[s]]");
      sp.tq = a[s];
      P.spans.push_back(sp);
    }
  } else {
    TORCH_CHECK(used.empty() || static_cast<int64_t>(used.size()) == P.B,
                "attention_cpu: seqused_k must have B entries");
    for (int64_t b = 0; b < P.B; ++b) {
      Span sp;
      sp.bi = b;
      sp.qs = 0;
      sp.lq = P.Lq;
      sp.ks = 0;
      sp.kspan = P.Lk;
      sp.lk = used.empty() ? P.Lk : used[b];
      TORCH_CHECK(sp.lk >= 0 && sp.lk <= P.Lk, "attention_cpu: seqused_k[", b, "] = ", sp.lk, " must be in [0, ",
                  P.Lk, "]");
      sp.tq = b * P.Lq;
      P.spans.push_back(sp);
    }
  }
  if (bias.has_value()) {
    const at::Tensor& bt = *bias;
    TORCH_CHECK(bt.device().is_cpu(), "attention_cpu: bias must be a CPU tensor");
    TORCH_CHECK(bt.dim() == 4 && bt.size(0) == P.B && bt.size(1) == P.H && bt.size(2) == P.Lq && bt.size(3) == P.Lk,
                "attention_cpu: bias must be expanded to (B, H, Lq, Lk) = (", P.B, ", ", P.H, ", ", P.Lq, ", ", P.Lk,
                "), got ", bt.sizes());
    switch (bt.scalar_type()) {
      case at::kFloat: P.bias_kind = kBiasF32; break;
      case at::kDouble: P.bias_kind = kBiasF64; break;
      case at::kHalf: P.bias_kind = kBiasHalf; break;
      case at::kBFloat16: P.bias_kind = kBiasBF16; break;
      case at::kBool: P.bias_kind = kBiasBool; break;
      default: TORCH_CHECK(false, "attention_cpu: bias must be a float or bool tensor, got ", bt.scalar_type());
    }
    P.bias = bt.data_ptr();
    P.bs0 = bt.stride(0), P.bs1 = bt.stride(1), P.bs2 = bt.stride(2), P.bs3 = bt.stride(3);
  }
  return P;
}

void zero_uncovered_rows(at::Tensor& t, const std::vector<std::pair<int64_t, int64_t>>& covered) {
  // t: (1, L, H, W) contiguous; covered: sorted [start, end) row spans.
  const int64_t L = t.size(1);
  const int64_t row = t.numel() / std::max<int64_t>(L, 1);
  std::vector<char> cov(L, 0);
  for (auto& c : covered)
    for (int64_t i = c.first; i < c.second; ++i) cov[i] = 1;
  char* base = static_cast<char*>(t.data_ptr());
  const int64_t es = t.element_size();
  for (int64_t i = 0; i < L; ++i)
    if (!cov[i]) std::memset(base + i * row * es, 0, row * es);
}

void rows_to_vnni(const bf16* src, int64_t ld, int64_t nv, int64_t K, int64_t N, bf16* dst) {
  static const bf16 zeros[64] = {};
  for (int64_t n0 = 0; n0 < N; n0 += 64) {
    const int64_t w = std::min<int64_t>(64, N - n0);
    bf16* d = dst + n0 * K;
    for (int64_t k = 0; k < K; k += 2) {
      const bf16* r0 = k < nv ? src + k * ld + n0 : zeros;
      const bf16* r1 = k + 1 < nv ? src + (k + 1) * ld + n0 : zeros;
      bf16* o = d + (k >> 1) * w * 2;
      int64_t n = 0;
#ifdef FASTNN_ATTN_AVX512
      for (; n + 16 <= w; n += 16) {
        __m512i a = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r0 + n)));
        __m512i b = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(r1 + n)));
        _mm512_storeu_si512(o + 2 * n, _mm512_or_si512(a, _mm512_slli_epi32(b, 16)));
      }
#endif
      for (; n < w; ++n) {
        o[2 * n] = r0[n];
        o[2 * n + 1] = r1[n];
      }
    }
  }
}

bool bf16_amx_available() {
  static const bool ok = [] {
    try {
      if (!FASTNN_HAVE_BRGEMM || !at::native::cpublas::could_pack(at::kBFloat16)) return false;
      // The packed layout must be the VNNI-2 we write ourselves.
      const int64_t K = 6, N = 48;
      std::vector<bf16> src(K * N), ref(K * N + 64), mine(K * N + 64);
      for (int64_t i = 0; i < K * N; ++i) src[i] = bf16(static_cast<float>(i % 97));
      at::native::cpublas::pack(K, N, N, N, at::kBFloat16, at::kBFloat16, src.data(), ref.data());
      pack_b<bf16>(K, N, mine.data(), [&](int64_t k, int64_t n) { return src[k * N + n]; });
      for (int64_t i = 0; i < K * N; ++i)
        if (ref[i].x != mine[i].x) return false;
      return true;
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

bool bf16_flat_panels_ok() {
  static const bool ok = [] {
    try {
      if (!bf16_amx_available()) return false;
      // 16 x 32 times columns [64, 192) of a 32 x 192 flat panel, in small integers (exact in fp32)
      const int64_t M = 16, K = 32, W = 192, n0 = 64, N = W - n0;
      std::vector<bf16> a(M * K), b(K * W);
      for (int64_t i = 0; i < M * K; ++i) a[i] = bf16(static_cast<float>(i % 5) - 2.0f);
      std::vector<float> bsrc(K * W), c(M * N, 0.0f);
      for (int64_t i = 0; i < K * W; ++i) bsrc[i] = static_cast<float>((i * 7) % 9) - 4.0f;
      pack_b<bf16>(K, W, b.data(), [&](int64_t k, int64_t n) { return bsrc[k * W + n]; }, W);
      gemm_flat(M, N, K, a.data(), K, b.data() + 2 * n0, W, c.data(), N, false);
      gemm_release<bf16>();
      for (int64_t i = 0; i < M; ++i)
        for (int64_t j = 0; j < N; ++j) {
          float ref = 0.0f;
          for (int64_t k = 0; k < K; ++k) ref += static_cast<float>(a[i * K + k]) * bsrc[k * W + n0 + j];
          if (c[i * N + j] != ref) return false;
        }
      return true;
    } catch (...) {
      return false;
    }
  }();
  return ok;
}

namespace {
// Per-thread growable buffer (uninitialised).
template <typename T> struct Buf {
  std::unique_ptr<T[]> p;
  int64_t cap = 0;
  T* get(int64_t n) {
    if (n > cap) {
      p = raw_buffer<T>(n);
      cap = n;
    }
    return p.get();
  }
};

template <typename scalar_t, typename ct>
void forward_impl(const Problem& P, const scalar_t* q, const scalar_t* k, const scalar_t* v, scalar_t* out,
                  acc_of<ct>* lse) {
  using acc_t = acc_of<ct>;
  constexpr int64_t BQ = is_vnni<ct>() ? kFwdBQvnni : kFwdBQ, BK = is_vnni<ct>() ? kFwdBK : kFwdBKf32;
  constexpr bool vnni = is_vnni<ct>();
  constexpr int64_t CG = vnni ? 64 : 1;  // column granularity of a GEMM over a key sub-range
  const int64_t D = P.D, Dv = P.Dv, H = P.H, Hkv = P.Hkv, G = P.group;
  const int64_t nspan = static_cast<int64_t>(P.spans.size());
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();
  // fp32 / fp64: V is read in place (row-major B, ld = v.stride(1)); otherwise packed per task.
  const bool v_direct = std::is_same<scalar_t, ct>::value && !vnni;
  const bool q_direct = std::is_same<scalar_t, ct>::value;
  const bool transform = needs_transform(P);
  // K^T blocks as one flat VNNI panel: S = Q K^T is one brgemm call per key block instead of BK / 64
  const int64_t kt_panel = vnni && bf16_flat_panels_ok() ? BK : 64;

  // Tasks: (span, kv head, chunk of query blocks). A task packs K^T and V of the keys its rows can see
  // once, for all the query heads of the group. Chunks only split a (span, kv head) when there are
  // fewer of those than ~4 tasks per thread; the result does not depend on the split.
  struct Task { int64_t s, hk, qb0, qb1; };
  std::vector<Task> tasks;
  const int64_t want = 4 * at::get_num_threads();
  const int64_t per = std::max<int64_t>(1, div_up(want, std::max<int64_t>(1, nspan * Hkv)));
  for (int64_t s = 0; s < nspan; ++s) {
    const int64_t nqb = div_up(P.spans[s].lq, BQ);
    if (nqb == 0) continue;
    const int64_t nch = std::min(nqb, per), step = div_up(nqb, nch);
    for (int64_t hk = 0; hk < Hkv; ++hk)
      for (int64_t c = 0; c < nqb; c += step) tasks.push_back({s, hk, c, std::min(nqb, c + step)});
  }

  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    Buf<ct> kt_buf, v_buf;
    std::vector<acc_t> S(BQ * BK), acc(BQ * Dv), m(BQ), l(BQ);
    std::vector<ct> Pt(BQ * BK), qbuf(q_direct ? 0 : BQ * D);
    std::vector<uint32_t> colh(BK);
    DropRow dr;
    dr.on = P.dropout();
    dr.threshold = P.threshold;
    dr.scale = 1.0 / (1.0 - P.dropout_p);
    for (int64_t t = t0; t < t1; ++t) {
      const Task& tk = tasks[t];
      const Span& sp = P.spans[tk.s];
      const int64_t hk = tk.hk;
      int64_t jbA, jbB;
      key_block_range(P, sp, tk.qb0 * BQ, std::min(tk.qb1 * BQ, sp.lq), BK, &jbA, &jbB);
      const int64_t nkb = jbB - jbA;
      ct* ktp = kt_buf.get(nkb * D * BK);
      ct* vp = v_direct ? nullptr : v_buf.get(nkb * BK * Dv);
      const scalar_t* kbase = k + sp.bi * P.ks0 + sp.ks * P.ks1 + hk * P.ks2;
      const scalar_t* vbase = v + sp.bi * P.vs0 + sp.ks * P.vs1 + hk * P.vs2;
      for (int64_t jb = jbA; jb < jbB; ++jb) {
        const int64_t k0 = jb * BK, nv = std::min(BK, sp.lk - k0);
        pack_transposed<ct, scalar_t>(kbase + k0 * P.ks1, P.ks1, nv, D, BK, ktp + (jb - jbA) * D * BK, kt_panel);
        if (!v_direct) pack_rows<ct, scalar_t>(vbase + k0 * P.vs1, P.vs1, nv, BK, Dv, vp + (jb - jbA) * BK * Dv);
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        for (int64_t qb = tk.qb0; qb < tk.qb1; ++qb) {
          const int64_t r0 = qb * BQ, M = std::min(BQ, sp.lq - r0);
          const scalar_t* qp = q + sp.bi * P.qs0 + (sp.qs + r0) * P.qs1 + h * P.qs2;
          const ct* A;
          int64_t lda;
          if (q_direct) {
            A = reinterpret_cast<const ct*>(qp);
            lda = P.qs1;
          } else {
            for (int64_t r = 0; r < M; ++r)
              for (int64_t d = 0; d < D; ++d) qbuf[r * D + d] = cvt<ct>(to_acc<acc_t>(qp[r * P.qs1 + d]));
            A = qbuf.data();
            lda = D;
          }
          std::fill(m.begin(), m.end(), kNegInf);
          std::fill(l.begin(), l.end(), acc_t(0));
          std::fill(acc.begin(), acc.begin() + M * Dv, acc_t(0));
          int64_t jb0, jb1;
          key_block_range(P, sp, r0, r0 + M, BK, &jb0, &jb1);
          int64_t lo_first, hi_first, lo_last, hi_last;
          P.range(sp, r0, &lo_first, &hi_first);
          P.range(sp, r0 + M - 1, &lo_last, &hi_last);
          for (int64_t jb = jb0; jb < jb1; ++jb) {
            const int64_t k0 = jb * BK, nv = std::min(BK, sp.lk - k0);
            // columns [cl, ch) of this block that some row sees, widened to the GEMM granularity
            const int64_t cl = std::max<int64_t>(lo_first - k0, 0) / CG * CG;
            const int64_t ch = std::min(round_up(std::min(hi_last - k0, nv), CG), vnni ? BK : nv);
            if (ch <= cl) continue;
            const ct* ktb = ktp + (jb - jbA) * D * BK;
            if constexpr (vnni) {
              if (kt_panel == BK)
                gemm_flat(M, ch - cl, D, A, lda, ktb + 2 * cl, BK, S.data() + cl, BK, false);
              else
                gemm(M, ch - cl, D, A, lda, ktb + cl * D, D, S.data() + cl, BK, false);
            } else {
              gemm(M, ch - cl, D, A, lda, ktb + cl, BK, S.data() + cl, BK, false);
            }
            if (dr.on)
              for (int64_t c = cl; c < std::min(ch, nv); ++c)
                colh[c] = fastnn::attn::dropout_col_hash(static_cast<uint32_t>(k0 + c), P.seed_hi);
#ifdef FASTNN_ATTN_AVX512
            if constexpr (std::is_same<acc_t, float>::value) {
              if (!transform && !dr.on) {  // the common case: 16 rows per step (softmax_rows16)
                for (int64_t rb = 0; rb < M; rb += 16) {
                  const int64_t R = std::min<int64_t>(16, M - rb);
                  int64_t c0s[16], c1s[16];
                  for (int64_t r = 0; r < R; ++r) {
                    int64_t lo, hi;
                    P.range(sp, r0 + rb + r, &lo, &hi);
                    c0s[r] = std::min(std::max<int64_t>(lo - k0, cl), ch);
                    c1s[r] = std::max(std::min<int64_t>(hi - k0, std::min(ch, nv)), c0s[r]);
                  }
                  alignas(64) float alpha[16];
                  softmax_rows16<ct>(R, S.data() + rb * BK, BK, c0s, c1s, cl, ch, static_cast<float>(P.scale),
                                     m.data() + rb, l.data() + rb, Pt.data() + rb * BK, BK, alpha);
                  for (int64_t r = 0; r < R; ++r)
                    if (alpha[r] != 1.0f) scale_row(acc.data() + (rb + r) * Dv, Dv, alpha[r]);
                }
                goto multiply_v;
              }
            }
#endif
            for (int64_t r = 0; r < M; ++r) {
              const int64_t i = r0 + r;
              int64_t lo, hi;
              P.range(sp, i, &lo, &hi);
              const int64_t c0 = std::min(std::max<int64_t>(lo - k0, cl), ch);
              const int64_t c1 = std::max(std::min<int64_t>(hi - k0, std::min(ch, nv)), c0);
              ct* prow = Pt.data() + r * BK;
              acc_t* srow = S.data() + r * BK;
              if (c0 >= c1) {
                zero_row(prow + cl, ch - cl);
                continue;
              }
              acc_t mx, sc;
              if (transform) {
                transform_row<acc_t>(P, sp, h, i, k0, srow, c0, c1, nullptr);
                mx = row_max(srow + c0, c1 - c0);
                sc = 1;
              } else {
                sc = static_cast<acc_t>(P.scale);
                mx = row_max(srow + c0, c1 - c0) * sc;
              }
              const acc_t mnew = std::max(m[r], mx);
              if (mnew == kNegInf) {
                zero_row(prow + cl, ch - cl);
                continue;
              }
              // the running max changes in few row blocks once the first has been seen: skip exp(0)
              const acc_t alpha = m[r] == kNegInf ? acc_t(0) : m[r] == mnew ? acc_t(1) : std::exp(m[r] - mnew);
              if (dr.on) {
                const uint64_t row = static_cast<uint64_t>(h) * static_cast<uint64_t>(P.total_q) +
                                     static_cast<uint64_t>(sp.tq + i);
                dr.row_hash = fastnn::attn::dropout_row_hash(static_cast<uint32_t>(row), P.seed_lo);
                dr.col_hash = colh.data() + c0;
              }
              // exp_row forms s * sc * log2e - m * log2e in one FMA. Where |m| is huge (a row under a finite
              // mask of finfo.min, an absurd scale) the rounding of m * log2e alone exceeds exp's range: the
              // row's max then overflows or vanishes (NaN / 0). Such segments first take s * sc - m, rounded
              // like m itself (0 for the max), and run the exp on that.
              acc_t row_sc = sc, row_sh = -mnew;
              const bool exact = std::abs(mnew) > kExactExpLimit;
              if (exact) {
                for (int64_t j = c0; j < c1; ++j) srow[j] = srow[j] * sc - mnew;
                row_sc = 1;
                row_sh = 0;
              }
              // without a transform the scores are finite (no masked -inf) and, unless exact, their exps within
              // range: no clamp in the exp
              const acc_t sum = transform || exact
                                    ? exp_row<acc_t, ct>(srow + c0, c1 - c0, row_sc, row_sh, prow + c0, dr)
                                    : exp_row<acc_t, ct, true>(srow + c0, c1 - c0, row_sc, row_sh, prow + c0, dr);
              zero_row(prow + cl, c0 - cl);
              zero_row(prow + c1, ch - c1);
              l[r] = l[r] * alpha + sum;
              m[r] = mnew;
              if (alpha != acc_t(1)) scale_row(acc.data() + r * Dv, Dv, alpha);
            }
#ifdef FASTNN_ATTN_AVX512
          multiply_v:
#endif
            if (v_direct) {
              const ct* vb = reinterpret_cast<const ct*>(vbase + (k0 + cl) * P.vs1);
              gemm(M, Dv, ch - cl, Pt.data() + cl, BK, vb, P.vs1, acc.data(), Dv, true);
            } else if (vnni) {
              gemm(M, Dv, ch - cl, Pt.data() + cl, BK, vp + (jb - jbA) * BK * Dv, BK, acc.data(), Dv, true, cl);
            } else {
              gemm(M, Dv, ch - cl, Pt.data() + cl, BK, vp + (jb - jbA) * BK * Dv + cl * Dv, Dv, acc.data(), Dv, true);
            }
          }
          for (int64_t r = 0; r < M; ++r) {
            const int64_t row = sp.qs + r0 + r;
            scalar_t* o = out + ((sp.bi * P.Lq + row) * H + h) * Dv;
            acc_t* lp = lse + (sp.bi * H + h) * P.Lq + row;
            if (m[r] == kNegInf || !(l[r] > 0)) {
              for (int64_t d = 0; d < Dv; ++d) o[d] = scalar_t(0);
              *lp = kNegInf;
            } else {
              const acc_t inv = acc_t(1) / l[r];
              const acc_t* a = acc.data() + r * Dv;
              for (int64_t d = 0; d < Dv; ++d) o[d] = static_cast<scalar_t>(a[d] * inv);
              *lp = m[r] + std::log(l[r]);
            }
          }
        }
      }
    }
    gemm_release<ct>();
  });
}

#ifdef FASTNN_ATTN_AVX512
// Decode-shaped fp32 problems (few query rows per kv head, no bias / softcap / dropout): one task per
// (sequence, kv head) puts the group's query heads and tokens in one block of M = G Lq rows (row
// r = i G + g) and reads K and V in place. S^T = K Q^T comes from one GEMM per key block with K as the
// A operand, so K is read once, where the general path transposes all of it into K^T blocks first
// (read, write, read again) for a GEMM of one row per head. Rows, masks and the finalisation follow
// forward_impl.
constexpr int64_t kDecodeBK = 512;
constexpr int64_t kDecodeMaxRows = 64;

bool decode_shaped(const Problem& P) {
  return !P.varlen && !needs_transform(P) && !P.dropout() && P.group * P.Lq <= kDecodeMaxRows;
}

void decode_impl(const Problem& P, const float* q, const float* k, const float* v, float* out, float* lse) {
  const int64_t D = P.D, Dv = P.Dv, G = P.group, Lq = P.Lq, H = P.H, Hkv = P.Hkv, M = G * Lq, BK = kDecodeBK;
  const int64_t nspan = static_cast<int64_t>(P.spans.size());
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, nspan * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> QT(D * M), ST(BK * M), S(M * BK), Pt(M * BK), acc(M * Dv), m(M), l(M);
    std::vector<int64_t> lo(M), hi(M);
    for (int64_t t = t0; t < t1; ++t) {
      const Span& sp = P.spans[t / Hkv];
      const int64_t hk = t % Hkv;
      int64_t klo = sp.lk, khi = 0;  // keys some row sees
      for (int64_t r = 0; r < M; ++r) {
        const int64_t i = r / G, g = r % G;
        P.range(sp, i, &lo[r], &hi[r]);
        if (lo[r] < hi[r]) klo = std::min(klo, lo[r]), khi = std::max(khi, hi[r]);
        const float* qr = q + sp.bi * P.qs0 + i * P.qs1 + (hk * G + g) * P.qs2;
        for (int64_t d = 0; d < D; ++d) QT[d * M + r] = qr[d];
      }
      std::fill(m.begin(), m.end(), ninf);
      std::fill(l.begin(), l.end(), 0.0f);
      std::fill(acc.begin(), acc.end(), 0.0f);
      const float* kbase = k + sp.bi * P.ks0 + hk * P.ks2;
      const float* vbase = v + sp.bi * P.vs0 + hk * P.vs2;
      for (int64_t k0 = klo; k0 < khi; k0 += BK) {
        const int64_t nv = std::min(BK, khi - k0);
        gemm(nv, M, D, kbase + k0 * P.ks1, P.ks1, QT.data(), M, ST.data(), M, false);
        transpose_tiled(ST.data(), M, nv, M, S.data(), BK);
        for (int64_t rb = 0; rb < M; rb += 16) {
          const int64_t R = std::min<int64_t>(16, M - rb);
          int64_t c0s[16], c1s[16];
          for (int64_t r = 0; r < R; ++r) {
            c0s[r] = std::min(std::max<int64_t>(lo[rb + r] - k0, 0), nv);
            c1s[r] = std::max(std::min<int64_t>(hi[rb + r] - k0, nv), c0s[r]);
          }
          alignas(64) float alpha[16];
          softmax_rows16<float>(R, S.data() + rb * BK, BK, c0s, c1s, 0, nv, static_cast<float>(P.scale),
                                m.data() + rb, l.data() + rb, Pt.data() + rb * BK, BK, alpha);
          for (int64_t r = 0; r < R; ++r)
            if (alpha[r] != 1.0f) scale_row(acc.data() + (rb + r) * Dv, Dv, alpha[r]);
        }
        gemm(M, Dv, nv, Pt.data(), BK, vbase + k0 * P.vs1, P.vs1, acc.data(), Dv, true);
      }
      for (int64_t r = 0; r < M; ++r) {
        const int64_t i = r / G, h = hk * G + r % G;
        float* o = out + ((sp.bi * Lq + i) * H + h) * Dv;
        float* lp = lse + (sp.bi * H + h) * Lq + i;
        if (m[r] == ninf || !(l[r] > 0)) {
          std::fill(o, o + Dv, 0.0f);
          *lp = ninf;
        } else {
          const float inv = 1.0f / l[r];
          for (int64_t d = 0; d < Dv; ++d) o[d] = acc[r * Dv + d] * inv;
          *lp = m[r] + std::log(l[r]);
        }
      }
    }
  });
}
#endif

}  // namespace
}  // namespace attn_detail

std::vector<at::Tensor> attention_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                          const c10::optional<at::Tensor>& cu_seqlens_q,
                                          const c10::optional<at::Tensor>& cu_seqlens_k,
                                          const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
                                          int64_t max_seqlen_k, const c10::optional<at::Tensor>& bias, double scale,
                                          double softcap, int64_t window_left, int64_t window_right, bool bottom_right,
                                          double dropout_p, int64_t seed) {
  using namespace attn_detail;
  (void)max_seqlen_q;
  (void)max_seqlen_k;
  Problem P = make_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, bias, scale, softcap, window_left,
                           window_right, bottom_right, dropout_p, seed);
  const auto dt = q.scalar_type();
  const auto lse_dt = dt == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor out = fastnn::new_output({P.B, P.Lq, P.H, P.Dv}, q.options());
  at::Tensor lse = fastnn::new_output({P.B, P.H, P.Lq}, q.options().dtype(lse_dt));
  if (P.varlen) {
    std::vector<std::pair<int64_t, int64_t>> cov;
    for (auto& s : P.spans) cov.emplace_back(s.qs, s.qs + s.lq);
    zero_uncovered_rows(out, cov);
    // lse of uncovered rows: -inf
    std::vector<char> c(P.Lq, 0);
    for (auto& s : P.spans)
      for (int64_t i = s.qs; i < s.qs + s.lq; ++i) c[i] = 1;
    for (int64_t h = 0; h < P.H; ++h)
      for (int64_t i = 0; i < P.Lq; ++i)
        if (!c[i]) {
          if (lse_dt == at::kDouble) lse.data_ptr<double>()[h * P.Lq + i] = -std::numeric_limits<double>::infinity();
          else lse.data_ptr<float>()[h * P.Lq + i] = -std::numeric_limits<float>::infinity();
        }
  }
  if (out.numel() == 0 && lse.numel() == 0) return {out, lse};
  const bool amx = dt == at::kBFloat16 && P.D % 16 == 0 && P.Dv % 16 == 0 && bf16_amx_available();
  switch (dt) {
    case at::kFloat:
#ifdef FASTNN_ATTN_AVX512
      if (decode_shaped(P)) {
        decode_impl(P, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(), out.data_ptr<float>(),
                    lse.data_ptr<float>());
        break;
      }
#endif
      forward_impl<float, float>(P, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                                 out.data_ptr<float>(), lse.data_ptr<float>());
      break;
    case at::kDouble:
      forward_impl<double, double>(P, q.data_ptr<double>(), k.data_ptr<double>(), v.data_ptr<double>(),
                                   out.data_ptr<double>(), lse.data_ptr<double>());
      break;
    case at::kHalf:
      forward_impl<at::Half, float>(P, q.data_ptr<at::Half>(), k.data_ptr<at::Half>(), v.data_ptr<at::Half>(),
                                    out.data_ptr<at::Half>(), lse.data_ptr<float>());
      break;
    case at::kBFloat16:
      if (amx)
        forward_impl<bf16, bf16>(P, q.data_ptr<bf16>(), k.data_ptr<bf16>(), v.data_ptr<bf16>(), out.data_ptr<bf16>(),
                                 lse.data_ptr<float>());
      else
        forward_impl<bf16, float>(P, q.data_ptr<bf16>(), k.data_ptr<bf16>(), v.data_ptr<bf16>(), out.data_ptr<bf16>(),
                                  lse.data_ptr<float>());
      break;
    default:
      TORCH_CHECK(false, "attention_forward_cpu: unsupported dtype ", dt);
  }
  return {out, lse};
}

}  // namespace cpu
}  // namespace fastnn
