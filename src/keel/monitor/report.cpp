// report.html: the run's records embedded as JSON, drawn as SVG by an inline script (no network, no CDN).
#include "keel/monitor/report.h"

#include <fmt/format.h>

#include <chrono>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>

#include "keel/monitor/step_timer.h"
#include "keel/util/fs.h"

namespace keel::monitor {
namespace {

namespace fs = std::filesystem;

std::string read_text(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

std::string esc(const std::string& s) {
  std::string o;
  o.reserve(s.size());
  for (char c : s) {
    switch (c) {
      case '&': o += "&amp;"; break;
      case '<': o += "&lt;"; break;
      case '>': o += "&gt;"; break;
      case '"': o += "&quot;"; break;
      default: o += c;
    }
  }
  return o;
}

// JSON safe inside <script>: ASCII only and no "</" that could end the element.
std::string script_json(const nlohmann::json& j) {
  std::string s = j.dump(-1, ' ', true, nlohmann::json::error_handler_t::replace);
  std::string o;
  o.reserve(s.size());
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == '<' && i + 1 < s.size() && s[i + 1] == '/') o += "<\\";
    else o += s[i];
  }
  return o;
}

bool num(const nlohmann::json& r, const char* key) { return r.contains(key) && r[key].is_number(); }

// Points (x = step, y = record[key] * scale) of the records that have the key.
nlohmann::json points(const std::vector<nlohmann::json>& recs, const char* key, double scale = 1.0) {
  nlohmann::json p = nlohmann::json::array();
  for (const auto& r : recs) {
    if (num(r, "step") && num(r, key)) {
      const double v = r[key].get<double>() * scale;
      if (std::isfinite(v)) p.push_back({r["step"].get<double>(), v});
    }
  }
  return p;
}

nlohmann::json series(const std::string& name, const std::string& color, nlohmann::json pts, bool markers = false) {
  return {{"name", name}, {"color", color}, {"points", std::move(pts)}, {"markers", markers}};
}

std::string fmt_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (std::fabs(b) >= 1024 && u < 4) b /= 1024, ++u;
  return fmt::format("{:.{}f} {}", b, u ? 2 : 0, units[u]);
}

std::string cell(const nlohmann::json& r, const char* key, const std::string& kind) {
  if (!num(r, key)) return "";
  const double v = r[key].get<double>();
  if (kind == "pct") return fmt::format("{:.2f}%", 100 * v);
  if (kind == "bytes") return fmt_bytes(v);
  if (kind == "int") return fmt::format("{:.0f}", v);
  if (kind == "s") return fmt::format("{:.1f} s", v);
  return fmt::format("{:.4g}", v);
}

