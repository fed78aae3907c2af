// The fused NLSTM's per-step pointwise work on the CPU, one pass per time step and level.
//
// training/nlstm_native.py compiles this file on first use (torch.utils.cpp_extension) and
// training/nlstm_fused.py's `sequence_forward` / `sequence_backward` call it between their matrix
// products. Without it every step and level runs ~20 small torch ops on (B, H) blocks, each a
// separate pass with its own dispatch; here each kernel reads and writes every element once.
// The math is that of the pure-PyTorch loops in training/nlstm_fused.py (the fallback):
// gates in torch.nn.LSTM's order (i, f, g, o), sigmoid as torch computes it, 1 / (1 + exp(-x)),
// tanh through ATen's vectorised Sleef tanh. Tensors are (B, features) row blocks whose rows
// are contiguous (any row stride); every kernel works row by row, one vector of columns at a
// time. Shapes: G (B, 4H) gates, activated in place in the forward; c, tanh c, h (B, H);
// [u, v] and its gradient (B, 2H).
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/extension.h>

#include <algorithm>
#include <vector>

namespace {

using at::Tensor;
using at::vec::Vectorized;

template <typename T>
struct Rows {  // row b of a (B, features) block with contiguous rows, from column `col`
  T* p;
  int64_t stride;
  Rows(const Tensor& t, int64_t col = 0)
      : p(t.data_ptr<T>() + col), stride(t.stride(0)) {}
  // an optional block: every row is nullptr when it is absent
  explicit Rows(const c10::optional<Tensor>& t)
      : p(t ? t->data_ptr<T>() : nullptr), stride(t ? t->stride(0) : 0) {}
  T* row(int64_t b) const { return p ? p + b * stride : nullptr; }
};

template <typename T>
inline Vectorized<T> load(const T* p, int64_t n) {
  return n == Vectorized<T>::size() ? Vectorized<T>::loadu(p) : Vectorized<T>::loadu(p, n);
}

template <typename T>
inline void store(const Vectorized<T>& v, T* p, int64_t n) {
  v.store(p, static_cast<int>(n));
}

template <typename T>
inline Vectorized<T> sigmoid(const Vectorized<T>& x) {  // as torch's CPU sigmoid kernel
  return (Vectorized<T>(T(1)) + (Vectorized<T>(T(0)) - x).exp()).reciprocal();
}

// Runs body(b) for every row b of a (B, features) block, the rows split across torch's intra-op
// threads when each share has at least ROW_GRAIN gate elements (4H per row), else inline on the
// calling thread. Rows are independent, so the result is the same on any number of threads.
constexpr int64_t ROW_GRAIN = 16384;

template <typename F>
inline void for_rows(int64_t B, int64_t H, const F& body) {
  const int64_t grain = std::max<int64_t>(1, ROW_GRAIN / (4 * H));
  at::parallel_for(0, B, grain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) body(b);
  });
}

template <typename T>
struct Gates {
  Vectorized<T> i, f, g, o;
};

// Columns j .. j + n of one row of raw (i, f, g, o) gates, plus the same columns of `add_row`
// when it is not null (level 0's input projection: the product h W^T and xproj[t] are summed
// here, as the product's own post-op would, in float32): sigmoid on i, f, o, tanh on g when
// `tanh_g` (the identity otherwise), written back in place and returned.
template <typename T>
inline Vectorized<T> raw(const T* g_row, const T* add_row, int64_t col, int64_t n) {
  return add_row ? load(g_row + col, n) + load(add_row + col, n) : load(g_row + col, n);
}

template <typename T>
inline Gates<T> activate(T* g_row, const T* add_row, int64_t H, int64_t j, int64_t n,
                         bool tanh_g) {
  Gates<T> a{sigmoid(raw(g_row, add_row, j, n)), sigmoid(raw(g_row, add_row, H + j, n)),
             raw(g_row, add_row, 2 * H + j, n), sigmoid(raw(g_row, add_row, 3 * H + j, n))};
  if (tanh_g) a.g = a.g.tanh();
  store(a.i, g_row + j, n);
  store(a.f, g_row + H + j, n);
  store(a.g, g_row + 2 * H + j, n);
  store(a.o, g_row + 3 * H + j, n);
  return a;
}

