// keel's subcommands: each registers its options on the CLI11 app and runs when chosen.
#pragma once
#include <CLI/CLI.hpp>
#include <functional>
#include <nlohmann/json.hpp>

#include "keel/config/config.h"

namespace keel::cli {

// Adds a subcommand to `app`; the returned function runs it (exit code) after parsing.
using Runner = std::function<int()>;
Runner add_train(CLI::App& app);
Runner add_eval(CLI::App& app);
Runner add_doctor(CLI::App& app);
Runner add_config(CLI::App& app);
Runner add_bench(CLI::App& app);
// `keel bench infer` (bench_infer.cpp), registered under `bench` by add_bench.
Runner add_bench_infer(CLI::App* bench);
Runner add_plan_batch(CLI::App& app);
Runner add_report(CLI::App& app);

// `keel doctor`'s measurements of this machine (threads, BLAS and its GEMM speed, oneDNN, bf16, CUDA, data) as
// JSON facts, with "advice" and "lines" (the report as `keel doctor` prints it). Also used by `keel report`.
nlohmann::json doctor_report(const config::Config& cfg);
Runner add_export(CLI::App& app);
Runner add_tune(CLI::App& app);

// Entry point shared by main() and tests: parses argv, runs the chosen subcommand, turns
// exceptions into "error: ..." on stderr and a non-zero exit code.
int main_entry(int argc, char** argv);

}  // namespace keel::cli