const char* kScript = R"JS(
(function () {
  'use strict';
  var NS = 'http://www.w3.org/2000/svg';
  var W = 520, H = 250, L = 62, R = 12, T = 10, B = 34;
  function el(tag, attrs, parent, text) {
    var e = document.createElementNS(NS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    if (text !== undefined) e.textContent = text;
    if (parent) parent.appendChild(e);
    return e;
  }
  function nice(lo, hi, n) {
    if (!(hi > lo)) { var d = Math.abs(lo) * 0.1 || 1; lo -= d; hi += d; }
    var raw = (hi - lo) / n, step = Math.pow(10, Math.floor(Math.log(raw) / Math.LN10)), r = raw / step;
    step *= r >= 7.5 ? 10 : r >= 3.5 ? 5 : r >= 1.5 ? 2 : 1;
    var a = Math.floor(lo / step) * step, b = Math.ceil(hi / step) * step, ticks = [];
    for (var t = a; t <= b + step * 1e-9; t += step) ticks.push(Math.abs(t) < step * 1e-9 ? 0 : t);
    return { lo: a, hi: b, ticks: ticks };
  }
  function label(v, f) {
    if (f === 'pct') return (Math.round(v * 1000) / 10) + '%';
    if (f === 'bytes') {
      var u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'], i = 0;
      while (Math.abs(v) >= 1024 && i < 4) { v /= 1024; i++; }
      return (Math.round(v * 10) / 10) + ' ' + u[i];
    }
    if (v !== 0 && (Math.abs(v) < 1e-3 || Math.abs(v) >= 1e5)) return v.toExponential(1);
    return String(Math.round(v * 1e4) / 1e4);
  }
  function draw(spec, fig) {
    var box = fig.querySelector('.plot'), legend = fig.querySelector('.legend');
    var ser = spec.series.filter(function (s) { return s.points.length > 0; });
    if (!ser.length) { box.textContent = spec.empty || 'no data recorded'; return false; }
    var xs = [], ys = [];
    var stacked = spec.kind === 'stacked';
    var tops = {};
    ser.forEach(function (s) {
      s.points.forEach(function (p) {
        xs.push(p[0]);
        if (stacked) { tops[p[0]] = (tops[p[0]] || 0) + p[1]; ys.push(tops[p[0]]); } else ys.push(p[1]);
      });
    });
    var xmin = Math.min.apply(null, xs), xmax = Math.max.apply(null, xs);
    if (xmax === xmin) { xmin -= 1; xmax += 1; }
    var ylo = Math.min.apply(null, ys), yhi = Math.max.apply(null, ys);
    if (spec.zero || stacked) ylo = Math.min(0, ylo);
    // Byte axes get round ticks in their binary unit (256 MiB, not 268.4 MB).
    var unit = 1;
    if (spec.format === 'bytes') while (Math.max(Math.abs(ylo), Math.abs(yhi)) / unit >= 1024 && unit < 1099511627776) unit *= 1024;
    var ya = nice(ylo / unit, yhi / unit, 4), xa = nice(xmin, xmax, 6);
    ya.lo *= unit; ya.hi *= unit; ya.ticks = ya.ticks.map(function (t) { return t * unit; });
    var sx = function (x) { return L + (x - xmin) / (xmax - xmin) * (W - L - R); };
    var sy = function (y) { return T + (ya.hi - y) / (ya.hi - ya.lo) * (H - T - B); };
    var svg = el('svg', { viewBox: '0 0 ' + W + ' ' + H, role: 'img', 'aria-label': spec.title });
    ya.ticks.forEach(function (t) {
      el('line', { x1: L, x2: W - R, y1: sy(t), y2: sy(t), class: 'grid' }, svg);
      el('text', { x: L - 6, y: sy(t) + 4, 'text-anchor': 'end', class: 'tick' }, svg, label(t, spec.format));
    });
    xa.ticks.forEach(function (t) {
      if (t < xmin - 1e-9 || t > xmax + 1e-9) return;
      el('line', { x1: sx(t), x2: sx(t), y1: H - B, y2: H - B + 4, class: 'axis' }, svg);
      el('text', { x: sx(t), y: H - B + 16, 'text-anchor': 'middle', class: 'tick' }, svg, label(t, ''));
    });
    el('line', { x1: L, x2: W - R, y1: H - B, y2: H - B, class: 'axis' }, svg);
    el('line', { x1: L, x2: L, y1: T, y2: H - B, class: 'axis' }, svg);
    el('text', { x: (L + W - R) / 2, y: H - 3, 'text-anchor': 'middle', class: 'axis-label' }, svg, spec.x_label || 'step');
    var base = {};
    ser.forEach(function (s) {
      var pts = s.points.slice().sort(function (a, b) { return a[0] - b[0]; }), d = '';
      if (stacked) {
        var top = pts.map(function (p) { var b0 = base[p[0]] || 0; return [p[0], b0 + p[1], b0]; });
        top.forEach(function (p, i) { d += (i ? 'L' : 'M') + sx(p[0]).toFixed(1) + ',' + sy(p[1]).toFixed(1); });
        for (var i = top.length - 1; i >= 0; i--) d += 'L' + sx(top[i][0]).toFixed(1) + ',' + sy(top[i][2]).toFixed(1);
        d += 'Z';
        top.forEach(function (p) { base[p[0]] = p[1]; });
        el('path', { d: d, class: 'series area', fill: s.color, stroke: s.color, 'data-series': s.name }, svg);
      } else {
        pts.forEach(function (p, i) { d += (i ? 'L' : 'M') + sx(p[0]).toFixed(1) + ',' + sy(p[1]).toFixed(1); });
        if (pts.length === 1) d += 'l0.01,0';
        el('path', { d: d, class: 'series line', stroke: s.color, 'data-series': s.name }, svg);
        if (s.markers || pts.length === 1) {
          pts.forEach(function (p) {
            var c = el('circle', { cx: sx(p[0]), cy: sy(p[1]), r: 3.5, fill: s.color, class: 'marker' }, svg);
            el('title', {}, c, s.name + ' @ ' + p[0] + ': ' + label(p[1], spec.format));
          });
        }
      }
      var item = document.createElement('span');
      item.className = 'key';
      item.innerHTML = '<i style="background:' + s.color + '"></i>';
      item.appendChild(document.createTextNode(s.name));
      legend.appendChild(item);
    });
    box.appendChild(svg);
    return true;
  }
  var data = JSON.parse(document.getElementById('keel-data').textContent);
  var drawn = 0;
  data.charts.forEach(function (spec) {
    var fig = document.getElementById('chart-' + spec.id);
    if (draw(spec, fig)) { drawn++; fig.setAttribute('data-drawn', '1'); }
  });
  document.body.setAttribute('data-charts-total', String(data.charts.length));
  document.body.setAttribute('data-charts-drawn', String(drawn));
})();
)JS";

