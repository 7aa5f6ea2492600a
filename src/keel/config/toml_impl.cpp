// toml++ compiled once into keel (every other file includes it with TOML_HEADER_ONLY=0), from the copy of
// the installed headers that CMakeLists.txt patches for toml++ 3.3.0's unreachable-code bug (keel_toml).
#define TOML_IMPLEMENTATION
#include <toml++/toml.h>
