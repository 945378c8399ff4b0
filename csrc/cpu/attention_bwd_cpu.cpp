// Fused attention backward on the CPU (flash-attention-2 style, recomputing P from the saved lse).
//
// Work split and determinism: one at::parallel_for task per (sequence, kv head). A task owns every
// gradient its heads touch: dK, dV of its keys (summed over the group's query heads: GQA), dQ of the
// group's query heads (an fp32 task-local accumulator) and dbias of those heads. Inside a task the
// order is fixed: key block (BK keys) -> query head of the group -> query block (BQ rows) visible
// from the key block. So no atomics and no float reduction whose order depends on the threads: the
// result is bit-identical from run to run and for any thread count.
//
// Per tile (query block i, key block j), with the GEMM operands packed once per task:
//   S = Q_i K_j^T, P = exp(scale S (softcap, bias, masks) - lse)      (recomputed)
//   dP = dO_i V_j^T, z = keep / (1 - p) (dropout; 1 without)
//   dS' = P (dP z - delta_i)  (= dbias),  dS = scale dS' (1 - tanh^2 with softcap)
//   dV_j^T += dO_i^T (P z),  dK_j^T += Q_i^T dS,  dQ_i += dS K_j
// with delta_i = rowsum(dO_i * O_i). dK^T / dV^T accumulate transposed so that every GEMM reads its
// A operand row-major (no transposed tile writes in the inner loop).
#include "../families/attention.h"
#include "attention_cpu_impl.h"

namespace fastnn {
namespace cpu {
namespace attn_detail {
namespace {

constexpr int64_t kBwdBQ = 64;   // even (VNNI pairs)
constexpr int64_t kBwdBK = 128;
constexpr int64_t kBwdBQvnni = 64;   // even (VNNI pairs)
constexpr int64_t kBwdBKvnni = 128;  // multiple of 64 (VNNI slabs)

struct BwdTensors {
  const void* dout;
  int64_t ds0, ds1, ds2;
  const void* out;
  int64_t os0, os1, os2;
  const void* lse;
  int64_t ls0, ls1, ls2;
};

template <typename scalar_t, typename ct>
void backward_impl(const Problem& P, const BwdTensors& T, const scalar_t* q, const scalar_t* k, const scalar_t* v,
                   scalar_t* dq, scalar_t* dk, scalar_t* dv, acc_of<ct>* dbias) {
  using acc_t = acc_of<ct>;
  constexpr int64_t BQ = is_vnni<ct>() ? kBwdBQvnni : kBwdBQ, BK = is_vnni<ct>() ? kBwdBKvnni : kBwdBK;
  const int64_t D = P.D, Dv = P.Dv, H = P.H, Hkv = P.Hkv, G = P.group;
  const int64_t nspan = static_cast<int64_t>(P.spans.size());
  const scalar_t* dout = static_cast<const scalar_t*>(T.dout);
  const scalar_t* outp = static_cast<const scalar_t*>(T.out);
  const acc_t* lsep = static_cast<const acc_t*>(T.lse);
  const bool transform = needs_transform(P);
  const bool direct = std::is_same<scalar_t, ct>::value;
  constexpr acc_t kNegInf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, nspan * Hkv, 1, [&](int64_t t0, int64_t t1) {
    std::vector<acc_t> S(BQ * BK), dP(BQ * BK), dsoft(P.softcap > 0 ? BQ * BK : 0);
    std::vector<ct> pd(BQ * BK), ds(BQ * BK), pdB(is_vnni<ct>() ? BQ * BK : 0), dsB(is_vnni<ct>() ? BQ * BK : 0);
    std::vector<acc_t> dKT(D * BK), dVT(Dv * BK);
    std::vector<uint32_t> colh(BK);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t s = t / Hkv, hk = t % Hkv;
      const Span& sp = P.spans[s];
      const int64_t lq = sp.lq, lk = sp.lk;
      const int64_t nqb = div_up(lq, BQ), nkb = div_up(lk, BK), lqp = nqb * BQ;
      const int64_t off = P.off(sp);

      if (dbias) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g;
          for (int64_t i = 0; i < lq; ++i)
            zero_row(dbias + ((sp.bi * H + h) * P.Lq + sp.qs + i) * P.Lk, P.Lk);
        }
      }
      // keys past seqused_k: zero gradients
      for (int64_t j = lk; j < sp.kspan; ++j) {
        scalar_t* a = dk + ((sp.bi * P.Lk + sp.ks + j) * Hkv + hk) * D;
        scalar_t* b = dv + ((sp.bi * P.Lk + sp.ks + j) * Hkv + hk) * Dv;
        for (int64_t d = 0; d < D; ++d) a[d] = scalar_t(0);
        for (int64_t d = 0; d < Dv; ++d) b[d] = scalar_t(0);
      }
      if (lq == 0 || lk == 0) {
        for (int64_t g = 0; g < G; ++g) {
          const int64_t h = hk * G + g;
          for (int64_t i = 0; i < lq; ++i) {
            scalar_t* a = dq + ((sp.bi * P.Lq + sp.qs + i) * H + h) * D;
            for (int64_t d = 0; d < D; ++d) a[d] = scalar_t(0);
          }
        }
        for (int64_t j = 0; j < lk; ++j) {
          scalar_t* a = dk + ((sp.bi * P.Lk + sp.ks + j) * Hkv + hk) * D;
          scalar_t* b = dv + ((sp.bi * P.Lk + sp.ks + j) * Hkv + hk) * Dv;
          for (int64_t d = 0; d < D; ++d) a[d] = scalar_t(0);
          for (int64_t d = 0; d < Dv; ++d) b[d] = scalar_t(0);
        }
        continue;
      }