void check(const Tensor& t, const Tensor& like, int64_t cols, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.dim() == 2 && t.scalar_type() == like.scalar_type(),
              name, ": a 2-d CPU tensor of ", like.scalar_type(), " expected");
  TORCH_CHECK(t.size(0) == like.size(0) && t.size(1) == cols && t.stride(1) == 1, name,
              ": (", like.size(0), ", ", cols, ") with contiguous rows expected, got ",
              t.sizes(), " strides ", t.strides());
}

// Activates level k's gates (in place) and writes what it hands down to level k + 1:
// u = i * g (eq. 8), v = f * c_k(t-1) (eq. 7).
template <typename T>
void down_impl(const Tensor& G, const Tensor& c_prev, const Tensor& uv, bool tanh_g,
               const c10::optional<Tensor>& add) {
  using V = Vectorized<T>;
  const int64_t B = G.size(0), H = G.size(1) / 4;
  Rows<T> gr(G), cr(c_prev), uvr(uv);
  const Rows<T> ar(add);
  for_rows(B, H, [&](int64_t b) {
    T* g_row = gr.row(b);
    const T* a_row = ar.row(b);
    const T* c_row = cr.row(b);
    T* uv_row = uvr.row(b);
    for (int64_t j = 0; j < H; j += V::size()) {
      const int64_t n = std::min<int64_t>(V::size(), H - j);
      const Gates<T> a = activate(g_row, a_row, H, j, n, tanh_g);
      store(a.i * a.g, uv_row + j, n);
      store(a.f * load(c_row + j, n), uv_row + H + j, n);
    }
  });
}

// The innermost level's gates (activated in place) and memory c = f * c(t-1) + i * g, then the
// walk up: each level's memory is the output of the level below, c_{k-1} = o_k * tanh(c_k),
// and h = o_0 * tanh(c_0). gates[k]: level k's activated (B, 4H) gates (the innermost's raw);
// mem_out[k]: c_k(t); tanh_out[k]: tanh c_k(t); h_out: h_t. `add`: summed into the innermost
// gates before their activation (a one-level cell's input projection), or none.
template <typename T>
void up_impl(const std::vector<Tensor>& gates, const Tensor& c_prev, bool tanh_g,
             const std::vector<Tensor>& mem_out, const std::vector<Tensor>& tanh_out,
             const Tensor& h_out, const c10::optional<Tensor>& add) {
  using V = Vectorized<T>;
  const int64_t D = gates.size(), B = h_out.size(0), H = h_out.size(1);
  std::vector<Rows<T>> gr, mr, tr;
  for (int64_t k = 0; k < D; ++k) {
    gr.emplace_back(gates[k]);
    mr.emplace_back(mem_out[k]);
    tr.emplace_back(tanh_out[k]);
  }
  Rows<T> cr(c_prev), hr(h_out);
  const Rows<T> ar(add);
  for_rows(B, H, [&](int64_t b) {
    T* g_row = gr[D - 1].row(b);
    const T* a_row = ar.row(b);
    const T* c_row = cr.row(b);
    for (int64_t j = 0; j < H; j += V::size()) {
      const int64_t n = std::min<int64_t>(V::size(), H - j);
      const Gates<T> a = activate(g_row, a_row, H, j, n, tanh_g);
      V c = a.f * load(c_row + j, n) + a.i * a.g;
      for (int64_t k = D - 1; k >= 0; --k) {
        store(c, mr[k].row(b) + j, n);
        V tc = c.tanh();
        store(tc, tr[k].row(b) + j, n);
        c = (k == D - 1 ? a.o : load(gr[k].row(b) + 3 * H + j, n)) * tc;
      }
      store(c, hr.row(b) + j, n);
    }
  });
}

