// The normalised distance ‖x/‖x‖ − y/‖y‖‖² of two vectors from their sums, and the coefficients of its gradient:
// one definition for the CPU and CUDA kernels of feature_distance (modes "normalized" and "attention").
#pragma once

#include <c10/macros/Macros.h>

#include <cmath>

namespace rkd_fast {

// loss, and d loss / dx = ax * x + bx * y, d loss / dy = ay * y + by * x.
struct PairResult {
  double loss, ax, bx, ay, by;
  C10_HOST_DEVICE PairResult scaled(double w) const { return {loss, w * ax, w * bx, w * ay, w * by}; }
};

// From Σx², Σy², Σxy, Σ(x−y)², with ‖x‖ and ‖y‖ floored at eps_x and eps_y (1e-12, as torch.nn.functional.normalize,
// or that times the scale of a rescaled vector).
C10_HOST_DEVICE inline PairResult normalized_pair(double xx, double yy, double xy, double dd, double eps_x,
                                                  double eps_y) {
  const double norm_x = sqrt(xx), norm_y = sqrt(yy);
  const double dx = norm_x < eps_x ? eps_x : norm_x, dy = norm_y < eps_y ? eps_y : norm_y;  // NaN stays NaN
  // ‖x̂ − ŷ‖² written around the larger norm, so that no term is much larger than the result: 2 − 2 cos
  // would cancel when x̂ ≈ ŷ, and dividing by the smaller norm would blow up when it is near the floor.
  // dx ≥ dy: x̂ − ŷ = (x − y)/dx + k y;  dx < dy: x̂ − ŷ = (x − y)/dy + k x;  k = 1/dx − 1/dy.
  const double k = 1.0 / dx - 1.0 / dy;
  const double around = dx >= dy ? dd / (dx * dx) + 2.0 * k * (xy - yy) / dx + k * k * yy
                                 : dd / (dy * dy) + 2.0 * k * (xx - xy) / dy + k * k * xx;
  // A squared distance: rounding can leave a tiny negative where x̂ = ŷ (1×1 attention maps), which loss.sqrt()
  // would turn into NaN. (around < 0 is false for NaN, which stays NaN.)
  const double loss = around < 0.0 ? 0.0 : around;
  // With r = 2(x̂ − ŷ): d loss / dx = (r − x̂ (x̂·r)) / dx above the floor and r / dx below it (the clamp
  // passes no gradient); x̂·r = 2(Σx²/dx² − Σxy/(dx dy)). The same for y with −r.
  const double cross = xy / (dx * dy);
  const double xr = norm_x > eps_x ? 2.0 * (xx / (dx * dx) - cross) : 0.0;
  const double yr = norm_y > eps_y ? 2.0 * (yy / (dy * dy) - cross) : 0.0;
  const double b = -2.0 / (dx * dy);
  return {loss, (2.0 - xr) / (dx * dx), b, (2.0 - yr) / (dy * dy), b};
}

}  // namespace rkd_fast
