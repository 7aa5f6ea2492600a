// State dict I/O: a strict unpickler for torch.save() state-dict files (LibTorch 1.13's
// pickle_load aborts on their collections.OrderedDict), a writer on torch::jit::pickle_save,
// and name-based transfer between state dicts and modules.
// One file, past 600 lines: the unpickler is one state machine over the pickle opcodes, and the writer and
// the name-based transfer share its tensor and storage bookkeeping.
#include "keel/models/state_dict.h"
#include "keel/models/net.h"

#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/pickle.h>
#include <torch/utils.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <unordered_map>
#include <unordered_set>

namespace keel::models {
namespace {

// One unpickled Python object of the subset a state dict uses. Every Value is owned by the
// Unpickler's arena and referenced by plain pointers, so that memoised references see later
// SETITEMS/APPENDS, as in Python, and a container that holds itself (a memo cycle, which a damaged
// file can build) neither leaks nor recurses when freed.
struct Value;
using ValuePtr = Value*;

struct Value {
  enum class Kind { kNone, kBool, kInt, kFloat, kString, kTuple, kList, kDict, kGlobal, kStorage, kTensor };
  Kind kind = Kind::kNone;
  int64_t i = 0;                                        // kBool, kInt
  double f = 0.0;                                       // kFloat
  std::string s;                                        // kString; kGlobal: "module.name"
  std::vector<ValuePtr> items;                          // kTuple, kList
  std::vector<std::pair<ValuePtr, ValuePtr>> entries;   // kDict, in insertion order
  at::Tensor t;                                         // kTensor; kStorage: flat 1-D tensor
};

// Python-ish name of a value's kind, for error messages.
const char* kind_name(Value::Kind k) {
  switch (k) {
    case Value::Kind::kNone: return "None";
    case Value::Kind::kBool: return "bool";
    case Value::Kind::kInt: return "int";
    case Value::Kind::kFloat: return "float";
    case Value::Kind::kString: return "str";
    case Value::Kind::kTuple: return "tuple";
    case Value::Kind::kList: return "list";
    case Value::Kind::kDict: return "dict";
    case Value::Kind::kGlobal: return "global";
    case Value::Kind::kStorage: return "storage";
    case Value::Kind::kTensor: return "tensor";
  }
  return "?";
}

// Element type of a legacy typed storage class ("torch.FloatStorage"); nullopt if not one.
std::optional<at::ScalarType> storage_dtype(const std::string& global) {
  static const std::map<std::string, at::ScalarType> kTypes = {
      {"torch.FloatStorage", at::kFloat},     {"torch.DoubleStorage", at::kDouble},
      {"torch.HalfStorage", at::kHalf},       {"torch.BFloat16Storage", at::kBFloat16},
      {"torch.LongStorage", at::kLong},       {"torch.IntStorage", at::kInt},
      {"torch.ShortStorage", at::kShort},     {"torch.CharStorage", at::kChar},
      {"torch.ByteStorage", at::kByte},       {"torch.BoolStorage", at::kBool},
      {"torch.ComplexFloatStorage", at::kComplexFloat},
      {"torch.ComplexDoubleStorage", at::kComplexDouble}};
  auto it = kTypes.find(global);
  if (it == kTypes.end()) return std::nullopt;
  return it->second;
}

const std::unordered_set<std::string>& known_callables() {
  static const std::unordered_set<std::string> kNames = {
      "collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_parameter",
      // torch::jit::pickle_save tags typed containers with this; it returns its first argument.
      "torch.jit._pickle.restore_type_tag"};
  return kNames;
}

// Reads storages of one archive by key, once each, so tensors that shared a storage share one.
class StorageLoader {
 public:
  StorageLoader(const std::string& path, caffe2::serialize::PyTorchStreamReader& reader)
      : path_(path), reader_(reader) {}