// Columns j .. j + n of one level's i, f, g pre-activation gradients (into the row `da`) from
// the gradients du of u = i * g and dv of v = f * c(t-1), and the gradient dv * f that flows into
// c(t-1) (into `dc_row`). g_row holds the level's activated gates.
template <typename T>
inline void input_gate_grads(const T* g_row, const T* c_row, T* da, T* dc_row, int64_t H,
                             int64_t j, int64_t n, Vectorized<T> du, Vectorized<T> dv,
                             bool tanh_g) {
  const Vectorized<T> one(T(1));
  Vectorized<T> i = load(g_row + j, n), f = load(g_row + H + j, n), g = load(g_row + 2 * H + j, n);
  store(du * g * (i - i * i), da + j, n);
  store(dv * load(c_row + j, n) * (f - f * f), da + H + j, n);
  store(du * i * (tanh_g ? one - g * g : one), da + 2 * H + j, n);
  store(dv * f, dc_row + j, n);
}

// The innermost and the output chain of the backward at one step. d_out starts as dh (+ d_hs):
// for k = 0.. D-1, level k's output gate gets d o_k * o_k (1 - o_k) with d o_k = d_out tanh c_k,
// dc[k] (the gradient of c_k(t) from later steps) gains o_k (1 - tanh^2 c_k) d_out, and d_out
// becomes dc[k]. Then the innermost memory c = f c(t-1) + i g: its i, f, g pre-activation
// gradients, and dc[D-1] becomes what flows into c(t-1), dc f.
template <typename T>
void back_inner_impl(const Tensor& dh, const c10::optional<Tensor>& d_hs,
                     const std::vector<Tensor>& gates, const std::vector<Tensor>& tanh_mems,
                     const std::vector<Tensor>& dc, const std::vector<Tensor>& d_gates,
                     const Tensor& c_prev, bool tanh_g) {
  using V = Vectorized<T>;
  const int64_t D = gates.size(), B = dh.size(0), H = dh.size(1);
  std::vector<Rows<T>> gr, tr, dcr, dar;
  for (int64_t k = 0; k < D; ++k) {
    gr.emplace_back(gates[k]);
    tr.emplace_back(tanh_mems[k]);
    dcr.emplace_back(dc[k]);
    dar.emplace_back(d_gates[k]);
  }
  Rows<T> dhr(dh), cr(c_prev);
  const Rows<T> dsr(d_hs);
  const V one(T(1));
  for_rows(B, H, [&](int64_t b) {
    for (int64_t j = 0; j < H; j += V::size()) {
      const int64_t n = std::min<int64_t>(V::size(), H - j);
      V d_out = load(dhr.row(b) + j, n);
      if (const T* ds = dsr.row(b)) d_out = d_out + load(ds + j, n);
      for (int64_t k = 0; k < D; ++k) {
        V o = load(gr[k].row(b) + 3 * H + j, n), tc = load(tr[k].row(b) + j, n);
        store(d_out * tc * (o - o * o), dar[k].row(b) + 3 * H + j, n);
        T* dc_p = dcr[k].row(b) + j;
        d_out = load(dc_p, n) + o * (one - tc * tc) * d_out;
        store(d_out, dc_p, n);
      }
      // the innermost memory c = v + u: d u = d v = d c
      input_gate_grads(gr[D - 1].row(b), cr.row(b), dar[D - 1].row(b), dcr[D - 1].row(b), H, j,
                       n, d_out, d_out, tanh_g);
    }
  });
}

// Level k < D-1 of the backward at one step, once [d u, d v] (the gradient of what it handed
// down) is known: its i, f, g pre-activation gradients (o's came from back_inner), and dc
// becomes what flows into c_k(t-1), d v * f.
template <typename T>
void back_level_impl(const Tensor& d_uv, const Tensor& G, const Tensor& c_prev,
                     const Tensor& dA, const Tensor& dc, bool tanh_g) {
  using V = Vectorized<T>;
  const int64_t B = G.size(0), H = G.size(1) / 4;
  Rows<T> dr(d_uv), gr(G), cr(c_prev), ar(dA), dcr(dc);
  for_rows(B, H, [&](int64_t b) {
    const T *g_row = gr.row(b), *d_row = dr.row(b);
    T* da = ar.row(b);
    for (int64_t j = 0; j < H; j += V::size()) {
      const int64_t n = std::min<int64_t>(V::size(), H - j);
      input_gate_grads(g_row, cr.row(b), da, dcr.row(b), H, j, n, load(d_row + j, n),
                       load(d_row + H + j, n), tanh_g);
    }
  });
}

