// keel executable: everything lives in the library; this only forwards to the CLI.
#include "keel/cli/commands.h"

int main(int argc, char** argv) { return keel::cli::main_entry(argc, argv); }
