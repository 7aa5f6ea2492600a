// The c10d backends keel uses: Gloo (CPU) and, in CUDA builds, NCCL. The one file that includes their
// headers. ProcessGroupGloo.hpp is compiled against Debian's libgloo-dev headers (the PyPI wheel ships
// none); the Gloo code itself is inside libtorch_cpu.so, so only declarations must match. They do for
// libgloo-dev 0.0~git20220518 with both LibTorch 1.13 and 2.14 (docs/distributed.md).
#ifndef USE_C10D_GLOO  // the wheel's TorchConfig defines it; Debian's does not
#define USE_C10D_GLOO 1
#endif
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
// NCCL: in keel's CUDA builds against a LibTorch built with it (the wheel defines USE_C10D_NCCL); nccl.h
// comes from the wheel's nvidia-nccl package (CMakeLists.txt: KEEL_NCCL_INCLUDE).
#if defined(KEEL_CUDA) && defined(USE_C10D_NCCL) && defined(KEEL_HAVE_NCCL_H)
#define KEEL_NCCL 1
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <fmt/format.h>

#include "keel/dist/group.h"

namespace keel::dist {
namespace {

template <class PG>
struct GroupOf : Group {
  explicit GroupOf(c10::intrusive_ptr<PG> p) : pg(std::move(p)) {}
  ~GroupOf() override {
    if (leaked) (void)pg.release();  // never destroyed: its worker threads may be blocked on a dead peer
  }
  c10::intrusive_ptr<c10d::Work> allreduce(std::vector<at::Tensor>& t) override { return pg->allreduce(t); }
  c10::intrusive_ptr<c10d::Work> broadcast(std::vector<at::Tensor>& t, int64_t root) override {
    c10d::BroadcastOptions bo;
    bo.rootRank = root;
    return pg->broadcast(t, bo);
  }
  void leak() override { leaked = true; }
  c10::intrusive_ptr<PG> pg;
  bool leaked = false;
};

}  // namespace

std::unique_ptr<Group> make_gloo_group(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                       const CommOptions& o) {
  auto opts = c10d::ProcessGroupGloo::Options::create();
  opts->timeout = std::chrono::milliseconds(static_cast<int64_t>(o.timeout_seconds * 1000));
  opts->devices.push_back(o.interface.empty() ? c10d::ProcessGroupGloo::createDefaultDevice()
                                              : c10d::ProcessGroupGloo::createDeviceForInterface(o.interface));
  return std::make_unique<GroupOf<c10d::ProcessGroupGloo>>(
      c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, opts));
}

#ifdef KEEL_NCCL
std::unique_ptr<Group> make_nccl_group(const c10::intrusive_ptr<c10d::Store>& store, int rank, int size,
                                       const CommOptions& o) {
  // Tensors live on this rank's GPU (the trainer puts the model on cuda:LOCAL_RANK). NCCL's own watchdog
  // enforces the timeout (it tears the process down on a stuck collective: TORCH_NCCL_ASYNC_ERROR_HANDLING).
  auto opts = c10d::ProcessGroupNCCL::Options::create();
  opts->timeout = std::chrono::milliseconds(static_cast<int64_t>(o.timeout_seconds * 1000));
  return std::make_unique<GroupOf<c10d::ProcessGroupNCCL>>(
      c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, size, opts));
}
#else
std::unique_ptr<Group> make_nccl_group(const c10::intrusive_ptr<c10d::Store>&, int, int, const CommOptions&) {
  throw DistError("dist.backend = \"nccl\": this keel build has no NCCL (it needs keel's CUDA code paths, a "
                  "LibTorch built with NCCL such as the PyPI wheel's, and a CUDA toolkit's headers for "
                  "ProcessGroupNCCL.hpp; CMake's 'keel:' lines say which was missing); use dist.backend = \"gloo\" "
                  "with run.device = \"cpu\"");
}
#endif

}  // namespace keel::dist
