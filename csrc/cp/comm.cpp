// See comm.h.
#include "comm.h"

#include <ATen/ATen.h>

#include <atomic>
#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

namespace ring_ext {
namespace ring {

namespace {

// A new TensorImpl over t's storage that refers to no other tensor: created below the view-tracking
// key, so it has no autograd view metadata pointing at t (which Python may own). Note [Tensors
// handed to c10d].
at::Tensor unowned_alias(const at::Tensor& t) {
  at::AutoDispatchBelowADInplaceOrView below_views;
  return at::alias(t);
}

// Every byte sent to another rank from this process (benchmarks and the transfer tests read it).
std::atomic<int64_t> sent_bytes_{0};

}  // namespace

Group resolve_group(const std::string& name, const char* what) {
  TORCH_CHECK(!name.empty(), "ring_ext: ", what, " process group name is empty");
  try {
    return c10d::resolve_process_group(name);
  } catch (const c10::Error&) {
    TORCH_CHECK(
        false, "ring_ext: the ", what, " process group (\"", name,
        "\") of this context no longer exists: was torch.distributed.destroy_process_group() "
        "called? A context lives as long as its process groups; after init_process_group, "
        "call ring_ext.initialize again");
  }
}

void Transfer::wait() {
  for (auto& work : works_) work->wait();
  works_.clear();
}

void Transfer::settle() noexcept {
  for (auto& work : works_) {
    try {
      work->wait();
    } catch (...) {  // a dead peer: its error is (or will be) reported by the failing operator
    }
  }
  works_.clear();
}

Transfer& Transfer::operator=(Transfer&& other) noexcept {
  if (this != &other) {
    settle();
    works_ = std::move(other.works_);
    other.works_.clear();
  }
  return *this;
}

Transfer exchange(const Group& group, const at::Tensor& out, int64_t dst, const at::Tensor& in,
                  int64_t src, int tag) {
  TORCH_INTERNAL_ASSERT((!out.defined() || out.is_contiguous()) &&
                        (!in.defined() || in.is_contiguous()));
  Transfer t;
  if (!out.defined() && !in.defined()) return t;
  const c10::DeviceType device = (out.defined() ? out : in).device().type();
  const bool coalesce = group->getBackend(device)->supportsCoalescing();
  if (coalesce) group->startCoalescing(device);
  // Aliases: the backend may hold its buffers past wait() (Note [Tensors handed to c10d]).
  if (out.defined()) {
    std::vector<at::Tensor> send_buf{unowned_alias(out)};
    t.works_.push_back(group->send(send_buf, static_cast<int>(dst), tag));
    count_sent(static_cast<int64_t>(out.nbytes()));
  }
  if (in.defined()) {
    std::vector<at::Tensor> recv_buf{unowned_alias(in)};
    t.works_.push_back(group->recv(recv_buf, static_cast<int>(src), tag));
  }
  if (coalesce) {
    t.works_.clear();  // the coalesced work stands for both
    if (auto work = group->endCoalescing(device)) t.works_.push_back(work);
  }
  return t;
}

void count_sent(int64_t bytes) { sent_bytes_ += bytes; }

int64_t sent_bytes_op() { return sent_bytes_.load(); }

std::vector<at::Tensor> all_gather_op(const at::Tensor& x, const std::string& group) {
  const Group pg = resolve_group(group, "all_gather");
  std::vector<at::Tensor> in{unowned_alias(x.contiguous())};
  std::vector<std::vector<at::Tensor>> parts(1);
  for (int r = 0; r < pg->getSize(); ++r) parts[0].push_back(at::empty_like(in[0]));
  pg->allgather(parts, in)->wait();
  std::vector<at::Tensor> out;  // new TensorImpls for Python; the Work keeps its own
  for (const at::Tensor& part : parts[0]) out.push_back(unowned_alias(part));
  return out;
}

void all_reduce_op(at::TensorList xs, const std::string& group, const std::string& op) {
  TORCH_CHECK(op == "sum" || op == "max", "ring_ext.all_reduce: op must be 'sum' or 'max', got '",
              op, "'");
  if (xs.empty()) return;
  for (const at::Tensor& x : xs) {
    TORCH_CHECK(x.scalar_type() == xs[0].scalar_type() && x.device() == xs[0].device(),
                "ring_ext.all_reduce: every tensor must have the dtype and device of the first (",
                xs[0].scalar_type(), ", ", xs[0].device(), "), got ", x.scalar_type(), ", ",
                x.device());
  }
  const Group pg = resolve_group(group, "all_reduce");
  std::vector<at::Tensor> flat_parts;
  for (const at::Tensor& x : xs) flat_parts.push_back(x.reshape(-1));
  std::vector<at::Tensor> flat{at::cat(flat_parts)};  // ours alone (Note [Tensors handed to c10d])
  c10d::AllreduceOptions options;
  options.reduceOp = op == "sum" ? c10d::ReduceOp::SUM : c10d::ReduceOp::MAX;
  pg->allreduce(flat, options)->wait();
  int64_t offset = 0;
  for (const at::Tensor& x : xs) {
    x.copy_(flat[0].narrow(0, offset, x.numel()).view(x.sizes()));
    offset += x.numel();
  }
}

}  // namespace ring
}  // namespace ring_ext