const char* kStyle = R"CSS(
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 24px; color: #1d2330; background: #fff; }
h1 { font-size: 22px; margin: 0 0 4px; } h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #dde; }
.sub { color: #667; margin-bottom: 14px; }
.cards { display: flex; flex-wrap: wrap; gap: 10px; }
.card { border: 1px solid #dde; border-radius: 6px; padding: 8px 12px; min-width: 120px; }
.card b { display: block; font-size: 18px; } .card span { color: #667; font-size: 12px; }
.charts { display: grid; grid-template-columns: repeat(auto-fill, minmax(430px, 1fr)); gap: 14px; }
figure.chart { margin: 0; border: 1px solid #dde; border-radius: 6px; padding: 8px 10px; }
figure.chart figcaption { font-weight: 600; }
.legend { font-size: 12px; color: #445; min-height: 16px; }
.key { margin-right: 12px; white-space: nowrap; } .key i { display: inline-block; width: 10px; height: 10px; margin-right: 4px; border-radius: 2px; }
svg { width: 100%; height: auto; display: block; }
.grid { stroke: #eef; } .axis { stroke: #889; } .tick { font-size: 10px; fill: #556; } .axis-label { font-size: 11px; fill: #556; }
.series.line { fill: none; stroke-width: 1.8; } .series.area { fill-opacity: 0.75; stroke-width: 0.5; }
table { border-collapse: collapse; font-size: 13px; } td, th { border: 1px solid #dde; padding: 3px 8px; text-align: right; }
th { background: #f4f5fa; } td.l, th.l { text-align: left; }
pre { background: #f6f7fb; border: 1px solid #dde; border-radius: 6px; padding: 10px; overflow-x: auto; font-size: 12px; }
.advice li { margin: 4px 0; } .note { color: #667; font-size: 12px; }
)CSS";

}  // namespace

RunRecords read_run(const std::string& run_dir) {
  RunRecords r;
  r.run_dir = run_dir;
  if (!fs::is_directory(run_dir)) throw std::runtime_error(run_dir + ": no such run directory");
  const std::string path = run_dir + "/metrics.jsonl";
  std::ifstream in(path);
  if (!in) {
    throw std::runtime_error(path + ": missing or unreadable; `keel report` needs the metrics.jsonl that "
                             "`keel train` writes into its run directory (runs/<run.name>/)");
  }
  std::vector<std::string> lines;
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  for (size_t i = 0; i < lines.size(); ++i) {
    if (lines[i].empty()) continue;
    nlohmann::json j = nlohmann::json::parse(lines[i], nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      if (i + 1 == lines.size()) {  // torn by a kill while writing
        r.notes.push_back(fmt::format("{}:{}: incomplete last line skipped", path, i + 1));
        continue;
      }
      throw std::runtime_error(fmt::format("{}:{}: not a JSON object: {}", path, i + 1,
                                           lines[i].substr(0, 80) + (lines[i].size() > 80 ? "..." : "")));
    }
    const std::string ev = j.value("event", "");
    if (ev == "step") r.steps.push_back(std::move(j));
    else if (ev == "epoch") r.epochs.push_back(std::move(j));
    else if (ev == "final") r.final = j.value("summary", nlohmann::json());
    else r.events.push_back(std::move(j));
  }
  const std::string cfg = run_dir + "/config.resolved.toml";
  if (fs::exists(cfg)) r.config_toml = read_text(cfg);
  else r.notes.push_back(cfg + ": missing");
  // Optional records other commands wrote into the run directory: a JSON object each, or a note.
  auto optional_json = [&](const std::string& file) {
    const std::string path = run_dir + "/" + file;
    if (!fs::exists(path)) return nlohmann::json();
    nlohmann::json j = nlohmann::json::parse(read_text(path), nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.is_object()) {
      r.notes.push_back(path + ": not a JSON object, not shown");
      return nlohmann::json();
    }
    return j;
  };
  r.tune = optional_json("tune/tune.json");
  r.infer = optional_json("bench/infer.json");
  if (r.steps.empty()) r.notes.push_back(path + ": no step records (train.log_every larger than the run, or monitor.enabled = false)");
  if (r.final.is_null()) r.notes.push_back(path + ": no final summary (the run was interrupted or is still running)");
  return r;
}

nlohmann::json report_charts(const RunRecords& run) {
  const auto& S = run.steps;
  const auto& E = run.epochs;
  nlohmann::json charts = nlohmann::json::array();
  auto chart = [&](const std::string& id, const std::string& title, const std::string& format, nlohmann::json ser,
                   const std::string& kind = "line", bool zero = false) {
    charts.push_back({{"id", id}, {"title", title}, {"format", format}, {"kind", kind}, {"zero", zero},
                      {"series", std::move(ser)}, {"x_label", "step"}});
  };
  chart("loss", "Loss", "",
        {series("train (window mean)", "#3366cc", points(S, "loss")),
         series("train (epoch)", "#1b9e77", points(E, "train_loss"), true),
         series("test (epoch)", "#d95f02", points(E, "test_loss"), true)});
  chart("accuracy", "Accuracy (per epoch)", "pct",
        {series("train top-1", "#1b9e77", points(E, "train_top1"), true),
         series("test top-1", "#d95f02", points(E, "test_top1"), true),
         series("test top-5", "#7570b3", points(E, "test_top5"), true)});
  chart("lr", "Learning rate", "", {series("lr", "#3366cc", points(S, "lr"))}, "line", true);
  chart("throughput", "Throughput (images/s)", "",
        {series("window", "#3366cc", points(S, "images_per_second")),
         series("epoch", "#d95f02", points(E, "images_per_second"), true)},
        "line", true);
  // Stacked: each phase's mean milliseconds per step in the window (share x mean step time).
  nlohmann::json phases = nlohmann::json::array();
  const char* colors[kNumPhases] = {"#e7298a", "#e6ab02", "#1b9e77", "#3366cc", "#7570b3", "#999999"};
  for (int ph = 0; ph < kNumPhases; ++ph) {
    const std::string name = phase_name(static_cast<Phase>(ph));
    const std::string key = name + "_share";
    nlohmann::json p = nlohmann::json::array();
    for (const auto& r : S) {
      if (num(r, "step") && num(r, key.c_str()) && num(r, "step_seconds")) {
        p.push_back({r["step"].get<double>(), 1000.0 * r[key].get<double>() * r["step_seconds"].get<double>()});
      }
    }
    phases.push_back(series(name, colors[ph], std::move(p)));
  }
  chart("breakdown", "Step-time breakdown (ms per step, stacked)", "", phases, "stacked", true);
  chart("memory", "Memory", "bytes",
        {series("current (allocator)", "#3366cc", points(S, "memory_current_bytes")),
         series("peak (allocator)", "#d95f02", points(S, "memory_peak_bytes")),
         series("process RSS", "#999999", points(S, "rss_bytes"))},
        "line", true);
  chart("data_wait", "Data wait (share of step time)", "pct",
        {series("window", "#e7298a", points(S, "data_wait_share")),
         series("epoch", "#d95f02", points(E, "data_wait_share"), true)},
        "line", true);
  chart("utilisation", "Utilisation (model FLOP/s / measured peak)", "pct",
        {series("utilisation", "#1b9e77", points(S, "utilisation"))}, "line", true);
  chart("grad_norm", "Gradient norm (before clipping)", "", {series("grad norm", "#7570b3", points(S, "grad_norm"))},
        "line", true);
  return charts;
}

namespace {

// keel tune's trials for this run name (tune/tune.json).
void tune_section(std::ostream& h, const nlohmann::json& t) {
  h << "<h2>Tuning (keel tune)</h2>\n<p id=\"tune\">" << esc(t.value("config", "")) << " &rarr; "
    << esc(t.value("tuned_config", "")) << ": " << fmt::format("{:.1f} &rarr; {:.1f} images/s (x{:.2f})",
                                                                  t.value("start_images_per_second", 0.0),
                                                                  t.value("best_images_per_second", 0.0),
                                                                  t.value("speedup", 0.0))
    << ", re-measured in the same run.</p>\n<ul class=\"advice\">";
  for (const auto& c : t.value("changes", nlohmann::json::array())) {
    h << "<li>" << esc(c.value("key", "")) << " = " << esc(c.value("value", "")) << " &mdash; "
      << esc(c.value("reason", "")) << "</li>";
  }
  h << "</ul>\n<table id=\"tune-trials\"><tr><th>#</th><th class=\"l\">group</th><th>images/s</th>"
       "<th>data wait</th><th>peak memory</th><th>micro-batch</th><th class=\"l\">settings</th></tr>\n";
  int i = 0;
  for (const auto& x : t.value("trials", nlohmann::json::array())) {
    const std::string err = x.value("error", "");
    h << "<tr><td>" << ++i << "</td><td class=\"l\">" << esc(x.value("group", "")) << "</td><td>"
      << (err.empty() ? cell(x, "images_per_second", "") : std::string("failed")) << "</td><td>"
      << cell(x, "data_wait_share", "pct") << "</td><td>" << cell(x, "peak_memory_bytes", "bytes") << "</td><td>"
      << cell(x, "resolved_micro_batch", "int") << "</td><td class=\"l\">"
      << esc(x.value("settings", nlohmann::json::object()).dump() + (err.empty() ? "" : " " + err.substr(0, 200)))
      << "</td></tr>\n";
  }
  h << "</table>\n";
}

// keel bench infer on the run's weights (bench/infer.json): latency percentiles and throughput per setting.
void infer_section(std::ostream& h, const nlohmann::json& b) {
  if (!b.contains("settings")) return;
  const auto batches = b.value("batches", nlohmann::json::array());
  h << "<h2>Inference benchmark (keel bench infer)</h2>\n<p id=\"infer\">" << esc(b.value("model", "")) << ", "
    << b.value("channels", 0) << "x" << b.value("size", 0) << "x" << b.value("size", 0) << ", weights: "
    << esc(b.value("weights", "")) << ", " << esc(b.value("device", "")) << " with " << b.value("threads", 0)
    << " threads; latency over " << b.value("latency_iters", 0) << " batch-1 forwards per round, "
    << b.value("rounds", 0) << " round(s).</p>\n<table id=\"infer-settings\"><tr><th class=\"l\">setting</th>"
       "<th>p50 ms</th><th>p90 ms</th><th>p99 ms</th><th>max ms</th>";
  for (const auto& n : batches) h << "<th>batch " << n.dump() << " images/s</th>";
  h << "<th>peak memory</th></tr>\n";
  for (const auto& x : b["settings"]) {
    const auto lat = x.value("latency_ms", nlohmann::json::object());
    h << "<tr><td class=\"l\">" << esc(x.value("setting", "")) << "</td>";
    for (const char* k : {"p50", "p90", "p99", "max"}) h << "<td>" << cell(lat, k, "") << "</td>";
    const auto ips = x.value("images_per_second", nlohmann::json::object());
    for (const auto& n : batches) h << "<td>" << cell(ips, n.dump().c_str(), "") << "</td>";
    h << "<td>" << cell(x, "peak_extra_bytes", "bytes") << "</td></tr>\n";
  }
  h << "</table>\n";
}

}  // namespace

std::string render_report(const RunRecords& run, const nlohmann::json& environment,
                          const std::string& environment_note) {
  const nlohmann::json charts = report_charts(run);
  const nlohmann::json& F = run.final;
  std::string name = fs::path(run.run_dir).filename().string();
  if (name.empty()) name = fs::path(run.run_dir).parent_path().filename().string();
  std::string model;
  {
    std::istringstream cfg(run.config_toml);
    std::string section;
    for (std::string line; std::getline(cfg, line);) {
      if (!line.empty() && line[0] == '[') section = line;
      if (section == "[model]" && line.size() > 9 && line.rfind("name = ", 0) == 0) {
        model = line.substr(8, line.size() - 9);  // name = 'resnet20' (or "resnet20")
      }
    }
  }
  std::ostringstream h;
  h << "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">\n<title>keel report: " << esc(name)
    << "</title>\n<style>" << kStyle << "</style>\n"
    // Any script error is recorded on the page itself, where a test (or a reader) sees it.
    << "<script>window.addEventListener('error', function (e) { document.documentElement.setAttribute("
       "'data-report-error', String(e.message)); });</script>\n</head>\n<body>\n";
  h << "<h1>keel run report: " << esc(name) << "</h1>\n<div class=\"sub\">" << esc(model.empty() ? "" : model + " · ")
    << esc(run.run_dir) << " · generated "
    << [] {
         std::time_t t = std::time(nullptr);
         char buf[64];
         std::strftime(buf, sizeof buf, "%Y-%m-%d %H:%M:%S %Z", std::localtime(&t));
         return std::string(buf);
       }()
    << "</div>\n";

  // Summary cards.
  h << "<h2>Summary</h2>\n<div class=\"cards\" id=\"summary\">";
  auto card = [&](const std::string& label, const std::string& value) {
    if (!value.empty()) h << "<div class=\"card\"><b>" << esc(value) << "</b><span>" << esc(label) << "</span></div>";
  };
  if (!F.is_null()) {
    card("test top-1", cell(F, "test_top1", "pct"));
    card("test top-5", cell(F, "test_top5", "pct"));
    card("test loss", cell(F, "test_loss", ""));
    card("steps", cell(F, "steps", "int"));
    card("epochs", cell(F, "epochs", "int"));
    card("images/s", cell(F, "images_per_second", "int"));
    card("data wait", cell(F, "data_wait_share", "pct"));
    card("peak memory", cell(F, "peak_memory_bytes", "bytes"));
    card("training time", cell(F, "train_seconds", "s"));
    card("wall time", cell(F, "wall_seconds", "s"));
    card("skipped steps", cell(F, "skipped_steps", "int"));
    card("rollbacks", cell(F, "rollbacks", "int"));
    card("OOM recoveries", cell(F, "oom_recoveries", "int"));
  } else {
    // No final summary (interrupted or still running): the last epoch and the last logged step.
    if (!run.epochs.empty()) {
      const auto& e = run.epochs.back();
      const std::string at = " (epoch " + cell(e, "epoch", "int") + ")";
      card("test top-1" + at, cell(e, "test_top1", "pct"));
      card("test top-5" + at, cell(e, "test_top5", "pct"));
      card("test loss" + at, cell(e, "test_loss", ""));
      card("images/s" + at, cell(e, "images_per_second", "int"));
      card("peak memory" + at, cell(e, "memory_peak_bytes", "bytes"));
    }
    if (!run.steps.empty()) {
      card("last logged step", cell(run.steps.back(), "step", "int"));
      card("last loss", cell(run.steps.back(), "loss", ""));
    }
  }
  h << "</div>\n";
  if (!run.notes.empty()) {
    h << "<ul class=\"note\">";
    for (const auto& n : run.notes) h << "<li>" << esc(n) << "</li>";
    h << "</ul>\n";
  }

  // Diagnosis: the run's advice, else the last epoch's.
  h << "<h2>Diagnosis</h2>\n<ul class=\"advice\" id=\"advice\">";
  nlohmann::json advice = F.is_object() && F.contains("advice") ? F["advice"] : nlohmann::json::array();
  if (advice.empty() && !run.epochs.empty()) advice = run.epochs.back().value("advice", nlohmann::json::array());
  if (advice.empty()) h << "<li>no advice: nothing in reach would make this run faster (docs/monitoring.md lists the rules)</li>";
  for (const auto& a : advice) h << "<li>" << esc(a.is_string() ? a.get<std::string>() : a.dump()) << "</li>";
  h << "</ul>\n";

  // Charts.
  h << "<h2>Charts</h2>\n<div class=\"charts\">\n";
  for (const auto& c : charts) {
    h << "<figure class=\"chart\" id=\"chart-" << esc(c["id"].get<std::string>()) << "\"><figcaption>"
      << esc(c["title"].get<std::string>()) << "</figcaption><div class=\"legend\"></div><div class=\"plot\"></div></figure>\n";
  }
  h << "</div>\n";

  // Epochs.
  h << "<h2>Epochs</h2>\n<table id=\"epochs\"><tr><th>epoch</th><th>step</th><th>train loss</th><th>train top-1</th>"
       "<th>test loss</th><th>test top-1</th><th>test top-5</th><th>time</th><th>images/s</th><th>data wait</th>"
       "<th>peak memory</th><th class=\"l\">advice</th></tr>\n";
  for (const auto& e : run.epochs) {
    std::string adv;
    for (const auto& a : e.value("advice", nlohmann::json::array())) adv += (adv.empty() ? "" : "; ") + (a.is_string() ? a.get<std::string>() : a.dump());
    h << "<tr><td>" << cell(e, "epoch", "int") << "</td><td>" << cell(e, "step", "int") << "</td><td>"
      << cell(e, "train_loss", "") << "</td><td>" << cell(e, "train_top1", "pct") << "</td><td>"
      << cell(e, "test_loss", "") << "</td><td>" << cell(e, "test_top1", "pct") << "</td><td>"
      << cell(e, "test_top5", "pct") << "</td><td>" << cell(e, "seconds", "s") << "</td><td>"
      << cell(e, "images_per_second", "int") << "</td><td>" << cell(e, "data_wait_share", "pct") << "</td><td>"
      << cell(e, "memory_peak_bytes", "bytes") << "</td><td class=\"l\">" << esc(adv) << "</td></tr>\n";
  }
  h << "</table>\n";

  // Events (guard, OOM recovery, checkpoints, early stop, profiles, ...).
  h << "<h2>Events</h2>\n";
  if (run.events.empty()) h << "<p class=\"note\">none</p>\n";
  else {
    h << "<table id=\"events\"><tr><th class=\"l\">event</th><th>step</th><th class=\"l\">details</th></tr>\n";
    for (const auto& e : run.events) {
      nlohmann::json rest = e;
      rest.erase("event");
      rest.erase("step");
      h << "<tr><td class=\"l\">" << esc(e.value("event", "?")) << "</td><td>" << cell(e, "step", "int")
        << "</td><td class=\"l\">" << esc(rest.dump()) << "</td></tr>\n";
    }
    h << "</table>\n";
  }

  // Records other commands wrote (tune/tune.json, bench/infer.json). They parsed as JSON objects; a field of an
  // unexpected type (a hand-edited file) gives a note in place of its section instead of failing the report.
  auto optional_section = [&](const nlohmann::json& j, const char* file,
                              void (*section)(std::ostream&, const nlohmann::json&)) {
    if (!j.is_object()) return;
    std::ostringstream s;
    try {
      section(s, j);
      h << s.str();
    } catch (const nlohmann::json::exception& e) {
      h << "<ul class=\"note\"><li>"
        << esc(run.run_dir + "/" + file + ": a field has an unexpected type, not shown (" + e.what() + ")")
        << "</li></ul>\n";
    }
  };
  optional_section(run.tune, "tune/tune.json", tune_section);
  optional_section(run.infer, "bench/infer.json", infer_section);

  // Profiles written by --profile-steps: the top of each operator table.
  for (const auto& e : run.events) {
    if (e.value("event", "") != "profile") continue;
    const std::string ops = e.value("ops", ""), trace = e.value("trace", "");
    h << "<h2>Profile</h2>\n<p>Chrome trace: <a href=\"" << esc(fs::path(trace).filename().string()) << "\">"
      << esc(fs::path(trace).filename().string()) << "</a> (open in chrome://tracing or ui.perfetto.dev)</p>\n<pre>";
    std::istringstream table(fs::exists(ops) ? read_text(ops) : std::string("(" + ops + " not found)"));
    int n = 0;
    for (std::string line; std::getline(table, line) && n < 25; ++n) h << esc(line) << "\n";
    h << "</pre>\n";
  }

  h << "<h2>Resolved config</h2>\n<pre id=\"config\">" << esc(run.config_toml.empty() ? "(config.resolved.toml missing)" : run.config_toml)
    << "</pre>\n";

  h << "<h2>Environment</h2>\n<p class=\"note\">" << esc(environment_note) << "</p>\n<pre id=\"environment\">";
  if (environment.contains("lines")) {
    for (const auto& l : environment["lines"]) h << esc(l.get<std::string>()) << "\n";
  }
  if (environment.contains("advice")) {
    for (const auto& a : environment["advice"]) h << "advice: " << esc(a.get<std::string>()) << "\n";
  }
  h << "</pre>\n";

  h << "<script id=\"keel-data\" type=\"application/json\">" << script_json({{"charts", charts}}) << "</script>\n";
  h << "<script>" << kScript << "</script>\n</body></html>\n";
  return h.str();
}

std::string write_report(const std::string& run_dir, const nlohmann::json& environment,
                         const std::string& environment_note) {
  const RunRecords run = read_run(run_dir);
  const std::string path = run_dir + "/report.html";
  util::atomic_write_file(path, render_report(run, environment, environment_note));
  return path;
}

}  // namespace keel::monitor
