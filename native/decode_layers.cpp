// A decode step's layers in one call, for the CPU decoder (kvd/worker/decoder.py). Python's
// per-layer loop issues a dozen ops a layer, each a few microseconds of interpreter,
// argument conversion and tensor views around kernels that, at one to a few rows, take a
// few microseconds themselves: on SmolLM2-135M's GGUF at batch 1 that was 3 of a step's
// 5 ms of forward (docs/benchmarks.md). Here the same ops, in the
// same order on the same buffers, are called from C++: the results are the Python loop's
// bit for bit (tests/worker/test_decode_layers.py).
//
//   DecodeLayers(eps, heads, kv_heads, head_dim, scale, isa)
//   .add_layer(input_norm, post_norm, q_norm, k_norm, qkv, o, gate_up, down)
//       each matrix a tuple (w, d, m, kind, bias or None): a QuantLinear's tiled blocks (w the
//       quants, kind 0-2), or a PackedLinear's oneDNN weight (w; kind -1, d and m unused);
//       q_norm / k_norm None but for Qwen3's per-head norms.
//   .forward(h, cos, sin, caches, slots, block_table, lens, final_norm) -> x
//       h (N, E) the embeddings, every row a decode query; cos / sin (N, D); caches one
//       (2, NB, BS, KVH, D) a layer; slots (N,); block_table (N, MB) and lens (N,) as
//       paged_decode_attention takes them. Returns the final-normed hidden states (N, E).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <optional>
#include <tuple>
#include <vector>

// fused.cpp
void rms_norm(torch::Tensor out, torch::Tensor x, torch::Tensor weight, double eps);
void add_rms_norm(torch::Tensor x, torch::Tensor residual, torch::Tensor weight, double eps);
void rope_neox_cache(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos, torch::Tensor sin,
                     torch::Tensor cache, torch::Tensor slots);
void silu_and_mul(torch::Tensor out, torch::Tensor x);
// paged_attention.cpp
void paged_decode_attention(torch::Tensor out, torch::Tensor q, torch::Tensor cache, torch::Tensor block_table,
                            torch::Tensor lens, double scale);
// quant_linear.cpp
void quant_linear(torch::Tensor out, torch::Tensor x, torch::Tensor qs, torch::Tensor d, torch::Tensor m,
                  int64_t kind, bool int_dot, int64_t isa);

namespace {

using Matrix = std::tuple<torch::Tensor, torch::Tensor, torch::Tensor, int64_t, std::optional<torch::Tensor>>;

constexpr int64_t kPacked = -1;  // a matrix's kind: a oneDNN packed float weight (linear.ONEDNN_KIND)

// PackedLinear's call (kvd/worker/linear.py): mkldnn::_linear_pointwise(x, w, bias, "none", [], "")
torch::Tensor packed_linear(const torch::Tensor& x, const torch::Tensor& w, const std::optional<torch::Tensor>& bias) {
  static const c10::OperatorHandle op =
      c10::Dispatcher::singleton().findSchemaOrThrow("mkldnn::_linear_pointwise", "");
  // the call's constant arguments, made once (120 calls a step at SmolLM2's 30 layers)
  static const c10::IValue attr(std::string("none")), no_scalars(c10::impl::GenericList(
      c10::OptionalType::create(c10::NumberType::get()))), no_algorithm(std::string(""));
  std::vector<c10::IValue> stack{x, w, bias ? c10::IValue(*bias) : c10::IValue(), attr, no_scalars, no_algorithm};
  op.callBoxed(&stack);
  return stack[0].toTensor();
}

struct Linear {
  torch::Tensor w, d, m;
  int64_t kind, out_features;
  std::optional<torch::Tensor> bias;

  explicit Linear(const Matrix& mat)
      : w(std::get<0>(mat)), d(std::get<1>(mat)), m(std::get<2>(mat)), kind(std::get<3>(mat)),
        out_features(std::get<0>(mat).size(0)), bias(std::get<4>(mat)) {
    TORCH_CHECK(kind == kPacked || (kind >= 0 && kind <= 2), "add_layer: matrix kind ", kind, " unknown");
  }