  // The whole storage `key` as a flat tensor of `numel` elements of `dtype`.
  at::Tensor load(const std::string& key, at::ScalarType dtype, int64_t numel) {
    auto it = cache_.find(key);
    if (it != cache_.end()) {
      if (it->second.scalar_type() != dtype || it->second.numel() != numel)
        throw std::runtime_error("read_state_dict: " + path_ + ": storage '" + key + "' is referenced as " +
                                 std::string(c10::toString(dtype)) + "[" + std::to_string(numel) +
                                 "] and as " + std::string(c10::toString(it->second.scalar_type())) + "[" +
                                 std::to_string(it->second.numel()) + "]; expected one type and size");
      return it->second;
    }
    const std::string record = "data/" + key;
    if (!reader_.hasRecord(record))
      throw std::runtime_error("read_state_dict: " + path_ + ": missing record '" + record + "' (storage of " +
                               std::to_string(numel) + " " + c10::toString(dtype) +
                               " elements referenced by data.pkl)");
    at::DataPtr data;
    size_t bytes = 0;
    try {
      std::tie(data, bytes) = reader_.getRecord(record);
    } catch (const c10::Error& e) {
      throw std::runtime_error("read_state_dict: " + path_ + ": cannot read record '" + record +
                               "': " + e.what_without_backtrace());
    }
    const size_t element = c10::elementSize(dtype);
    const size_t need = static_cast<uint64_t>(numel) <= bytes / element ? static_cast<size_t>(numel) * element : SIZE_MAX;
    if (bytes < need)
      throw std::runtime_error("read_state_dict: " + path_ + ": record '" + record + "' has " +
                               std::to_string(bytes) + " bytes; expected " +
                               (need == SIZE_MAX ? std::string("more") : std::to_string(need)) + " (" +
                               std::to_string(numel) + " x " + c10::toString(dtype) + ")");
    at::Tensor t = at::empty({numel}, at::TensorOptions().dtype(dtype));
    if (need > 0) std::memcpy(t.data_ptr(), data.get(), need);
    cache_.emplace(key, t);
    return t;
  }

 private:
  std::string path_;
  caffe2::serialize::PyTorchStreamReader& reader_;
  std::unordered_map<std::string, at::Tensor> cache_;
};

// A strict pickle interpreter for the opcodes torch.save (protocol 2) and
// torch::jit::pickle_save write for a dict of tensors; anything else is an error.
class Unpickler {
 public:
  Unpickler(const std::string& path, const uint8_t* data, size_t size, StorageLoader& storages)
      : path_(path), data_(data), size_(size), storages_(storages) {}

