// The keel command line: subcommand dispatch and error reporting.
#include <iostream>
#include <map>

#include "keel/cli/commands.h"
#include "keel/config/config.h"

namespace keel::cli {

int main_entry(int argc, char** argv) {
  CLI::App app{"keel: a C++ training engine on LibTorch for vision models"};
  app.require_subcommand(1);
  std::map<CLI::App*, Runner> runners;
  auto add = [&](Runner (*f)(CLI::App&)) {
    const size_t before = app.get_subcommands({}).size();
    Runner r = f(app);
    runners[app.get_subcommands({}).at(before)] = std::move(r);
  };
  add(add_train);
  add(add_eval);
  add(add_doctor);
  add(add_config);
  add(add_bench);
  add(add_plan_batch);
  add(add_report);
  add(add_export);
  add(add_tune);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    for (auto* sub : app.get_subcommands()) return runners.at(sub)();
    return 2;
  } catch (const config::ConfigError& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}

}  // namespace keel::cli
