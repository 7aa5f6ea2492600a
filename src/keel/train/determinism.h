// Deterministic mode (train.deterministic): the process-wide switches that make a run bit-for-bit
// reproducible, and the intra-op thread count a resumed deterministic run must keep.
#pragma once
#include <cstdint>
#include <string>

namespace keel::train {

// On: LibTorch's deterministic algorithms (an op without a deterministic implementation throws,
// naming itself), oneDNN's deterministic mode where the LibTorch has the switch (2.x), cuDNN
// deterministic without autotuning, and CUBLAS_WORKSPACE_CONFIG=:4096:8 for cuBLAS when it is not
// set already (cuBLAS reads it when its handle is created). Off: LibTorch's defaults again.
void set_deterministic(bool on);

// Whether set_deterministic(true) is in effect (LibTorch's own flag).
bool deterministic();

// In deterministic mode a resumed run must partition reductions like the run that wrote the
// checkpoint: when `checkpoint_threads` > 0 differs from the current intra-op thread count, sets it
// and returns a note saying so; otherwise returns "".
std::string keep_checkpoint_threads(int64_t checkpoint_threads);

}  // namespace keel::train