  // Runs the program up to STOP and returns the object it built.
  ValuePtr run() {
    while (true) {
      op_pos_ = pos_;
      op_ = u8();
      switch (op_) {
        case 0x80: u8(); break;                     // PROTO
        case 0x95: u64(); break;                    // FRAME: a length hint only
        case 'c': op_global(); break;               // GLOBAL
        case 'q': memo_put(u8()); break;            // BINPUT
        case 'r': memo_put(u32()); break;           // LONG_BINPUT
        case 0x94: memo_put(static_cast<uint32_t>(memo_.size())); break;  // MEMOIZE
        case 'h': memo_get(u8()); break;            // BINGET
        case 'j': memo_get(u32()); break;           // LONG_BINGET
        case '}': push(make(Value::Kind::kDict)); break;   // EMPTY_DICT
        case ']': push(make(Value::Kind::kList)); break;   // EMPTY_LIST
        case ')': push(make(Value::Kind::kTuple)); break;  // EMPTY_TUPLE
        case '(': marks_.push_back(stack_.size()); break;  // MARK
        case 't': push(tuple_of(pop_mark())); break;       // TUPLE
        case 0x85: op_tuple_n(1); break;                   // TUPLE1
        case 0x86: op_tuple_n(2); break;                   // TUPLE2
        case 0x87: op_tuple_n(3); break;                   // TUPLE3
        case 'X': push_string(u32()); break;               // BINUNICODE
        case 0x8c: push_string(u8()); break;               // SHORT_BINUNICODE
        case 0x8d: push_string(u64()); break;              // BINUNICODE8
        case 'J': push_int(static_cast<int32_t>(u32())); break;  // BININT
        case 'K': push_int(u8()); break;                   // BININT1
        case 'M': push_int(u16()); break;                  // BININT2
        case 0x8a: op_long1(); break;                      // LONG1
        case 'G': op_binfloat(); break;                    // BINFLOAT
        case 0x88: push_bool(true); break;                 // NEWTRUE
        case 0x89: push_bool(false); break;                // NEWFALSE
        case 'N': push(make(Value::Kind::kNone)); break;   // NONE
        case 'Q': op_binpersid(); break;                   // BINPERSID
        case 'R': op_reduce(); break;                      // REDUCE
        case 's': op_setitem(); break;                     // SETITEM
        case 'u': op_setitems(); break;                    // SETITEMS
        case 'a': op_append(); break;                      // APPEND
        case 'e': op_appends(); break;                     // APPENDS
        case 'b': op_build(); break;                       // BUILD
        case '.': {                                        // STOP
          if (stack_.size() != 1) fail("STOP with " + std::to_string(stack_.size()) + " objects on the stack; expected 1");
          return stack_.back();
        }
        default: {
          std::ostringstream os;
          os << "unsupported pickle opcode 0x" << std::hex << static_cast<int>(op_) << std::dec;
          if (op_ >= 0x20 && op_ < 0x7f) os << " ('" << static_cast<char>(op_) << "')";
          os << "; expected one of the protocol-2 opcodes torch.save writes for a dict of tensors";
          fail(os.str());
        }
      }
    }
  }

 private:
  ValuePtr make(Value::Kind k) {
    arena_.push_back(std::make_unique<Value>());
    arena_.back()->kind = k;
    return arena_.back().get();
  }

  [[noreturn]] void fail(const std::string& what) const {
    std::ostringstream os;
    os << "read_state_dict: " << path_ << ": data.pkl offset " << op_pos_ << " (opcode 0x" << std::hex
       << static_cast<int>(op_) << std::dec << "): " << what;
    throw std::runtime_error(os.str());
  }

  const uint8_t* take(size_t n) {
    if (n > size_ - pos_) {
      fail("truncated: needs " + std::to_string(n) + " more bytes at offset " + std::to_string(pos_) +
           ", data.pkl has " + std::to_string(size_));
    }
    const uint8_t* p = data_ + pos_;
    pos_ += n;
    return p;
  }
  // Little-endian unsigned integer of n bytes.
  uint64_t le(size_t n) {
    const uint8_t* p = take(n);
    uint64_t v = 0;
    for (size_t k = 0; k < n; ++k) v |= static_cast<uint64_t>(p[k]) << (8 * k);
    return v;
  }
  uint8_t u8() { return static_cast<uint8_t>(le(1)); }
  uint16_t u16() { return static_cast<uint16_t>(le(2)); }
  uint32_t u32() { return static_cast<uint32_t>(le(4)); }
  uint64_t u64() { return le(8); }
  std::string line() {
    std::string s;
    while (true) {
      char c = static_cast<char>(*take(1));
      if (c == '\n') return s;
      s.push_back(c);
    }
  }

