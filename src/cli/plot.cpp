// PNG scatter charts (plot.hpp), drawn with cairo when the build found it.
#include "plot.hpp"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <memory>
#include <vector>

#include "tqkv/error.hpp"

#if defined(TQKV_HAVE_CAIRO)
#include <cairo.h>
#endif

namespace tqkv::cli {

void check_plot_path(const std::string& path) {
#if !defined(TQKV_HAVE_CAIRO)
  throw Error("--plot " + path + ": this tqkv was built without cairo, which draws PNG files "
              "(install libcairo2-dev, tools/install-deps.sh, and build again)");
#endif
  TQKV_CHECK(!path.empty(), "--plot: empty file name");
  const bool existed = std::filesystem::exists(path);
  std::FILE* f = std::fopen(path.c_str(), "ab");
  TQKV_CHECK(f != nullptr, "--plot: cannot write '", path, "': ", std::strerror(errno));
  std::fclose(f);
  if (!existed) std::filesystem::remove(path);
}

#if defined(TQKV_HAVE_CAIRO)

namespace {

constexpr double kPanelWidth = 620, kHeight = 540, kHeader = 70;
constexpr double kLeft = 80, kRight = 24, kTop = kHeader + 16, kBottom = 62;
// A series' colour and marker (circle, square, triangle, diamond), by its index modulo 4.
constexpr double kColours[][3] = {
    {0.12, 0.38, 0.72}, {0.84, 0.24, 0.16}, {0.20, 0.60, 0.25}, {0.45, 0.45, 0.45}};
constexpr size_t kStyles = sizeof kColours / sizeof kColours[0];

struct Range {
  double lo, hi;
};

// An axis step of 1, 2 or 5 times a power of ten that gives about `ticks` intervals.
double nice_step(double span, int ticks) {
  const double raw = span / ticks, p = std::pow(10.0, std::floor(std::log10(raw)));
  for (double m : {1.0, 2.0, 5.0})
    if (m * p >= raw) return m * p;
  return 10.0 * p;
}

std::string tick_text(double v, bool log) {
  char buf[32];
  if (log) std::snprintf(buf, sizeof buf, "1e%d", int(std::lround(v)));
  else std::snprintf(buf, sizeof buf, "%g", std::abs(v) < 1e-12 ? 0.0 : v);
  return buf;
}

void marker(cairo_t* cr, size_t series, double x, double y) {
  const double r = 5.5;
  switch (series % kStyles) {
    case 0: cairo_arc(cr, x, y, r, 0, 2 * M_PI); break;
    case 1: cairo_rectangle(cr, x - r, y - r, 2 * r, 2 * r); break;
    case 2:
      cairo_move_to(cr, x, y - r * 1.2);
      cairo_line_to(cr, x + r * 1.1, y + r * 0.8);
      cairo_line_to(cr, x - r * 1.1, y + r * 0.8);
      cairo_close_path(cr);
      break;
    default:
      cairo_move_to(cr, x, y - r * 1.3);
      cairo_line_to(cr, x + r * 1.1, y);
      cairo_line_to(cr, x, y + r * 1.3);
      cairo_line_to(cr, x - r * 1.1, y);
      cairo_close_path(cr);
  }
  const double* c = kColours[series % kStyles];
  cairo_set_source_rgb(cr, c[0], c[1], c[2]);
  cairo_fill(cr);
}

void text(cairo_t* cr, const std::string& s, double x, double y, double size, double align_x,
          double align_y, bool vertical = false) {
  cairo_save(cr);
  cairo_set_font_size(cr, size);
  cairo_text_extents_t e;
  cairo_text_extents(cr, s.c_str(), &e);
  cairo_translate(cr, x, y);
  if (vertical) cairo_rotate(cr, -M_PI / 2);
  cairo_move_to(cr, -e.x_bearing - e.width * align_x, -e.y_bearing - e.height * align_y);
  cairo_show_text(cr, s.c_str());
  cairo_restore(cr);
}

bool drawn(const PlotPanel& p, const PlotPoint& q) {
  return std::isfinite(q.x) && std::isfinite(q.y) && (!p.log_y || q.y > 0);
}

void draw_panel(cairo_t* cr, const PlotPanel& panel, double x0, Range xr,
                const std::string& x_label) {
  Range yr{INFINITY, -INFINITY};
  for (const auto& s : panel.series)
    for (const auto& q : s.points)
      if (drawn(panel, q)) {
        const double y = panel.log_y ? std::log10(q.y) : q.y;
        yr = {std::min(yr.lo, y), std::max(yr.hi, y)};
      }
  double step;
  if (panel.log_y) {
    yr = {std::floor(yr.lo), std::ceil(yr.hi)};
    if (yr.hi <= yr.lo) yr.hi = yr.lo + 1;
    step = 1;
  } else {
    const double pad = std::max(0.05 * (yr.hi - yr.lo), 0.01);
    yr = {yr.lo - pad, yr.hi + pad};
    step = nice_step(yr.hi - yr.lo, 5);
  }
  const double left = x0 + kLeft, right = x0 + kPanelWidth - kRight, top = kTop,
               bottom = kHeight - kBottom;
  auto px = [&](double x) { return left + (x - xr.lo) / (xr.hi - xr.lo) * (right - left); };
  auto py = [&](double y) {
    if (panel.log_y) y = std::log10(y);
    return bottom - (y - yr.lo) / (yr.hi - yr.lo) * (bottom - top);
  };

  // Grid, ticks and their numbers.
  cairo_set_line_width(cr, 1);
  for (double x = std::ceil(xr.lo); x <= xr.hi; x += 1) {
    cairo_set_source_rgb(cr, 0.9, 0.9, 0.9);
    cairo_move_to(cr, px(x), top);
    cairo_line_to(cr, px(x), bottom);
    cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0, 0, 0);
    text(cr, tick_text(x, false), px(x), bottom + 8, 12, 0.5, 0);
  }
  for (double y = std::ceil(yr.lo / step) * step; y <= yr.hi + 1e-9 * step; y += step) {
    const double yy = bottom - (y - yr.lo) / (yr.hi - yr.lo) * (bottom - top);
    cairo_set_source_rgb(cr, 0.9, 0.9, 0.9);
    cairo_move_to(cr, left, yy);
    cairo_line_to(cr, right, yy);
    cairo_stroke(cr);
    cairo_set_source_rgb(cr, 0, 0, 0);
    text(cr, tick_text(y, panel.log_y), left - 8, yy, 12, 1, 0.5);
  }
  cairo_set_source_rgb(cr, 0, 0, 0);
  cairo_rectangle(cr, left, top, right - left, bottom - top);
  cairo_stroke(cr);
  text(cr, x_label, (left + right) / 2, kHeight - 24, 14, 0.5, 0);
  text(cr, panel.y_label, x0 + 18, (top + bottom) / 2, 14, 0.5, 0.5, true);