void down(const Tensor& G, const Tensor& c_prev, const Tensor& uv, bool tanh_g,
          const c10::optional<Tensor>& add) {
  const int64_t H = G.size(1) / 4;
  check(G, G, 4 * H, "gates");
  check(c_prev, G, H, "c_prev");
  check(uv, G, 2 * H, "uv");
  if (add) check(*add, G, 4 * H, "add");
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "nlstm_down",
                             [&] { down_impl<scalar_t>(G, c_prev, uv, tanh_g, add); });
}

void up(const std::vector<Tensor>& gates, const Tensor& c_prev, bool tanh_g,
        const std::vector<Tensor>& mem_out, const std::vector<Tensor>& tanh_out,
        const Tensor& h_out, const c10::optional<Tensor>& add) {
  const int64_t D = gates.size(), H = h_out.size(1);
  TORCH_CHECK(D >= 1 && mem_out.size() == gates.size() && tanh_out.size() == gates.size(),
              "one gates, memory and tanh tensor per level expected");
  for (int64_t k = 0; k < D; ++k) {
    check(gates[k], h_out, 4 * H, "gates");
    check(mem_out[k], h_out, H, "mem_out");
    check(tanh_out[k], h_out, H, "tanh_out");
  }
  check(c_prev, h_out, H, "c_prev");
  if (add) check(*add, h_out, 4 * H, "add");
  AT_DISPATCH_FLOATING_TYPES(h_out.scalar_type(), "nlstm_up", [&] {
    up_impl<scalar_t>(gates, c_prev, tanh_g, mem_out, tanh_out, h_out, add);
  });
}

void back_inner(const Tensor& dh, const c10::optional<Tensor>& d_hs,
                const std::vector<Tensor>& gates, const std::vector<Tensor>& tanh_mems,
                const std::vector<Tensor>& dc, const std::vector<Tensor>& d_gates,
                const Tensor& c_prev, bool tanh_g) {
  const int64_t D = gates.size(), H = dh.size(1);
  TORCH_CHECK(D >= 1 && tanh_mems.size() == gates.size() && dc.size() == gates.size() &&
                  d_gates.size() == gates.size(),
              "one gates, tanh, dc and d_gates tensor per level expected");
  if (d_hs.has_value()) check(*d_hs, dh, H, "d_hs");
  for (int64_t k = 0; k < D; ++k) {
    check(gates[k], dh, 4 * H, "gates");
    check(tanh_mems[k], dh, H, "tanh_mems");
    check(dc[k], dh, H, "dc");
    check(d_gates[k], dh, 4 * H, "d_gates");
  }
  check(c_prev, dh, H, "c_prev");
  AT_DISPATCH_FLOATING_TYPES(dh.scalar_type(), "nlstm_back_inner", [&] {
    back_inner_impl<scalar_t>(dh, d_hs, gates, tanh_mems, dc, d_gates, c_prev, tanh_g);
  });
}

void back_level(const Tensor& d_uv, const Tensor& G, const Tensor& c_prev, const Tensor& dA,
                const Tensor& dc, bool tanh_g) {
  const int64_t H = G.size(1) / 4;
  check(G, G, 4 * H, "gates");
  check(d_uv, G, 2 * H, "d_uv");
  check(c_prev, G, H, "c_prev");
  check(dA, G, 4 * H, "d_gates");
  check(dc, G, H, "dc");
  AT_DISPATCH_FLOATING_TYPES(G.scalar_type(), "nlstm_back_level",
                             [&] { back_level_impl<scalar_t>(d_uv, G, c_prev, dA, dc, tanh_g); });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("down", &down, "activate level k's gates (+ add) in place; write [i*g, f*c_prev] into uv",
        py::arg("G"), py::arg("c_prev"), py::arg("uv"), py::arg("tanh_g"),
        py::arg("add") = py::none());
  m.def("up", &up, "the innermost level's update (gates + add) and the walk up to h",
        py::arg("gates"), py::arg("c_prev"), py::arg("tanh_g"), py::arg("mem_out"),
        py::arg("tanh_out"), py::arg("h_out"), py::arg("add") = py::none());
  m.def("back_inner", &back_inner, "the backward's output chain and innermost level");
  m.def("back_level", &back_level, "the backward of one outer level, given [d u, d v]");
}
