// State dicts: read PyTorch `torch.save(model.state_dict())` files, write files Python's
// `torch.load` reads, and move named tensors in and out of a torch::nn::Module by name.
#pragma once
#include <string>
#include <utility>
#include <vector>
#include <ATen/ATen.h>
#include <torch/nn/module.h>

namespace keel::models {

// Named tensors in order (file order when read, module order when taken from a module).
using StateDict = std::vector<std::pair<std::string, at::Tensor>>;

// Reads a torch.save() zip file whose top-level object is a dict or OrderedDict of tensors
// (e.g. `torch.save(model.state_dict(), path)`). Tensors that shared a storage in Python share
// one here. Throws std::runtime_error naming the path on any file, format or content problem.
StateDict read_state_dict(const std::string& path);

// The same reader on the bytes of such a file held in memory; `name` stands for the path in messages
// (the checkpoint fuzz target, fuzz/fuzz_checkpoint.cpp, feeds it).
StateDict read_state_dict_bytes(const std::string& bytes, const std::string& name);

// The bytes of `sd` as the torch.save() zip write_state_dict() writes (a plain dict of contiguous
// CPU tensors); `name` stands for the file in messages (an undefined tensor, a duplicate key).
std::string state_dict_bytes(const StateDict& sd, const std::string& name);

// Writes `sd` as a plain dict of CPU tensors that Python's torch.load() and read_state_dict()
// read. Atomic and durable: the bytes go to a fresh, uniquely named `path + ".tmp.XXXXXX"` (created
// with O_EXCL, so a file or symlink planted at any name is never written through), which gets exactly
// `mode` (the umask does not apply), is fsynced and renamed over `path`; then the directory is fsynced.
// Any failure, a failed fsync of the directory included, throws std::runtime_error naming the path.
void write_state_dict(const StateDict& sd, const std::string& path, unsigned mode = 0600);

// The module's parameters and buffers in torchvision's state_dict() order and naming
// ("layer1.0.conv1.weight", "bn1.running_mean", "bn1.num_batches_tracked"), detached.
StateDict state_dict_of(const torch::nn::Module& m);

// Copies `sd` into `m` by name, converting dtype/device to the destination's. Strict: throws
// std::runtime_error listing every missing key, unexpected key, duplicate key and shape mismatch
// when anything differs; `m` is left unchanged in that case.
void load_state_dict(torch::nn::Module& m, const StateDict& sd);

}  // namespace keel::models