  // Points, then each label at the first of eight places around its point that lies inside the
  // plot area and overlaps no marker and no label placed before it (else the first place inside,
  // else the first place).
  cairo_save(cr);
  cairo_rectangle(cr, left, top, right - left, bottom - top);
  cairo_clip(cr);
  struct Box {
    double x0, y0, x1, y1;
    bool overlaps(const Box& b) const { return x0 < b.x1 && b.x0 < x1 && y0 < b.y1 && b.y0 < y1; }
  };
  std::vector<Box> taken;
  for (size_t s = 0; s < panel.series.size(); ++s)
    for (const auto& q : panel.series[s].points)
      if (drawn(panel, q)) {
        marker(cr, s, px(q.x), py(q.y));
        taken.push_back({px(q.x) - 6, py(q.y) - 6, px(q.x) + 6, py(q.y) + 6});
      }
  constexpr double kLabelSize = 11;
  cairo_set_font_size(cr, kLabelSize);
  cairo_set_source_rgb(cr, 0.15, 0.15, 0.15);
  for (const auto& s : panel.series)
    for (const auto& q : s.points) {
      if (!drawn(panel, q)) continue;
      cairo_text_extents_t e;
      cairo_text_extents(cr, q.label.c_str(), &e);
      const double x = px(q.x), y = py(q.y), w = e.width, h = e.height;
      const Box places[] = {{x + 8, y - 4 - h, x + 8 + w, y - 4},
                            {x + 8, y + 4, x + 8 + w, y + 4 + h},
                            {x - 8 - w, y - 4 - h, x - 8, y - 4},
                            {x - 8 - w, y + 4, x - 8, y + 4 + h},
                            {x + 10, y - h / 2, x + 10 + w, y + h / 2},
                            {x - 10 - w, y - h / 2, x - 10, y + h / 2},
                            {x - w / 2, y - 9 - h, x + w / 2, y - 9},
                            {x - w / 2, y + 9, x + w / 2, y + 9 + h}};
      auto inside = [&](const Box& b) {
        return b.x0 >= left + 2 && b.x1 <= right - 2 && b.y0 >= top + 2 && b.y1 <= bottom - 2;
      };
      auto free = [&](const Box& b) {
        return std::none_of(taken.begin(), taken.end(), [&](const Box& t) { return t.overlaps(b); });
      };
      const Box* at = &places[0];
      const auto first_inside = std::find_if(std::begin(places), std::end(places), inside);
      if (first_inside != std::end(places)) at = first_inside;
      for (const Box& b : places)
        if (inside(b) && free(b)) {
          at = &b;
          break;
        }
      taken.push_back(*at);
      text(cr, q.label, at->x0, at->y0, kLabelSize, 0, 0);
    }
  cairo_restore(cr);
}

}  // namespace