  void push(ValuePtr v) { stack_.push_back(std::move(v)); }
  ValuePtr pop() {
    if (stack_.empty() || (!marks_.empty() && stack_.size() <= marks_.back())) fail("stack underflow");
    ValuePtr v = stack_.back();
    stack_.pop_back();
    return v;
  }
  ValuePtr& top() {
    if (stack_.empty()) fail("stack underflow");
    return stack_.back();
  }
  // Pops everything above the last MARK, in push order.
  std::vector<ValuePtr> pop_mark() {
    if (marks_.empty()) fail("no MARK on the stack");
    size_t m = marks_.back();
    marks_.pop_back();
    std::vector<ValuePtr> items(stack_.begin() + static_cast<std::ptrdiff_t>(m), stack_.end());
    stack_.resize(m);
    return items;
  }
  ValuePtr tuple_of(std::vector<ValuePtr> items) {
    auto v = make(Value::Kind::kTuple);
    v->items = std::move(items);
    return v;
  }
  void op_tuple_n(size_t n) {
    std::vector<ValuePtr> items(n);
    for (size_t k = n; k-- > 0;) items[k] = pop();
    push(tuple_of(std::move(items)));
  }
  void push_string(uint64_t n) {
    auto v = make(Value::Kind::kString);
    const uint8_t* p = take(n);
    v->s.assign(reinterpret_cast<const char*>(p), n);
    push(v);
  }
  void push_int(int64_t i) {
    auto v = make(Value::Kind::kInt);
    v->i = i;
    push(v);
  }
  void push_bool(bool b) {
    auto v = make(Value::Kind::kBool);
    v->i = b;
    push(v);
  }
  void op_long1() {
    size_t n = u8();
    if (n > 8) fail("LONG1 of " + std::to_string(n) + " bytes; expected at most 8 (int64)");
    uint64_t v = n ? le(n) : 0;
    if (n > 0 && n < 8 && (v >> (8 * n - 1)) & 1) v |= ~uint64_t{0} << (8 * n);  // sign-extend
    push_int(static_cast<int64_t>(v));
  }
  void op_binfloat() {
    const uint8_t* p = take(8);
    uint64_t bits = 0;
    for (int k = 0; k < 8; ++k) bits = (bits << 8) | p[k];  // big-endian
    auto v = make(Value::Kind::kFloat);
    std::memcpy(&v->f, &bits, sizeof(double));
    push(v);
  }
  void memo_put(uint32_t idx) { memo_[idx] = top(); }
  void memo_get(uint32_t idx) {
    auto it = memo_.find(idx);
    if (it == memo_.end()) fail("memo index " + std::to_string(idx) + " was never stored");
    push(it->second);
  }
  void op_global() {
    std::string module = line();
    std::string name = line();
    std::string full = module + "." + name;
    if (!known_callables().count(full) && !storage_dtype(full))
      fail("unsupported global '" + full + "'; expected collections.OrderedDict, torch._utils._rebuild_tensor_v2, "
           "torch._utils._rebuild_parameter or a typed storage class such as torch.FloatStorage");
    auto v = make(Value::Kind::kGlobal);
    v->s = full;
    push(v);
  }
  void op_binpersid() {
    ValuePtr pid = pop();
    if (pid->kind != Value::Kind::kTuple || pid->items.size() != 5 ||
        pid->items[0]->kind != Value::Kind::kString || pid->items[0]->s != "storage")
      fail("persistent id is not ('storage', storage_type, key, location, numel)");
    const ValuePtr& type = pid->items[1];
    const ValuePtr& key = pid->items[2];
    const ValuePtr& numel = pid->items[4];
    if (type->kind != Value::Kind::kGlobal) fail("persistent id storage type is a " + std::string(kind_name(type->kind)));
    auto dtype = storage_dtype(type->s);
    if (!dtype) fail("persistent id storage type '" + type->s + "'; expected a typed storage such as torch.FloatStorage");
    if (key->kind != Value::Kind::kString) fail("persistent id key is a " + std::string(kind_name(key->kind)) + ", expected str");
    if (numel->kind != Value::Kind::kInt || numel->i < 0) fail("persistent id numel is not a non-negative int");
    auto v = make(Value::Kind::kStorage);
    v->t = storages_.load(key->s, *dtype, numel->i);
    push(v);
  }
  std::vector<int64_t> int_tuple(const ValuePtr& v, const char* what) {
    if (v->kind != Value::Kind::kTuple) fail(std::string(what) + " is a " + kind_name(v->kind) + ", expected a tuple of ints");
    std::vector<int64_t> out;
    for (const auto& e : v->items) {
      if (e->kind != Value::Kind::kInt) fail(std::string(what) + " holds a " + kind_name(e->kind) + ", expected ints");
      out.push_back(e->i);
    }
    return out;
  }
  // torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata]).
  ValuePtr rebuild_tensor(const std::vector<ValuePtr>& a) {
    if (a.size() != 6 && a.size() != 7)
      fail("_rebuild_tensor_v2 with " + std::to_string(a.size()) + " arguments; expected 6 or 7");
    if (a[0]->kind != Value::Kind::kStorage) fail("_rebuild_tensor_v2 storage argument is a " + std::string(kind_name(a[0]->kind)));
    if (a[1]->kind != Value::Kind::kInt || a[1]->i < 0) fail("_rebuild_tensor_v2 offset is not a non-negative int");
    const at::Tensor& storage = a[0]->t;
    int64_t offset = a[1]->i;
    auto size = int_tuple(a[2], "_rebuild_tensor_v2 size");
    auto stride = int_tuple(a[3], "_rebuild_tensor_v2 stride");
    if (size.size() != stride.size())
      fail("_rebuild_tensor_v2 size has " + std::to_string(size.size()) + " dims but stride has " + std::to_string(stride.size()));
    bool empty = false;
    bool overflow = false;
    int64_t last = offset;  // largest element index the view touches
    for (size_t d = 0; d < size.size(); ++d) {
      if (size[d] < 0 || stride[d] < 0) fail("_rebuild_tensor_v2 negative size or stride");
      int64_t reach = 0;
      if (size[d] == 0) empty = true;
      else overflow |= __builtin_mul_overflow(size[d] - 1, stride[d], &reach) || __builtin_add_overflow(last, reach, &last);
    }
    if (!empty && overflow)
      fail("tensor view (offset " + std::to_string(offset) + ", size " + c10::str(c10::IntArrayRef(size)) + ", stride " +
           c10::str(c10::IntArrayRef(stride)) + ") reaches beyond int64 elements; expected a view inside its storage");
    if (!empty && last >= storage.numel())
      fail("tensor view (offset " + std::to_string(offset) + ", size " + c10::str(c10::IntArrayRef(size)) + ", stride " +
           c10::str(c10::IntArrayRef(stride)) + ") reaches element " + std::to_string(last) + " of a storage of " +
           std::to_string(storage.numel()));
    auto v = make(Value::Kind::kTensor);
    v->t = empty ? at::empty(size, storage.options()) : storage.as_strided(size, stride, offset);
    return v;
  }
  void op_reduce() {
    ValuePtr args = pop();
    ValuePtr fn = pop();
    if (fn->kind != Value::Kind::kGlobal) fail("REDUCE on a " + std::string(kind_name(fn->kind)) + ", expected a global");
    if (args->kind != Value::Kind::kTuple) fail("REDUCE arguments are a " + std::string(kind_name(args->kind)) + ", expected a tuple");
    const auto& a = args->items;
    if (fn->s == "collections.OrderedDict") {
      if (!a.empty()) fail("collections.OrderedDict called with arguments; expected OrderedDict()");
      push(make(Value::Kind::kDict));
    } else if (fn->s == "torch._utils._rebuild_tensor_v2") {
      push(rebuild_tensor(a));
    } else if (fn->s == "torch._utils._rebuild_parameter") {
      if (a.empty() || a[0]->kind != Value::Kind::kTensor) fail("_rebuild_parameter without a tensor as first argument");
      push(a[0]);
    } else if (fn->s == "torch.jit._pickle.restore_type_tag") {
      if (a.empty()) fail("restore_type_tag without arguments");
      push(a[0]);
    } else {
      fail("cannot call '" + fn->s + "'");
    }
  }
  static bool same_key(const Value& x, const Value& y) {
    if (x.kind != y.kind) return false;
    if (x.kind == Value::Kind::kString) return x.s == y.s;
    if (x.kind == Value::Kind::kInt || x.kind == Value::Kind::kBool) return x.i == y.i;
    return &x == &y;
  }
  void set_item(Value& dict, ValuePtr key, ValuePtr value) {
    if (dict.kind != Value::Kind::kDict) fail("SETITEM(S) on a " + std::string(kind_name(dict.kind)) + ", expected a dict");
    for (auto& e : dict.entries) {
      if (same_key(*e.first, *key)) {
        e.second = std::move(value);
        return;
      }
    }
    dict.entries.emplace_back(std::move(key), std::move(value));
  }
  void op_setitem() {
    ValuePtr value = pop();
    ValuePtr key = pop();
    set_item(*top(), std::move(key), std::move(value));
  }
  void op_setitems() {
    auto items = pop_mark();
    if (items.size() % 2) fail("SETITEMS with an odd number of items");
    Value& dict = *top();
    for (size_t k = 0; k < items.size(); k += 2) set_item(dict, items[k], items[k + 1]);
  }
  void op_append() {
    ValuePtr v = pop();
    Value& list = *top();
    if (list.kind != Value::Kind::kList) fail("APPEND on a " + std::string(kind_name(list.kind)) + ", expected a list");
    list.items.push_back(std::move(v));
  }
  void op_appends() {
    auto items = pop_mark();
    Value& list = *top();
    if (list.kind != Value::Kind::kList) fail("APPENDS on a " + std::string(kind_name(list.kind)) + ", expected a list");
    for (auto& v : items) list.items.push_back(std::move(v));
  }
  // BUILD on an OrderedDict sets attributes such as _metadata (versions per module); ignored.
  void op_build() {
    pop();
    if (top()->kind != Value::Kind::kDict) fail("BUILD on a " + std::string(kind_name(top()->kind)) + ", expected an OrderedDict");
  }

