// See comm.h.
#include "comm.h"

#include <torch/csrc/distributed/c10d/GroupRegistry.hpp>

namespace ring_ext {
namespace ring {

Group resolve_group(const std::string& name, const char* what) {
  TORCH_CHECK(!name.empty(), "ring_ext: ", what, " process group name is empty");
  return c10d::resolve_process_group(name);
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
  TORCH_INTERNAL_ASSERT(out.is_contiguous() && in.is_contiguous());
  std::vector<at::Tensor> send_buf{out}, recv_buf{in};
  Transfer t;
  const c10::DeviceType device = out.device().type();
  const bool coalesce = group->getBackend(device)->supportsCoalescing();
  if (coalesce) group->startCoalescing(device);
  auto send = group->send(send_buf, static_cast<int>(dst), tag);
  auto recv = group->recv(recv_buf, static_cast<int>(src), tag);
  if (coalesce) {
    auto work = group->endCoalescing(device);
    if (work) t.works_.push_back(work);
    return t;
  }
  t.works_.push_back(send);
  t.works_.push_back(recv);
  return t;
}

}  // namespace ring
}  // namespace ring_ext