void write_plot(const std::string& path, const std::string& title, const std::string& x_label,
                const std::vector<PlotPanel>& panels) {
  TQKV_CHECK(!panels.empty(), "--plot: nothing to draw");
  Range xr{INFINITY, -INFINITY};
  for (const auto& p : panels) {
    size_t n = 0;
    for (const auto& s : p.series)
      for (const auto& q : s.points)
        if (drawn(p, q)) {
          ++n;
          xr = {std::min(xr.lo, q.x), std::max(xr.hi, q.x)};
        }
    TQKV_CHECK(n > 0, "--plot: no point to draw in the panel '", p.y_label, "'");
  }
  xr = {std::floor(xr.lo - 0.25), std::ceil(xr.hi + 0.25)};
  const double width = kPanelWidth * double(panels.size());
  std::unique_ptr<cairo_surface_t, void (*)(cairo_surface_t*)> surface(
      cairo_image_surface_create(CAIRO_FORMAT_RGB24, int(width), int(kHeight)),
      cairo_surface_destroy);
  std::unique_ptr<cairo_t, void (*)(cairo_t*)> context(cairo_create(surface.get()), cairo_destroy);
  cairo_t* cr = context.get();
  TQKV_CHECK(cairo_status(cr) == CAIRO_STATUS_SUCCESS, "--plot: cairo: ",
             cairo_status_to_string(cairo_status(cr)));
  cairo_set_source_rgb(cr, 1, 1, 1);
  cairo_paint(cr);
  cairo_select_font_face(cr, "sans-serif", CAIRO_FONT_SLANT_NORMAL, CAIRO_FONT_WEIGHT_NORMAL);
  cairo_set_source_rgb(cr, 0, 0, 0);
  text(cr, title, width / 2, 14, 16, 0.5, 0);

  // Legend: the series of the first panel (every panel has the same series).
  double lx = kLeft;
  for (size_t s = 0; s < panels[0].series.size(); ++s) {
    marker(cr, s, lx, 50);
    cairo_set_source_rgb(cr, 0, 0, 0);
    cairo_set_font_size(cr, 13);
    cairo_text_extents_t e;
    cairo_text_extents(cr, panels[0].series[s].name.c_str(), &e);
    text(cr, panels[0].series[s].name, lx + 12, 50, 13, 0, 0.5);
    lx += e.x_advance + 48;
  }
  for (size_t p = 0; p < panels.size(); ++p)
    draw_panel(cr, panels[p], kPanelWidth * double(p), xr, x_label);

  errno = 0;
  const cairo_status_t status = cairo_surface_write_to_png(surface.get(), path.c_str());
  TQKV_CHECK(status == CAIRO_STATUS_SUCCESS, "--plot: cannot write '", path, "': ",
             cairo_status_to_string(status), errno ? std::string(" (") + std::strerror(errno) + ")"
                                                   : std::string());
}

#else

void write_plot(const std::string& path, const std::string&, const std::string&,
                const std::vector<PlotPanel>&) {
  check_plot_path(path);  // says that this build has no cairo
}

#endif

}  // namespace tqkv::cli