  std::string path_;
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
  size_t op_pos_ = 0;
  uint8_t op_ = 0;
  StorageLoader& storages_;
  std::vector<ValuePtr> stack_;
  std::vector<size_t> marks_;
  std::unordered_map<uint32_t, ValuePtr> memo_;
  std::vector<std::unique_ptr<Value>> arena_;  // owns every Value made
};

// Appends m's own parameters and buffers, then its children's, as Python's state_dict() does.
void collect(const torch::nn::Module& m, const std::string& prefix, bool detach, StateDict& out) {
  for (const auto& p : m.named_parameters(/*recurse=*/false))
    if (p.value().defined()) out.emplace_back(prefix + p.key(), detach ? p.value().detach() : p.value());
  for (const auto& b : m.named_buffers(/*recurse=*/false))
    if (b.value().defined()) out.emplace_back(prefix + b.key(), detach ? b.value().detach() : b.value());
  for (const auto& c : m.named_children()) collect(*c.value(), prefix + c.key() + ".", detach, out);
}

std::string errno_text() { return std::strerror(errno); }

}  // namespace

namespace {

// The reader proper, on an open archive; `path` names it in messages.
StateDict read_archive(const std::string& path, caffe2::serialize::PyTorchStreamReader& archive) {
  caffe2::serialize::PyTorchStreamReader* reader = &archive;
  if (reader->hasRecord("byteorder")) {
    auto [ptr, n] = reader->getRecord("byteorder");
    std::string order(static_cast<const char*>(ptr.get()), n);
    if (order != "little")
      throw std::runtime_error("read_state_dict: " + path + ": byteorder '" + order + "'; expected 'little'");
  }
  if (!reader->hasRecord("data.pkl"))
    throw std::runtime_error("read_state_dict: " + path + ": missing record 'data.pkl' (the pickled object)");
  at::DataPtr pkl;
  size_t pkl_size = 0;
  try {
    std::tie(pkl, pkl_size) = reader->getRecord("data.pkl");
  } catch (const c10::Error& e) {
    throw std::runtime_error("read_state_dict: " + path + ": cannot read record 'data.pkl': " + e.what_without_backtrace());
  }

  StorageLoader storages(path, *reader);
  Unpickler unpickler(path, static_cast<const uint8_t*>(pkl.get()), pkl_size, storages);
  ValuePtr root = unpickler.run();
  if (root->kind != Value::Kind::kDict)
    throw std::runtime_error("read_state_dict: " + path + ": top-level object is a " + kind_name(root->kind) +
                             "; expected a dict or OrderedDict of tensors");
  StateDict out;
  out.reserve(root->entries.size());
  for (const auto& [k, v] : root->entries) {
    if (k->kind != Value::Kind::kString)
      throw std::runtime_error("read_state_dict: " + path + ": a top-level key is a " + kind_name(k->kind) + "; expected str");
    if (v->kind != Value::Kind::kTensor)
      throw std::runtime_error("read_state_dict: " + path + ": value of key '" + k->s + "' is a " + kind_name(v->kind) +
                               "; expected a tensor");
    out.emplace_back(k->s, v->t);
  }
  return out;
}


// read_archive, with LibTorch's own errors (a record failing its CRC-32, a zip entry that does not
// inflate, a view LibTorch refuses) turned into std::runtime_error naming the file, as promised.
StateDict read_archive_checked(const std::string& path, caffe2::serialize::PyTorchStreamReader& reader) {
  try {
    return read_archive(path, reader);
  } catch (const c10::Error& e) {
    throw std::runtime_error("read_state_dict: " + path + ": " + e.what_without_backtrace());
  }
}

std::unique_ptr<caffe2::serialize::PyTorchStreamReader> open_archive(const std::string& path,
                                                                     std::istream* in) {
  try {
    return in ? std::make_unique<caffe2::serialize::PyTorchStreamReader>(in)
              : std::make_unique<caffe2::serialize::PyTorchStreamReader>(path);
  } catch (const c10::Error& e) {
    throw std::runtime_error("read_state_dict: " + path +
                             " is not a readable torch.save() zip archive (expected the format torch.save "
                             "writes since PyTorch 1.6): " + e.what_without_backtrace());
  }
}

}  // namespace

StateDict read_state_dict(const std::string& path) {
  {
    std::ifstream probe(path, std::ios::binary);
    if (!probe) throw std::runtime_error("read_state_dict: cannot open " + path + ": " + errno_text());
  }
  auto reader = open_archive(path, nullptr);
  return read_archive_checked(path, *reader);
}

StateDict read_state_dict_bytes(const std::string& bytes, const std::string& name) {
  std::istringstream in(bytes, std::ios::binary);
  auto reader = open_archive(name, &in);
  return read_archive_checked(name, *reader);
}

std::string state_dict_bytes(const StateDict& sd, const std::string& name) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& [key, t] : sd) {
    if (!t.defined()) throw std::runtime_error("write_state_dict: " + name + ": tensor '" + key + "' is undefined");
    if (dict.contains(key)) throw std::runtime_error("write_state_dict: " + name + ": duplicate key '" + key + "'");
    dict.insert(key, t.detach().cpu());
  }
  std::vector<char> bytes = torch::jit::pickle_save(c10::IValue(dict));
  return std::string(bytes.begin(), bytes.end());
}