  // x (M, K) -> (M, N): quantized, activations rounded to int8 as QuantLinear's decode rows
  torch::Tensor operator()(const torch::Tensor& x, int64_t isa) const {
    if (kind == kPacked) return packed_linear(x, w, bias);
    torch::Tensor out = at::empty({x.size(0), out_features}, x.options());
    quant_linear(out, x, w, d, m, kind, true, isa);
    if (bias) out.add_(*bias);
    return out;
  }
};

struct Layer {
  torch::Tensor input_norm, post_norm;
  std::optional<torch::Tensor> q_norm, k_norm;
  Linear qkv, o, gate_up, down;
};

class DecodeLayers {
 public:
  DecodeLayers(double eps, int64_t heads, int64_t kv_heads, int64_t head_dim, double scale, int64_t isa)
      : eps_(eps), H_(heads), KVH_(kv_heads), D_(head_dim), scale_(scale), isa_(isa) {}

  void add_layer(torch::Tensor input_norm, torch::Tensor post_norm, std::optional<torch::Tensor> q_norm,
                 std::optional<torch::Tensor> k_norm, const Matrix& qkv, const Matrix& o, const Matrix& gate_up,
                 const Matrix& down) {
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "add_layer: q_norm and k_norm come together");
    const Linear lin_qkv(qkv);
    TORCH_CHECK(lin_qkv.out_features == (H_ + 2 * KVH_) * D_, "add_layer: qkv has ", lin_qkv.out_features,
                " outputs, not (heads + 2 kv_heads) * head_dim");
    layers_.push_back(Layer{input_norm, post_norm, q_norm, k_norm, lin_qkv, Linear(o), Linear(gate_up), Linear(down)});
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  torch::Tensor forward(torch::Tensor h, torch::Tensor cos, torch::Tensor sin, std::vector<torch::Tensor> caches,
                        torch::Tensor slots, torch::Tensor block_table, torch::Tensor lens, torch::Tensor final_norm) {
    const int64_t L = num_layers();
    TORCH_CHECK(L > 0, "DecodeLayers: no layers");
    TORCH_CHECK(static_cast<int64_t>(caches.size()) == L, "DecodeLayers: ", caches.size(), " caches for ", L,
                " layers");
    TORCH_CHECK(h.dim() == 2 && h.is_contiguous(), "DecodeLayers: h must be a contiguous (N, E)");
    const int64_t n = h.size(0), qd = H_ * D_, kvd = KVH_ * D_;
    torch::Tensor residual = h;
    torch::Tensor x = at::empty_like(h);
    rms_norm(x, h, layers_[0].input_norm, eps_);
    for (int64_t i = 0; i < L; ++i) {
      const Layer& layer = layers_[i];
      torch::Tensor qkv = layer.qkv(x, isa_);  // (N, (H + 2 KVH) D)
      torch::Tensor q = qkv.narrow(1, 0, qd).view({n, H_, D_});
      torch::Tensor k = qkv.narrow(1, qd, kvd).view({n, KVH_, D_});
      torch::Tensor v = qkv.narrow(1, qd + kvd, kvd).view({n, KVH_, D_});
      if (layer.q_norm) {  // Qwen3 normalises each head before the rotation
        q = q.contiguous();
        k = k.contiguous();
        rms_norm(q.view({-1, D_}), q.view({-1, D_}), *layer.q_norm, eps_);
        rms_norm(k.view({-1, D_}), k.view({-1, D_}), *layer.k_norm, eps_);
      }
      rope_neox_cache(q, k, v, cos, sin, caches[i], slots);  // rotated; k, v into their cache slots
      torch::Tensor qc = q.contiguous();
      torch::Tensor o = at::empty_like(qc);  // (N, H, D)
      paged_decode_attention(o, qc, caches[i], block_table, lens, scale_);
      x = layer.o(o.view({n, qd}), isa_);  // (N, E)
      add_rms_norm(x, residual, layer.post_norm, eps_);  // residual += attention; x = norm
      torch::Tensor gu = layer.gate_up(x, isa_);  // (N, 2I)
      torch::Tensor act = at::empty({n, gu.size(1) / 2}, gu.options());
      silu_and_mul(act, gu);
      x = layer.down(act, isa_);  // (N, E)
      add_rms_norm(x, residual, i + 1 < L ? layers_[i + 1].input_norm : final_norm, eps_);
    }
    return x;
  }

 private:
  double eps_;
  int64_t H_, KVH_, D_;
  double scale_;
  int64_t isa_;
  std::vector<Layer> layers_;
};

}  // namespace

void register_decode_layers(pybind11::module& m) {
  pybind11::class_<DecodeLayers>(m, "DecodeLayers")
      .def(pybind11::init<double, int64_t, int64_t, int64_t, double, int64_t>())
      .def("add_layer", &DecodeLayers::add_layer)
      .def("num_layers", &DecodeLayers::num_layers)
      .def("forward", &DecodeLayers::forward, pybind11::call_guard<pybind11::gil_scoped_release>());
}