      // ---- K side: K^T, V^T (B of S and dP) and K (B of dQ), per key block
      const scalar_t* kb = k + sp.bi * P.ks0 + sp.ks * P.ks1 + hk * P.ks2;
      const scalar_t* vb = v + sp.bi * P.vs0 + sp.ks * P.vs1 + hk * P.vs2;
      const bool k_direct = std::is_same<scalar_t, ct>::value && !is_vnni<ct>();
      auto KT = raw_buffer<ct>(nkb * D * BK);
      auto VT = raw_buffer<ct>(nkb * Dv * BK);
      auto Kn = raw_buffer<ct>(k_direct ? 0 : nkb * BK * D);
      for (int64_t jb = 0; jb < nkb; ++jb) {
        const int64_t k0 = jb * BK, nv = std::min(BK, lk - k0);
        pack_transposed<ct, scalar_t>(kb + k0 * P.ks1, P.ks1, nv, D, BK, KT.get() + jb * D * BK);
        pack_transposed<ct, scalar_t>(vb + k0 * P.vs1, P.vs1, nv, Dv, BK, VT.get() + jb * Dv * BK);
        if (!k_direct) pack_rows<ct, scalar_t>(kb + k0 * P.ks1, P.ks1, nv, BK, D, Kn.get() + jb * BK * D);
      }
      // ---- Q side, per head of the group: Q^T, dO^T (A of dK^T, dV^T; zero-padded to lqp columns),
      // Q, dO (A of S, dP) when they need converting, lse and delta per row.
      auto QT = raw_buffer<ct>(G * D * lqp);
      auto dOT = raw_buffer<ct>(G * Dv * lqp);
      std::vector<ct> Qc(direct ? 0 : G * lq * D), dOc(direct ? 0 : G * lq * Dv);
      std::vector<acc_t> lse_r(G * lq), delta(G * lq), dQacc(G * lq * D, acc_t(0));
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        const scalar_t* qh = q + sp.bi * P.qs0 + sp.qs * P.qs1 + h * P.qs2;
        const scalar_t* dh = dout + sp.bi * T.ds0 + sp.qs * T.ds1 + h * T.ds2;
        const scalar_t* oh = outp + sp.bi * T.os0 + sp.qs * T.os1 + h * T.os2;
        ct* qt = QT.get() + g * D * lqp;
        ct* dot = dOT.get() + g * Dv * lqp;
        if (direct) {
          transpose_tiled(reinterpret_cast<const ct*>(qh), P.qs1, lq, D, qt, lqp);
          transpose_tiled(reinterpret_cast<const ct*>(dh), T.ds1, lq, Dv, dot, lqp);
        } else {
          for (int64_t i = 0; i < lq; ++i) {
            for (int64_t d = 0; d < D; ++d) qt[d * lqp + i] = cvt<ct>(to_acc<acc_t>(qh[i * P.qs1 + d]));
            for (int64_t d = 0; d < Dv; ++d) dot[d * lqp + i] = cvt<ct>(to_acc<acc_t>(dh[i * T.ds1 + d]));
          }
          for (int64_t i = 0; i < lq; ++i) {
            for (int64_t d = 0; d < D; ++d) Qc[(g * lq + i) * D + d] = cvt<ct>(to_acc<acc_t>(qh[i * P.qs1 + d]));
            for (int64_t d = 0; d < Dv; ++d) dOc[(g * lq + i) * Dv + d] = cvt<ct>(to_acc<acc_t>(dh[i * T.ds1 + d]));
          }
        }
        for (int64_t d = 0; d < D; ++d) zero_row(qt + d * lqp + lq, lqp - lq);
        for (int64_t d = 0; d < Dv; ++d) zero_row(dot + d * lqp + lq, lqp - lq);
        for (int64_t i = 0; i < lq; ++i) {
          acc_t dl = 0;
          for (int64_t d = 0; d < Dv; ++d) dl += to_acc<acc_t>(dh[i * T.ds1 + d]) * to_acc<acc_t>(oh[i * T.os1 + d]);
          delta[g * lq + i] = dl;
          lse_r[g * lq + i] = lsep[sp.bi * T.ls0 + h * T.ls1 + (sp.qs + i) * T.ls2];
        }
      }