void write_state_dict(const StateDict& sd, const std::string& path, unsigned mode) {
  const std::string bytes = state_dict_bytes(sd, path);
  // A unique temporary name: mkostemp creates it with O_EXCL, so nothing planted is followed or reused.
  std::string tmp = path + ".tmp.XXXXXX";
  int fd = ::mkostemp(tmp.data(), O_CLOEXEC);
  if (fd < 0) throw std::runtime_error("write_state_dict: cannot create a temporary file " + tmp + ": " + errno_text());
  auto fail = [&](const std::string& what) {
    const std::string err = errno_text();
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw std::runtime_error("write_state_dict: " + what + ": " + err);
  };
  if (::fchmod(fd, mode) != 0) {
    char octal[16];
    std::snprintf(octal, sizeof octal, "%04o", mode);
    fail("setting mode " + std::string(octal) + " on " + tmp);
  }
  size_t done = 0;
  while (done < bytes.size()) {
    ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = EIO;
      fail("writing " + tmp + " failed after " + std::to_string(done) + " of " + std::to_string(bytes.size()) + " bytes");
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) fail("flushing " + tmp + " (fsync) failed");
  const int rc = ::close(fd);
  fd = -1;
  if (rc != 0) fail("closing " + tmp + " failed");
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("renaming " + tmp + " to " + path + " failed");
  // Make the rename itself durable; a failure here means the new file may not survive a crash.
  auto slash = path.find_last_of('/');
  const std::string dir = slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd < 0) {
    throw std::runtime_error("write_state_dict: " + path + ": cannot open directory " + dir +
                             " to fsync the rename: " + errno_text());
  }
  if (::fsync(dfd) != 0) {
    const std::string err = errno_text();
    ::close(dfd);
    throw std::runtime_error("write_state_dict: " + path + ": fsync of directory " + dir +
                             " failed (the rename may not survive a crash): " + err);
  }
  ::close(dfd);
}

