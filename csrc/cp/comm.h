// Point-to-point transfers of the ring over a c10d process group (ulysses.cpp has the
// all-to-alls), and the two collectives of the Python API (all_gather for unshard and the
// cross-rank check, all_reduce_ for the training-loop helpers). Device-generic: Gloo with CPU
// tensors, NCCL with CUDA tensors.
//
// Note [Tensors handed to c10d]
// -----------------------------
// A collective's Work keeps its tensors until the backend's own thread (a Gloo worker, the NCCL
// watchdog) lets go of it, which can be after the caller's wait() returned. If that is the last
// reference to a tensor Python has seen, the thread must take the GIL to free the Python object;
// if the interpreter is finalising by then (a rank exiting right after its last collective, with
// its process group kept alive past destroy_process_group, e.g. by a cached context or by
// torch._dynamo), CPython ends the thread with pthread_exit inside a noexcept destructor and the
// process aborts: "terminate called without an active exception" (docs/reliability.md,
// Teardown). So every tensor ring_ext gives c10d is a C++-only object made here: a buffer we
// allocated, or an alias (a new TensorImpl over the caller's storage) of the caller's tensor;
// what we return to Python is never the object the Work holds.
//
// Note [Streams and waits]
// ------------------------
// c10d already gives the CUDA semantics the ring needs, so this file adds no stream code:
// ProcessGroupNCCL runs every send/recv on its own communication stream, which first waits on the
// caller's current stream (so a buffer is complete before it is sent), and Work::wait() makes the
// *current* stream wait on the transfer's completion event without blocking the host. Compute is
// enqueued on the caller's current stream, so outputs are ready on that stream when the op
// returns and the host never synchronises inside the loop. On Gloo, wait() blocks the host until
// the transfer is done, which is what CPU compute needs. Backends that support coalescing (NCCL)
// get each send/recv pair as one group call, so a ring of any size and any shift cannot deadlock.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <vector>

#include "schedule.h"

namespace ring_ext {
namespace ring {

using Group = c10::intrusive_ptr<c10d::ProcessGroup>;

// Gloo matches messages by (peer, tag): one tag per kind of transfer.
inline int tag_of(Payload what) { return 7101 + static_cast<int>(what); }

Group resolve_group(const std::string& name, const char* what);

// An in-flight send/recv pair; wait() is a no-op on an empty one. A Transfer never outlives its
// transfer: one still pending when it is destroyed or overwritten (an operator failing half-way) is
// waited first, so no buffer of ours is in flight once an operator has returned or thrown
// (docs/design.md, Teardown).
class Transfer {
 public:
  Transfer() = default;
  Transfer(Transfer&& other) noexcept : works_(std::move(other.works_)) { other.works_.clear(); }
  Transfer& operator=(Transfer&& other) noexcept;
  Transfer(const Transfer&) = delete;
  Transfer& operator=(const Transfer&) = delete;
  ~Transfer() { settle(); }
  void wait();
  bool pending() const { return !works_.empty(); }

 private:
  friend Transfer exchange(const Group&, const at::Tensor&, int64_t, const at::Tensor&, int64_t,
                           int);
  void settle() noexcept;  // waits, swallowing errors: the operator is already failing
  std::vector<c10::intrusive_ptr<c10d::Work>> works_;
};

// Posts send(out -> dst) and recv(in <- src), group-local ranks; buffers contiguous, an undefined
// one not posted.
Transfer exchange(const Group& group, const at::Tensor& out, int64_t dst, const at::Tensor& in,
                  int64_t src, int tag);

// ring_ext::sent_bytes: the bytes this process has sent to other ranks so far, by exchange() and
// by Ulysses' all-to-alls (which report theirs with count_sent).
int64_t sent_bytes_op();
void count_sent(int64_t bytes);

// ring_ext::all_gather: every rank's x (same shape and dtype on every rank), in group-rank order.
std::vector<at::Tensor> all_gather_op(const at::Tensor& x, const std::string& group);

// ring_ext::all_reduce_: reduces xs (one dtype and device) over the group in place, op "sum" or
// "max", with one collective over a flat buffer.
void all_reduce_op(at::TensorList xs, const std::string& group, const std::string& op);

}  // namespace ring
}  // namespace ring_ext