      DropRow dr;
      dr.on = P.dropout();
      dr.threshold = P.threshold;
      dr.scale = 1.0 / (1.0 - P.dropout_p);
      const acc_t scale = static_cast<acc_t>(P.scale);

      for (int64_t jb = 0; jb < nkb; ++jb) {
        const int64_t k0 = jb * BK, nv = std::min(BK, lk - k0);
        const int64_t ncomp = is_vnni<ct>() ? BK : nv;
        std::fill(dKT.begin(), dKT.end(), acc_t(0));
        std::fill(dVT.begin(), dVT.end(), acc_t(0));
        // query rows that can see a key of this block
        const int64_t i_lo = P.wr >= 0 ? std::max<int64_t>(0, k0 - off - P.wr) : 0;
        const int64_t i_hi = P.wl >= 0 ? std::min<int64_t>(lq, k0 + nv - off + P.wl) : lq;
        if (dr.on)
          for (int64_t c = 0; c < nv; ++c)
            colh[c] = fastnn::attn::dropout_col_hash(static_cast<uint32_t>(k0 + c), P.seed_hi);
        if (i_lo < i_hi) {
          for (int64_t g = 0; g < G; ++g) {
            const int64_t h = hk * G + g;
            const ct* Aq;
            const ct* Ado;
            int64_t ldq, lddo;
            if (direct) {
              Aq = reinterpret_cast<const ct*>(q + sp.bi * P.qs0 + sp.qs * P.qs1 + h * P.qs2);
              ldq = P.qs1;
              Ado = reinterpret_cast<const ct*>(dout + sp.bi * T.ds0 + sp.qs * T.ds1 + h * T.ds2);
              lddo = T.ds1;
            } else {
              Aq = Qc.data() + g * lq * D;
              ldq = D;
              Ado = dOc.data() + g * lq * Dv;
              lddo = Dv;
            }
            for (int64_t ib = i_lo / BQ; ib < div_up(i_hi, BQ); ++ib) {
              const int64_t r0 = ib * BQ, M = std::min(BQ, lq - r0);
              const int64_t Mk = is_vnni<ct>() ? round_up(M, 2) : M;
              gemm(M, ncomp, D, Aq + r0 * ldq, ldq, KT.get() + jb * D * BK, is_vnni<ct>() ? D : BK, S.data(), BK, false);
              gemm(M, ncomp, Dv, Ado + r0 * lddo, lddo, VT.get() + jb * Dv * BK, is_vnni<ct>() ? Dv : BK, dP.data(), BK, false);
              for (int64_t r = 0; r < M; ++r) {
                const int64_t i = r0 + r;
                int64_t lo, hi;
                P.range(sp, i, &lo, &hi);
                const int64_t c0 = std::min(std::max<int64_t>(lo - k0, 0), nv);
                const int64_t c1 = std::min(std::max<int64_t>(hi - k0, 0), nv);
                const acc_t lse_i = lse_r[g * lq + i];
                ct* pdr = pd.data() + r * BK;
                ct* dsr = ds.data() + r * BK;
                if (c0 >= c1 || lse_i == kNegInf) {
                  zero_row(pdr, ncomp);
                  zero_row(dsr, ncomp);
                  continue;
                }
                acc_t* srow = S.data() + r * BK;
                acc_t* dsoftr = P.softcap > 0 ? dsoft.data() + r * BK : nullptr;
                acc_t sc = scale;
                if (transform) {
                  transform_row<acc_t>(P, sp, h, i, k0, srow, c0, c1, dsoftr);
                  sc = 1;
                }
                if (dr.on) {
                  const uint64_t row = static_cast<uint64_t>(h) * static_cast<uint64_t>(P.total_q) +
                                       static_cast<uint64_t>(sp.tq + i);
                  dr.row_hash = fastnn::attn::dropout_row_hash(static_cast<uint32_t>(row), P.seed_lo);
                  dr.col_hash = colh.data() + c0;
                }
                acc_t* dbr = dbias ? dbias + ((sp.bi * H + h) * P.Lq + sp.qs + i) * P.Lk + sp.ks + k0 + c0 : nullptr;
                bwd_row<acc_t, ct>(srow + c0, dP.data() + r * BK + c0, dsoftr ? dsoftr + c0 : nullptr, c1 - c0, sc,
                                   -lse_i, delta[g * lq + i], scale, pdr + c0, dsr + c0, dbr, dr);
                zero_row(pdr, c0);
                zero_row(pdr + c1, ncomp - c1);
                zero_row(dsr, c0);
                zero_row(dsr + c1, ncomp - c1);
              }
              for (int64_t r = M; r < Mk; ++r) {
                zero_row(pd.data() + r * BK, ncomp);
                zero_row(ds.data() + r * BK, ncomp);
              }
              const ct* pB = pd.data();
              const ct* dB = ds.data();
              if (is_vnni<ct>()) {
                rowmajor_to_vnni(reinterpret_cast<const bf16*>(pd.data()), Mk, BK, reinterpret_cast<bf16*>(pdB.data()));
                rowmajor_to_vnni(reinterpret_cast<const bf16*>(ds.data()), Mk, BK, reinterpret_cast<bf16*>(dsB.data()));
                pB = pdB.data();
                dB = dsB.data();
              }
              gemm(Dv, ncomp, Mk, dOT.get() + g * Dv * lqp + r0, lqp, pB, is_vnni<ct>() ? Mk : BK, dVT.data(), BK, true);
              gemm(D, ncomp, Mk, QT.get() + g * D * lqp + r0, lqp, dB, is_vnni<ct>() ? Mk : BK, dKT.data(), BK, true);
              if (k_direct)
                gemm(M, D, ncomp, ds.data(), BK, reinterpret_cast<const ct*>(kb + k0 * P.ks1), P.ks1,
                     dQacc.data() + (g * lq + r0) * D, D, true);
              else
                gemm(M, D, ncomp, ds.data(), BK, Kn.get() + jb * BK * D, is_vnni<ct>() ? BK : D, dQacc.data() + (g * lq + r0) * D, D, true);
            }
          }
        }
        for (int64_t j = 0; j < nv; ++j) {
          scalar_t* a = dk + ((sp.bi * P.Lk + sp.ks + k0 + j) * Hkv + hk) * D;
          scalar_t* b = dv + ((sp.bi * P.Lk + sp.ks + k0 + j) * Hkv + hk) * Dv;
          for (int64_t d = 0; d < D; ++d) a[d] = static_cast<scalar_t>(dKT[d * BK + j]);
          for (int64_t d = 0; d < Dv; ++d) b[d] = static_cast<scalar_t>(dVT[d * BK + j]);
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        const int64_t h = hk * G + g;
        for (int64_t i = 0; i < lq; ++i) {
          scalar_t* a = dq + ((sp.bi * P.Lq + sp.qs + i) * H + h) * D;
          const acc_t* src = dQacc.data() + (g * lq + i) * D;
          for (int64_t d = 0; d < D; ++d) a[d] = static_cast<scalar_t>(src[d]);
        }
      }
    }
    gemm_release<ct>();
  });
}

}  // namespace
}  // namespace attn_detail