StateDict state_dict_of(const torch::nn::Module& m) {
  StateDict out;
  collect(m, "", /*detach=*/true, out);
  return out;
}

void load_state_dict(torch::nn::Module& m, const StateDict& sd_in) {
  // A model may first rewrite a state dict saved with other settings (a ViT's position embeddings for
  // another image size); the strict checks below then see the adapted shapes.
  StateDict adapted;
  if (const auto* net = dynamic_cast<const Net*>(&m)) adapted = net->adapt_state_dict(sd_in);
  const StateDict& sd = adapted.empty() ? sd_in : adapted;
  StateDict dst;
  collect(m, "", /*detach=*/false, dst);
  std::unordered_map<std::string, const at::Tensor*> src;
  std::vector<std::string> duplicate, unexpected, undefined, missing, mismatch;
  for (const auto& [name, t] : sd) {
    if (!src.emplace(name, &t).second) duplicate.push_back(name);
    if (!t.defined()) undefined.push_back(name);
  }
  std::unordered_set<std::string> dst_names;
  for (const auto& [name, t] : dst) {
    dst_names.insert(name);
    auto it = src.find(name);
    if (it == src.end()) {
      missing.push_back(name);
    } else if (it->second->defined() && it->second->sizes() != t.sizes()) {
      mismatch.push_back(name + ": expected " + c10::str(t.sizes()) + ", got " + c10::str(it->second->sizes()));
    }
  }
  for (const auto& [name, t] : sd)
    if (!dst_names.count(name)) unexpected.push_back(name);

  if (!duplicate.empty() || !undefined.empty() || !missing.empty() || !unexpected.empty() || !mismatch.empty()) {
    std::ostringstream os;
    os << "load_state_dict: the state dict does not match the module (" << missing.size() << " missing, "
       << unexpected.size() << " unexpected, " << mismatch.size() << " shape mismatches";
    if (!duplicate.empty()) os << ", " << duplicate.size() << " duplicates";
    if (!undefined.empty()) os << ", " << undefined.size() << " undefined";
    os << "); the module is unchanged";
    auto list = [&os](const char* what, const std::vector<std::string>& names) {
      if (names.empty()) return;
      os << "\n  " << what << ":";
      for (const auto& n : names) os << "\n    " << n;
    };
    list("missing keys (in the module, not in the state dict)", missing);
    list("unexpected keys (in the state dict, not in the module)", unexpected);
    list("shape mismatches", mismatch);
    list("duplicate keys", duplicate);
    list("undefined tensors", undefined);
    throw std::runtime_error(os.str());
  }
  torch::NoGradGuard no_grad;
  for (auto& [name, t] : dst) t.copy_(*src.at(name));
}

}  // namespace keel::models
