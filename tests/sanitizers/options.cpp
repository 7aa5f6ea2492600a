// Default sanitizer options of the CI sanitizer test programs (asan_tests, tsan_tests; CMakeLists.txt):
// built in, so running a program by hand behaves as under ctest. $ASAN_OPTIONS etc. still add to them.
// The suppression files next to this one list, each with its reason, the reports from code keel does
// not own (LibTorch, OpenMP) that are not keel bugs.

#define KEEL_SUPP_DIR KEEL_SOURCE_DIR "/tests/sanitizers/"

extern "C" {
#if defined(__SANITIZE_ADDRESS__)
// allocator_may_return_null: the out-of-memory tests ask for more than exists and expect a C++ error
// (LibTorch's "can't allocate memory"), not an ASan abort. detect_leaks: LeakSanitizer at exit.
const char* __asan_default_options() {
  return "allocator_may_return_null=1:detect_leaks=1:detect_stack_use_after_return=0:"
         "suppressions=" KEEL_SUPP_DIR "asan.supp";
}
const char* __lsan_default_options() { return "suppressions=" KEEL_SUPP_DIR "lsan.supp"; }
// -fno-sanitize-recover=undefined makes every UBSan report fatal; these add the stack and the file.
const char* __ubsan_default_options() {
  return "print_stacktrace=1:halt_on_error=1:suppressions=" KEEL_SUPP_DIR "ubsan.supp";
}
#endif
#if defined(__SANITIZE_THREAD__)
const char* __tsan_default_options() {
  return "halt_on_error=1:second_deadlock_stack=1:suppressions=" KEEL_SUPP_DIR "tsan.supp";
}
#endif
}