pybind11::tuple attention_backward(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                                   const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                   const c10::optional<at::Tensor>& cu_seqlens_q,
                                   const c10::optional<at::Tensor>& cu_seqlens_k,
                                   const c10::optional<at::Tensor>& seqused_k, int64_t max_seqlen_q,
                                   int64_t max_seqlen_k, const c10::optional<at::Tensor>& bias, bool bias_requires_grad,
                                   double scale, double softcap, int64_t window_left, int64_t window_right,
                                   bool bottom_right, double dropout_p, int64_t seed) {
  using namespace attn_detail;
  (void)max_seqlen_q;
  (void)max_seqlen_k;
  Problem P = make_problem(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, bias, scale, softcap, window_left,
                           window_right, bottom_right, dropout_p, seed);
  const auto dt = q.scalar_type();
  const auto lse_dt = dt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(dout.device().is_cpu() && out.device().is_cpu() && lse.device().is_cpu(),
              "attention_backward_cpu: dout, out, lse must be CPU tensors");
  TORCH_CHECK(dout.dim() == 4 && dout.size(0) == P.B && dout.size(1) == P.Lq && dout.size(2) == P.H &&
                  dout.size(3) == P.Dv,
              "attention_backward_cpu: dout must be (B, Lq, H, Dv) = (", P.B, ", ", P.Lq, ", ", P.H, ", ", P.Dv,
              "), got ", dout.sizes());
  TORCH_CHECK(out.sizes() == dout.sizes(), "attention_backward_cpu: out must have dout's shape, got ", out.sizes());
  TORCH_CHECK(dout.scalar_type() == dt && out.scalar_type() == dt, "attention_backward_cpu: dout and out must have q's dtype");
  TORCH_CHECK(dout.size(3) <= 1 || dout.stride(3) == 1, "attention_backward_cpu: dout's last dim must have stride 1");
  TORCH_CHECK(out.size(3) <= 1 || out.stride(3) == 1, "attention_backward_cpu: out's last dim must have stride 1");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == P.B && lse.size(1) == P.H && lse.size(2) == P.Lq,
              "attention_backward_cpu: lse must be (B, H, Lq), got ", lse.sizes());
  TORCH_CHECK(lse.scalar_type() == lse_dt, "attention_backward_cpu: lse must be ", lse_dt, ", got ", lse.scalar_type());

  const bool want_dbias = bias.has_value() && bias->scalar_type() != at::kBool && bias_requires_grad;
  at::Tensor dq = fastnn::new_output({P.B, P.Lq, P.H, P.D}, q.options());
  at::Tensor dk = fastnn::new_output({P.B, P.Lk, P.Hkv, P.D}, k.options());
  at::Tensor dv = fastnn::new_output({P.B, P.Lk, P.Hkv, P.Dv}, v.options());
  at::Tensor dbias;
  if (want_dbias) dbias = fastnn::new_output({P.B, P.H, P.Lq, P.Lk}, q.options().dtype(lse_dt));
  if (P.varlen) {
    std::vector<std::pair<int64_t, int64_t>> cq, ck;
    for (auto& s : P.spans) {
      cq.emplace_back(s.qs, s.qs + s.lq);
      ck.emplace_back(s.ks, s.ks + s.kspan);
    }
    zero_uncovered_rows(dq, cq);
    zero_uncovered_rows(dk, ck);
    zero_uncovered_rows(dv, ck);
  }
  BwdTensors T;
  T.dout = dout.data_ptr();
  T.ds0 = dout.stride(0), T.ds1 = dout.stride(1), T.ds2 = dout.stride(2);
  T.out = out.data_ptr();
  T.os0 = out.stride(0), T.os1 = out.stride(1), T.os2 = out.stride(2);
  T.lse = lse.data_ptr();
  T.ls0 = lse.stride(0), T.ls1 = lse.stride(1), T.ls2 = lse.stride(2);

  const bool amx = dt == at::kBFloat16 && P.D % 16 == 0 && P.Dv % 16 == 0 && bf16_amx_available();
  switch (dt) {
    case at::kFloat:
      backward_impl<float, float>(P, T, q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                                  dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
                                  want_dbias ? dbias.data_ptr<float>() : nullptr);
      break;
    case at::kDouble:
      backward_impl<double, double>(P, T, q.data_ptr<double>(), k.data_ptr<double>(), v.data_ptr<double>(),
                                    dq.data_ptr<double>(), dk.data_ptr<double>(), dv.data_ptr<double>(),
                                    want_dbias ? dbias.data_ptr<double>() : nullptr);
      break;
    case at::kHalf:
      backward_impl<at::Half, float>(P, T, q.data_ptr<at::Half>(), k.data_ptr<at::Half>(), v.data_ptr<at::Half>(),
                                     dq.data_ptr<at::Half>(), dk.data_ptr<at::Half>(), dv.data_ptr<at::Half>(),
                                     want_dbias ? dbias.data_ptr<float>() : nullptr);
      break;
    case at::kBFloat16:
      if (amx)
        backward_impl<bf16, bf16>(P, T, q.data_ptr<bf16>(), k.data_ptr<bf16>(), v.data_ptr<bf16>(),
                                  dq.data_ptr<bf16>(), dk.data_ptr<bf16>(), dv.data_ptr<bf16>(),
                                  want_dbias ? dbias.data_ptr<float>() : nullptr);
      else
        backward_impl<bf16, float>(P, T, q.data_ptr<bf16>(), k.data_ptr<bf16>(), v.data_ptr<bf16>(),
                                   dq.data_ptr<bf16>(), dk.data_ptr<bf16>(), dv.data_ptr<bf16>(),
                                   want_dbias ? dbias.data_ptr<float>() : nullptr);
      break;
    default:
      TORCH_CHECK(false, "attention_backward_cpu: unsupported dtype ", dt);
  }
  if (want_dbias) return pybind11::make_tuple(dq, dk, dv, dbias);
  return pybind11::make_tuple(dq, dk, dv, pybind11::none());
}

}  // namespace cpu
}  // namespace fastnn
