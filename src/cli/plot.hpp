// Scatter charts as PNG files (cairo): labelled points in a few series, one or more panels side by
// side sharing the x axis, a legend under the title. Used by `tqkv eval model --plot`.
#pragma once

#include <string>
#include <vector>

namespace tqkv::cli {

struct PlotPoint {
  double x = 0, y = 0;
  std::string label;
};

/// Series are told apart by colour and marker (circle, square, triangle, in order).
struct PlotSeries {
  std::string name;
  std::vector<PlotPoint> points;
};

struct PlotPanel {
  std::string y_label;
  bool log_y = false;  ///< points with y <= 0 are left out of a log panel
  std::vector<PlotSeries> series;
};

/// Throws tqkv::Error unless write_plot can work: this build draws PNG files (cairo) and a file
/// can be written at `path`. Checked before a long run, so that it does not find out at its end;
/// leaves no file behind that was not there.
void check_plot_path(const std::string& path);

/// Draws `panels` side by side into a PNG file at `path`. Throws tqkv::Error (naming the path)
/// when the file cannot be written, when a panel has no point to draw, or when this build has no
/// cairo.
void write_plot(const std::string& path, const std::string& title, const std::string& x_label,
                const std::vector<PlotPanel>& panels);

}  // namespace tqkv::cli
